//! Build helper tests: the project's cuda/*.cu compile under the emulator, compile
//! errors name the file, and the rewriter keeps line numbers.

use std::path::{Path, PathBuf};

use linattn_emulator::build::{rewrite, Build, BuildError};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("linattn-emu-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_project_cuda_source_builds_under_the_emulator() {
    let cuda = workspace().join("cuda");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&cuda)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    if sources.is_empty() {
        return;
    }
    let out = temp_dir("project");
    let report = Build::new("linattn_project_check")
        .sources(&sources)
        .include_dir(cuda.join("include"))
        .out_dir(&out)
        .opt_level(0)
        .cargo_metadata(false)
        .compile()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.module_symbol, "linattn_project_check_emu_module");
    // Every one-line `extern "C" __global__ ... {` definition is registered.
    let mut expected = 0;
    for s in &sources {
        let text = std::fs::read_to_string(s).unwrap();
        expected += text
            .lines()
            .filter(|l| l.trim_start().starts_with("extern \"C\" __global__") && l.contains('{'))
            .count();
    }
    assert!(report.kernels.len() >= expected, "{:?}", report.kernels);
    let _ = std::fs::remove_dir_all(&out);
}

fn rw(src: &str) -> Result<String, BuildError> {
    rewrite(src, Path::new("/src/k.cu"), Some("lib")).map(|r| r.text)
}

#[test]
fn shared_declarations_are_rewritten_on_the_same_lines() {
    let src = "extern \"C\" __global__ void k(P p) {\n  __shared__ float a[256];\n  __shared__ __align__(16) float b[4][\n 8];\n  extern __shared__ unsigned char dyn[];\n  __shared__ float x, y[2];\n  int after = 1;\n}\n";
    let out = rw(src).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "#line 1 \"/src/k.cu\"");
    assert!(
        lines[2].contains("LINATTN_EMU_SHARED(0, a, float [ 256 ])"),
        "{out}"
    );
    assert!(
        lines[3].contains("LINATTN_EMU_SHARED((16), b, float [ 4 ] [ 8 ])"),
        "{out}"
    );
    assert!(
        lines[5].contains("LINATTN_EMU_EXTERN_SHARED(0, dyn, unsigned char )"),
        "{out}"
    );
    assert!(
        lines[6].contains("LINATTN_EMU_SHARED(0, x, float )")
            && lines[6].contains("y, float  [ 2 ]"),
        "{out}"
    );
    assert!(
        lines[7].contains("int after = 1;"),
        "line numbers kept: {out}"
    );
    assert!(
        lines[8].contains("lib__emu_entry__k"),
        "entry point on the closing line: {out}"
    );
    assert_eq!(out.lines().count(), src.lines().count() + 1);
}

#[test]
fn kernels_are_registered_with_their_params() {
    let src = "namespace ns { extern \"C\" __global__ void __launch_bounds__(256) a(const Params p) {} }\n\
               extern \"C\" { __global__ void b(P2 q) { } }\n\
               template <int N> __global__ void t(P p) {}\n\
               __global__ void cxx(P p) {}\n\
               extern \"C\" __global__ void decl_only(P p);\n";
    let r = rewrite(src, Path::new("k.cu"), Some("lib")).unwrap();
    let names: Vec<&str> = r.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(r.kernels[0].params_type, "Params");
    assert_eq!(r.kernels[1].line, 2);
}

#[test]
fn launch_bounds_and_extern_shared_alignment_are_recorded() {
    let src = "extern \"C\" __global__ void __launch_bounds__(kT * 2, 1) a(P p) {\n\
               extern __shared__ __align__(128) float s[];\n  { extern __shared__ __align__(32) int t[]; }\n}\n\
               extern \"C\" __launch_bounds__((64)) __global__ void b(P p) { extern __shared__ float u[]; }\n\
               extern \"C\" __global__ void c(P p) { __shared__ __align__(256) float w[4]; }\n\
               __device__ void f() { extern __shared__ __align__(512) float x[]; }\n";
    let r = rewrite(src, Path::new("k.cu"), Some("lib")).unwrap();
    let names: Vec<&str> = r.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(r.kernels[0].launch_bounds.as_deref(), Some("kT * 2"));
    assert_eq!(r.kernels[0].extern_shared_align, ["(128)", "(32)"]);
    assert_eq!(r.kernels[1].launch_bounds.as_deref(), Some("( 64 )"));
    assert!(r.kernels[1].extern_shared_align.is_empty());
    // Static __shared__ alignment and extern declarations outside kernels don't count.
    assert_eq!(r.kernels[2].launch_bounds, None);
    assert!(r.kernels[2].extern_shared_align.is_empty());
    // The info functions carry them into the registry.
    assert!(
        r.text
            .contains("k->max_threads = ::linattn_emu::launch_bound(kT * 2);"),
        "{}",
        r.text
    );
    assert!(
        r.text
            .contains("max_align({0ull, (unsigned long long)((128)), (unsigned long long)((32))})"),
        "{}",
        r.text
    );
    assert!(r.text.contains("k->max_threads = 1024ull;"), "{}", r.text);
    for bad in [
        "extern \"C\" __global__ void __launch_bounds__() k(P p) {}\n",
        "extern \"C\" __global__ void __launch_bounds__ k(P p) {}\n",
    ] {
        match rewrite(bad, Path::new("bad.cu"), Some("lib")) {
            Err(BuildError::Parse { line, message, .. }) => {
                assert_eq!(line, 1);
                assert!(message.contains("__launch_bounds__"), "{message}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn unparseable_constructs_are_errors_naming_file_and_line() {
    let cases = [
        ("__shared__ float g[4];\n", 1, "namespace scope"),
        (
            "__device__ void f() {\n#define S __shared__ float s[4]\n}\n",
            2,
            "macro",
        ),
        (
            "__device__ void f() {\n  __shared__ float s[4] = {0};\n}\n",
            2,
            "initializer",
        ),
        (
            "__device__ void f() {\n\n  __shared__ float s[];\n}\n",
            3,
            "needs a size",
        ),
        (
            "__device__ void f() {\n  extern __shared__ float s[4];\n}\n",
            2,
            "unknown size",
        ),
        (
            "extern \"C\" __global__ void k(int a,\n int b) {}\n",
            1,
            "exactly one params struct",
        ),
        (
            "extern \"C\" __global__ void k(const P& p) {}\n",
            1,
            "by reference",
        ),
    ];
    for (src, line, what) in cases {
        match rw(src) {
            Err(e @ BuildError::Parse { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("/src/k.cu:{line}:")), "{msg}");
                assert!(msg.contains(what), "{msg}");
            }
            other => panic!("{src:?}: expected a parse error, got {other:?}"),
        }
    }
}

#[test]
fn compile_errors_name_the_failing_file() {
    let dir = temp_dir("broken");
    std::fs::write(
        dir.join("good.cu"),
        "extern \"C\" __global__ void good(int p) {}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bad.cu"),
        "struct P { int x; };\nextern \"C\" __global__ void bad(P p) {\n  undeclared_thing(p.x);\n}\n",
    )
    .unwrap();
    let err = Build::new("broken")
        .sources([dir.join("good.cu"), dir.join("bad.cu")])
        .out_dir(dir.join("out"))
        .opt_level(0)
        .cargo_metadata(false)
        .compile()
        .unwrap_err();
    match &err {
        BuildError::Compile { file, output } => {
            assert!(file.ends_with("bad.cu"), "{err}");
            // the compiler points at the original file and line
            assert!(output.contains("bad.cu:3"), "{output}");
            assert!(output.contains("undeclared_thing"), "{output}");
        }
        other => panic!("{other}"),
    }
    // Inline PTX is rejected at compile time.
    std::fs::write(
        dir.join("ptx.cu"),
        "extern \"C\" __global__ void ptx(int p) { asm volatile(\"trap;\"); }\n",
    )
    .unwrap();
    let err = Build::new("ptx")
        .source(dir.join("ptx.cu"))
        .out_dir(dir.join("out2"))
        .opt_level(0)
        .cargo_metadata(false)
        .compile()
        .unwrap_err();
    assert!(
        err.to_string().contains("inline_asm_is_not_supported"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
