//! Build script of `linattn-kernels`.
//!
//! 1. Finds nvcc (`NVCC`, then `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, then `PATH`;
//!    never nvidia-smi) and compiles every `cuda/*.cu` into a fatbin holding
//!    SASS for each architecture in `LINATTN_CUDA_ARCHS` (default 80;86;89;90)
//!    plus PTX for the lowest one, so the library also runs on drivers older
//!    than the compiler. The fatbins are embedded with `include_bytes!`.
//! 2. Captures ptxas's resource report (registers, spills, stack, shared
//!    memory per kernel per arch) and exposes it to the crate. With
//!    `LINATTN_DENY_SPILLS=1` any register spill fails the build.
//! 3. With no nvcc the crate still builds: one `cargo:warning` says how to get
//!    nvcc and every GPU entry point returns `Error::KernelsNotBuilt`.
//! 4. With the `emulator` feature, the same sources are compiled with the host
//!    C++ compiler for the CPU emulator.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "80;86;89;90";
const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "LINATTN_CUDA_ARCHS",
    "LINATTN_DENY_SPILLS",
    "LINATTN_SKIP_NVCC",
    "LINATTN_NVCC_FLAGS",
];

/// One kernel's resources for one architecture, as ptxas reported them.
#[derive(Debug, Default, Clone)]
struct Resources {
    module: String,
    kernel: String,
    arch: String,
    registers: u32,
    stack_bytes: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem_bytes: u32,
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cuda_dir = manifest.join("../../cuda");
    let cuda_dir = cuda_dir.canonicalize().unwrap_or(cuda_dir);

    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    let mut all_files = Vec::new();
    walk(&cuda_dir, &mut all_files);
    for f in &all_files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut sources: Vec<PathBuf> = fs::read_dir(&cuda_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();

    let include_dir = cuda_dir.join("include");
    let archs = parse_archs();

    let (status, modules, report) = match (env::var("LINATTN_SKIP_NVCC").ok(), find_nvcc()) {
        (Some(v), _) if v == "1" => (
            "NotBuilt(\"LINATTN_SKIP_NVCC=1 was set at build time\")".to_string(),
            Vec::new(),
            Vec::new(),
        ),
        (_, None) => {
            println!(
                "cargo:warning=linattn-kernels: nvcc not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH); \
                 GPU kernels are not built and GPU calls will return Error::KernelsNotBuilt. \
                 Install the CUDA toolkit, or get nvcc from PyPI: python3 -m venv .venv && \
                 .venv/bin/pip install nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
                 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85, then set NVCC to the nvcc it installed \
                 (see README)."
            );
            (
                "NotBuilt(\"nvcc was not found when the crate was built (set NVCC or CUDA_HOME)\")"
                    .to_string(),
                Vec::new(),
                Vec::new(),
            )
        }
        (_, Some(nvcc)) => {
            let mut modules = Vec::new();
            let mut report = Vec::new();
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = sources
                    .iter()
                    .map(|src| {
                        let nvcc = &nvcc;
                        let archs = &archs;
                        let include_dir = &include_dir;
                        let out_dir = &out_dir;
                        s.spawn(move || compile_fatbin(nvcc, src, include_dir, archs, out_dir))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("nvcc thread"))
                    .collect()
            });
            for (src, result) in sources.iter().zip(results) {
                match result {
                    Ok((fatbin, res)) => {
                        modules.push((stem(src), fatbin));
                        report.extend(res);
                    }
                    Err(msg) => fail(&msg),
                }
            }
            deny_spills(&report);
            let archs_lit = archs
                .iter()
                .map(|a| format!("{a}"))
                .collect::<Vec<_>>()
                .join(", ");
            let version = nvcc_version(&nvcc).unwrap_or_else(|| "unknown".into());
            (
                format!(
                    "Built {{ archs: &[{archs_lit}], ptx_arch: {}, nvcc: {:?} }}",
                    archs[0], version
                ),
                modules,
                report,
            )
        }
    };

    write_embedded(&out_dir, &status, &modules, &report);

    if env::var_os("CARGO_FEATURE_EMULATOR").is_some() {
        build_emulator(&sources, &include_dir);
    }
}

fn build_emulator(sources: &[PathBuf], include_dir: &Path) {
    let result = linattn_emulator::build::Build::new("linattn_kernels")
        .sources(sources)
        .include_dir(include_dir)
        .compile();
    match result {
        Ok(report) if report.module_symbol == "linattn_kernels_emu_module" => {}
        Ok(report) => fail(&format!(
            "linattn-kernels: the emulator module symbol is {}, src/emu.rs expects linattn_kernels_emu_module",
            report.module_symbol
        )),
        Err(e) => fail(&format!("linattn-kernels: the CUDA sources failed to build for the CPU emulator:\n{e}")),
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("module")
        .to_string()
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    for line in msg.lines().take(40) {
        println!("cargo:warning={line}");
    }
    std::process::exit(1);
}

fn parse_archs() -> Vec<u32> {
    let raw = env::var("LINATTN_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let mut archs: Vec<u32> = Vec::new();
    for part in raw.split([';', ',', ' ']).filter(|s| !s.is_empty()) {
        let digits = part
            .trim()
            .trim_start_matches("sm_")
            .trim_start_matches("compute_");
        match digits.parse::<u32>() {
            Ok(a) if a >= 70 => archs.push(a),
            _ => fail(&format!(
                "linattn-kernels: LINATTN_CUDA_ARCHS={raw:?}: {part:?} is not a compute capability such as 80 or 90 (at least 70)"
            )),
        }
    }
    if archs.is_empty() {
        fail("linattn-kernels: LINATTN_CUDA_ARCHS is empty; use e.g. \"80;90\"");
    }
    archs.sort_unstable();
    archs.dedup();
    archs
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        println!(
            "cargo:warning=linattn-kernels: NVCC={} is not a file; looking elsewhere",
            p.display()
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join(exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(p) = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join(exe))
            .find(|p| p.is_file())
    }) {
        return Some(p);
    }
    // Last: the PyPI toolkit that scripts/install-nvcc.sh puts in the workspace.
    let venv = PathBuf::from(env::var("CARGO_MANIFEST_DIR").ok()?).join("../../.venv-nvcc/lib");
    fs::read_dir(venv)
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages/nvidia/cu13/bin").join(exe))
        .find(|p| p.is_file())
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
}

fn compile_fatbin(
    nvcc: &Path,
    src: &Path,
    include_dir: &Path,
    archs: &[u32],
    out_dir: &Path,
) -> Result<(PathBuf, Vec<Resources>), String> {
    let name = stem(src);
    let out = out_dir.join(format!("{name}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-lineinfo")
        .arg("--threads")
        .arg("0")
        .arg("-Xptxas")
        .arg("-v")
        .arg("-I")
        .arg(include_dir);
    for a in archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    // PTX for the lowest arch: JIT-compiled by drivers for GPUs newer than any SASS here.
    cmd.arg(format!(
        "-gencode=arch=compute_{0},code=compute_{0}",
        archs[0]
    ));
    if let Ok(extra) = env::var("LINATTN_NVCC_FLAGS") {
        cmd.args(extra.split_whitespace());
    }
    cmd.arg("-o").arg(&out).arg(src);
    let output = cmd
        .output()
        .map_err(|e| format!("linattn-kernels: could not run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(format!(
            "linattn-kernels: nvcc failed on {} ({}):\n{stderr}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout)
        ));
    }
    fs::write(out_dir.join(format!("{name}.ptxas.txt")), &stderr).ok();
    Ok((out, parse_ptxas(&name, &stderr)))
}

/// Parses `-Xptxas -v` output: an "Compiling entry function 'k' for 'sm_90'"
/// line opens a record; the spill and "Used N registers" lines fill it.
fn parse_ptxas(module: &str, text: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    let mut current: Option<Resources> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(done) = current.take() {
                out.push(done);
            }
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            current = Some(Resources {
                module: module.to_string(),
                kernel,
                arch,
                ..Default::default()
            });
        } else if let Some(r) = current.as_mut() {
            if line.contains("bytes stack frame") {
                r.stack_bytes = number_before(line, "bytes stack frame");
                r.spill_stores = number_before(line, "bytes spill stores");
                r.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = number_before(line, "registers");
                r.smem_bytes = number_before(line, "bytes smem");
            }
        }
    }
    if let Some(done) = current {
        out.push(done);
    }
    out
}

fn number_before(line: &str, marker: &str) -> u32 {
    line.find(marker)
        .and_then(|i| line[..i].split_whitespace().last())
        .and_then(|n| n.trim_matches(',').parse().ok())
        .unwrap_or(0)
}

fn deny_spills(report: &[Resources]) {
    if env::var("LINATTN_DENY_SPILLS").ok().as_deref() != Some("1") {
        for r in report.iter().filter(|r| r.spill_stores + r.spill_loads > 0) {
            println!(
                "cargo:warning=linattn-kernels: {} spills on {} ({} B stores, {} B loads)",
                r.kernel, r.arch, r.spill_stores, r.spill_loads
            );
        }
        return;
    }
    let spills: Vec<String> = report
        .iter()
        .filter(|r| r.spill_stores + r.spill_loads > 0)
        .map(|r| {
            format!(
                "  {} on {}: {} B spill stores, {} B spill loads",
                r.kernel, r.arch, r.spill_stores, r.spill_loads
            )
        })
        .collect();
    if !spills.is_empty() {
        fail(&format!(
            "linattn-kernels: register spills with LINATTN_DENY_SPILLS=1:\n{}",
            spills.join("\n")
        ));
    }
}

fn write_embedded(
    out_dir: &Path,
    status: &str,
    modules: &[(String, PathBuf)],
    report: &[Resources],
) {
    let mut s = String::new();
    s.push_str("// Generated by linattn-kernels' build.rs. Do not edit.\n");
    writeln!(
        s,
        "pub(crate) const BUILD_STATUS: BuildStatus = BuildStatus::{status};"
    )
    .unwrap();
    s.push_str("pub(crate) static EMBEDDED_MODULES: &[(&str, &[u8])] = &[\n");
    for (name, path) in modules {
        writeln!(
            s,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    s.push_str("];\n");
    s.push_str("pub(crate) static PTXAS_REPORT: &[KernelResources] = &[\n");
    for r in report {
        writeln!(
            s,
            "    KernelResources {{ module: {:?}, kernel: {:?}, arch: {:?}, registers: {}, stack_bytes: {}, spill_store_bytes: {}, spill_load_bytes: {}, static_smem_bytes: {} }},",
            r.module, r.kernel, r.arch, r.registers, r.stack_bytes, r.spill_stores, r.spill_loads, r.smem_bytes
        )
        .unwrap();
    }
    s.push_str("];\n");
    let path = out_dir.join("embedded.rs");
    if fs::read_to_string(&path).ok().as_deref() != Some(s.as_str()) {
        fs::write(&path, s)
            .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
    }
}
