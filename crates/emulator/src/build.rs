//! Build helper: compiles CUDA sources for the emulator from a `build.rs`.
//!
//! ```ignore
//! // crates/kernels/build.rs (with `linattn-emulator` as a build-dependency)
//! let report = linattn_emulator::build::Build::new("linattn_kernels")
//!     .sources(["../../cuda/scan.cu", "../../cuda/gemm.cu"])
//!     .include_dir("../../cuda/include")
//!     .compile()
//!     .unwrap_or_else(|e| panic!("{e}"));
//! // The static library is linked into the calling crate, which declares
//! //   extern "C" { fn linattn_kernels_emu_module() -> *const std::ffi::c_void; }
//! // (report.module_symbol) and hands the pointer to `Module::from_raw`.
//! ```
//!
//! What [`Build::compile`] does:
//!
//! 1. copies every source, plus the headers under the sources' directories and the
//!    include directories, into `OUT_DIR/linattn-emu/<lib>/`, rewriting `__shared__`
//!    declarations into `LINATTN_EMU_SHARED(align, name, type)` /
//!    `LINATTN_EMU_EXTERN_SHARED(align, name, type)` (same line numbers; each copy
//!    starts with `#line 1 "<original path>"` so compiler errors and debuggers point
//!    at the original file) and appending, on the closing line of each
//!    `extern "C" __global__` kernel, an entry point for the registry;
//! 2. generates `<lib>_emu_registry.cpp` with the kernel table and
//!    `extern "C" const LinattnEmuModule* <lib>_emu_module(void)`;
//! 3. compiles everything with the host C++ compiler through the `cc` crate (C++17,
//!    `-O2`; `LINATTN_EMU_DEBUG=1` gives `-O0 -g`; `LINATTN_EMU_SANITIZE=address` adds
//!    AddressSanitizer), force-including `linattn_emu.h`, with the emulator's
//!    stand-ins for `<cuda_fp16.h>`, `<cuda_bf16.h>`, `<mma.h>` and
//!    `<cuda_runtime.h>` first on the include path, and archives a static library
//!    that cargo links into the calling crate.
//!
//! This file is also compiled into the emulator's own `build.rs` (through `#[path]`),
//! so it depends on nothing but `std` and `cc`.

#![allow(dead_code)]

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Directory holding `linattn_emu.h` and the CUDA header stand-ins.
pub const INCLUDE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include");

const HEADER_EXTS: &[&str] = &["cuh", "h", "hpp", "hh", "hxx", "inl", "inc"];
const SOURCE_EXTS: &[&str] = &["cu", "cpp", "cc", "cxx"];

/// Environment variables the helper reads (each gets `cargo:rerun-if-env-changed`).
pub const ENV_VARS: &[&str] = &[
    "LINATTN_EMU_DEBUG",
    "LINATTN_EMU_SANITIZE",
    "LINATTN_EMU_CXXFLAGS",
];

/// Why a build failed.
#[derive(Debug)]
pub enum BuildError {
    /// Reading or writing a file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The rewriter met a construct it cannot translate.
    Parse {
        /// Original file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The host compiler rejected a file.
    Compile {
        /// Original file (or the generated registry).
        file: PathBuf,
        /// The compiler's output.
        output: String,
    },
    /// Bad configuration (no sources, duplicate kernels, missing environment, ...).
    Config(String),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Io { path, error } => {
                write!(f, "linattn emulator build: {}: {error}", path.display())
            }
            BuildError::Parse {
                file,
                line,
                message,
            } => {
                write!(
                    f,
                    "linattn emulator build: {}:{line}: {message}",
                    file.display()
                )
            }
            BuildError::Compile { file, output } => write!(
                f,
                "linattn emulator build: the host C++ compiler failed on {}:\n{output}",
                file.display()
            ),
            BuildError::Config(m) => write!(f, "linattn emulator build: {m}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// A kernel found in the sources and registered in the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDecl {
    /// The kernel's (extern "C") name.
    pub name: String,
    /// The parameter type as written (empty for a kernel without parameters).
    pub params_type: String,
    /// Original source file.
    pub file: PathBuf,
    /// 1-based line of the `__global__` keyword.
    pub line: usize,
    /// The first argument of the kernel's `__launch_bounds__` (maxThreadsPerBlock) as
    /// written, `None` without the attribute (the launch limit is then 1024 threads).
    pub launch_bounds: Option<String>,
    /// The `__align__` values (as written) of the `extern __shared__` declarations in
    /// the kernel's body: the dynamic shared memory base gets the largest (at least 16).
    pub extern_shared_align: Vec<String>,
}

/// A kernel definition whose body has not opened yet.
#[derive(Debug, Clone)]
struct PendingKernel {
    name: String,
    params_type: String,
    line: usize,
    launch_bounds: Option<String>,
}

/// A kernel whose body is open: its brace depth and what its info function needs.
#[derive(Debug, Clone)]
struct OpenKernel {
    depth: usize,
    name: String,
    launch_bounds: Option<String>,
    extern_align: Vec<String>,
}

/// What [`Build::compile`] produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// Name of the static library (`lib<name>.a`).
    pub lib_name: String,
    /// Symbol of the module function: `extern "C" fn <symbol>() -> *const c_void`.
    pub module_symbol: String,
    /// Registered kernels.
    pub kernels: Vec<KernelDecl>,
    /// Where the rewritten sources and the registry were written.
    pub work_dir: PathBuf,
}

/// The result of rewriting one file.
#[derive(Debug, Clone)]
pub struct Rewritten {
    /// The rewritten text (same line numbers as the original after the `#line`).
    pub text: String,
    /// Kernels defined in the file (only filled for translation units).
    pub kernels: Vec<KernelDecl>,
    /// Number of `__shared__` declarations rewritten.
    pub shared_decls: usize,
}

/// Configures and runs an emulator build. See the module docs.
#[derive(Debug, Clone)]
pub struct Build {
    lib_name: String,
    sources: Vec<PathBuf>,
    include_dirs: Vec<PathBuf>,
    defines: Vec<(String, Option<String>)>,
    flags: Vec<String>,
    out_dir: Option<PathBuf>,
    cuda_arch: u32,
    cargo_metadata: bool,
    target: Option<String>,
    opt_level: Option<u32>,
}

/// `lib_name` with every character outside `[A-Za-z0-9_]` replaced by `_`.
pub fn sanitize_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The module symbol generated for a library name: `<lib>_emu_module`.
pub fn module_symbol(lib_name: &str) -> String {
    format!("{}_emu_module", sanitize_name(lib_name))
}

impl Build {
    /// A build producing `lib<lib_name>.a` and the function `<lib_name>_emu_module`.
    pub fn new(lib_name: &str) -> Build {
        Build {
            lib_name: sanitize_name(lib_name),
            sources: Vec::new(),
            include_dirs: Vec::new(),
            defines: Vec::new(),
            flags: Vec::new(),
            out_dir: None,
            cuda_arch: 800,
            cargo_metadata: true,
            target: None,
            opt_level: None,
        }
    }

    /// Adds one source file (a translation unit).
    pub fn source(&mut self, path: impl AsRef<Path>) -> &mut Build {
        self.sources.push(path.as_ref().to_path_buf());
        self
    }

    /// Adds source files.
    pub fn sources<P: AsRef<Path>>(&mut self, paths: impl IntoIterator<Item = P>) -> &mut Build {
        for p in paths {
            self.source(p);
        }
        self
    }

    /// Adds an include directory (its headers are rewritten too).
    pub fn include_dir(&mut self, path: impl AsRef<Path>) -> &mut Build {
        self.include_dirs.push(path.as_ref().to_path_buf());
        self
    }

    /// Defines a preprocessor macro for every file.
    pub fn define(&mut self, name: &str, value: Option<&str>) -> &mut Build {
        self.defines
            .push((name.to_string(), value.map(str::to_string)));
        self
    }

    /// Adds a raw compiler flag.
    pub fn flag(&mut self, flag: &str) -> &mut Build {
        self.flags.push(flag.to_string());
        self
    }

    /// Output directory (default: `$OUT_DIR`).
    pub fn out_dir(&mut self, dir: impl AsRef<Path>) -> &mut Build {
        self.out_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Value of `__CUDA_ARCH__` seen by the sources (default 800).
    pub fn cuda_arch(&mut self, arch: u32) -> &mut Build {
        self.cuda_arch = arch;
        self
    }

    /// Whether to print `cargo:` directives (default true; turn off outside build scripts).
    pub fn cargo_metadata(&mut self, on: bool) -> &mut Build {
        self.cargo_metadata = on;
        self
    }

    /// Target triple (default: `$TARGET`, else the host's).
    pub fn target(&mut self, triple: &str) -> &mut Build {
        self.target = Some(triple.to_string());
        self
    }

    /// Optimisation level (default 2, or 0 with `LINATTN_EMU_DEBUG=1`).
    pub fn opt_level(&mut self, level: u32) -> &mut Build {
        self.opt_level = Some(level);
        self
    }

    fn say(&self, line: &str) {
        if self.cargo_metadata {
            println!("cargo:{line}");
        }
    }

    /// Rewrites, generates, compiles and archives. See the module docs.
    pub fn compile(&self) -> Result<BuildReport, BuildError> {
        if self.sources.is_empty() {
            return Err(BuildError::Config("no sources given".into()));
        }
        for v in ENV_VARS {
            self.say(&format!("rerun-if-env-changed={v}"));
        }
        let debug = std::env::var("LINATTN_EMU_DEBUG").is_ok_and(|v| !v.is_empty() && v != "0");
        let sanitize = std::env::var("LINATTN_EMU_SANITIZE")
            .ok()
            .filter(|v| !v.is_empty());
        let out_dir = match &self.out_dir {
            Some(d) => d.clone(),
            None => PathBuf::from(
                std::env::var_os("OUT_DIR")
                    .ok_or_else(|| BuildError::Config("OUT_DIR is not set".into()))?,
            ),
        };
        let work = out_dir.join("linattn-emu").join(&self.lib_name);
        if work.exists() {
            fs::remove_dir_all(&work).map_err(|error| BuildError::Io {
                path: work.clone(),
                error,
            })?;
        }
        mkdir(&work)?;

        // Mirror include dirs and source dirs, rewriting every header.
        let mut inc_mirrors = Vec::new();
        let mut fallback_dirs = Vec::new();
        for (i, dir) in self.include_dirs.iter().enumerate() {
            let dir = canonical(dir)?;
            let dst = work.join(format!("inc{i}"));
            self.mirror_headers(&dir, &dst)?;
            inc_mirrors.push(dst);
            fallback_dirs.push(dir);
        }
        let mut src_dirs: Vec<PathBuf> = Vec::new();
        let mut units = Vec::new();
        let mut kernels: Vec<KernelDecl> = Vec::new();
        for src in &self.sources {
            let src = canonical(src)?;
            self.say(&format!("rerun-if-changed={}", src.display()));
            let parent = src.parent().map(Path::to_path_buf).unwrap_or_default();
            let idx = match src_dirs.iter().position(|d| *d == parent) {
                Some(i) => i,
                None => {
                    let dst = work.join(format!("src{}", src_dirs.len()));
                    self.mirror_headers(&parent, &dst)?;
                    src_dirs.push(parent.clone());
                    src_dirs.len() - 1
                }
            };
            let text = read(&src)?;
            let rw = rewrite(&text, &src, Some(&self.lib_name))?;
            for k in &rw.kernels {
                if let Some(prev) = kernels.iter().find(|p| p.name == k.name) {
                    return Err(BuildError::Parse {
                        file: k.file.clone(),
                        line: k.line,
                        message: format!(
                            "kernel `{}` is also defined at {}:{}",
                            k.name,
                            prev.file.display(),
                            prev.line
                        ),
                    });
                }
            }
            kernels.extend(rw.kernels.iter().cloned());
            let name = src
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let dst = work.join(format!("src{idx}")).join(name);
            write(&dst, &rw.text)?;
            units.push((src, dst));
        }
        let mut fallback_src = src_dirs.clone();
        fallback_dirs.append(&mut fallback_src);

        // The registry.
        let registry = work.join(format!("{}_emu_registry.cpp", self.lib_name));
        write(&registry, &registry_source(&self.lib_name, &kernels))?;
        for entry in fs::read_dir(INCLUDE_DIR).map_err(|error| BuildError::Io {
            path: INCLUDE_DIR.into(),
            error,
        })? {
            let entry = entry.map_err(|error| BuildError::Io {
                path: INCLUDE_DIR.into(),
                error,
            })?;
            self.say(&format!("rerun-if-changed={}", entry.path().display()));
        }

        // Compile.
        let mut cc = cc::Build::new();
        cc.cpp(true)
            .std("c++17")
            .warnings(false)
            .extra_warnings(false)
            .cargo_metadata(self.cargo_metadata)
            .out_dir(&work)
            .include(INCLUDE_DIR);
        for d in &inc_mirrors {
            cc.include(d);
        }
        let target = self
            .target
            .clone()
            .or_else(|| std::env::var("TARGET").ok())
            .unwrap_or_else(host_triple);
        cc.target(&target)
            .host(&std::env::var("HOST").unwrap_or_else(|_| target.clone()));
        let opt = self.opt_level.unwrap_or(if debug { 0 } else { 2 });
        cc.opt_level(opt).debug(debug);
        cc.flag("-include")
            .flag(format!("{INCLUDE_DIR}/linattn_emu.h"))
            .flag("-fno-strict-aliasing")
            .flag("-Wno-unknown-pragmas")
            .define(
                "LINATTN_EMU_TLS",
                Some(format!("{}_emu_tls", self.lib_name).as_str()),
            )
            .define("__CUDA_ARCH__", Some(self.cuda_arch.to_string().as_str()));
        for d in &fallback_dirs {
            cc.flag("-idirafter").flag(d.display().to_string());
        }
        if debug {
            cc.flag("-g3").flag("-fno-omit-frame-pointer");
        }
        if let Some(s) = &sanitize {
            cc.flag(format!("-fsanitize={s}"))
                .flag("-fno-omit-frame-pointer");
        }
        if let Ok(extra) = std::env::var("LINATTN_EMU_CXXFLAGS") {
            for f in extra.split_whitespace() {
                cc.flag(f);
            }
        }
        for (k, v) in &self.defines {
            cc.define(k, v.as_deref());
        }
        for f in &self.flags {
            cc.flag(f);
        }
        let compiler = cc
            .try_get_compiler()
            .map_err(|e| BuildError::Config(format!("no host C++ compiler: {e}")))?;
        units.push((registry.clone(), registry.clone()));
        let mut objects = Vec::new();
        let mut children = Vec::new();
        for (i, (orig, rewritten)) in units.iter().enumerate() {
            let obj = work.join(format!("unit{i}.o"));
            let mut cmd = compiler.to_command();
            cmd.arg("-x")
                .arg("c++")
                .arg("-c")
                .arg(rewritten)
                .arg("-o")
                .arg(&obj);
            let child = cmd
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|error| BuildError::Io {
                    path: compiler.path().to_path_buf(),
                    error,
                })?;
            children.push((orig.clone(), child));
            objects.push(obj);
            // Keep at most `jobs` compilers running.
            let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
            if children.len() >= jobs {
                let (orig, child) = children.remove(0);
                finish(orig, child)?;
            }
        }
        for (orig, child) in children {
            finish(orig, child)?;
        }
        let mut ar = cc::Build::new();
        ar.cpp(true)
            .cargo_metadata(self.cargo_metadata)
            .out_dir(&work)
            .target(&target);
        ar.host(&std::env::var("HOST").unwrap_or_else(|_| target.clone()))
            .opt_level(opt);
        for o in &objects {
            ar.object(o);
        }
        ar.try_compile(&self.lib_name).map_err(|e| {
            BuildError::Config(format!("archiving lib{}.a failed: {e}", self.lib_name))
        })?;
        if sanitize.as_deref() == Some("address") {
            self.say("rustc-link-lib=dylib=asan");
        }
        Ok(BuildReport {
            lib_name: self.lib_name.clone(),
            module_symbol: module_symbol(&self.lib_name),
            kernels,
            work_dir: work,
        })
    }

    fn mirror_headers(&self, src: &Path, dst: &Path) -> Result<(), BuildError> {
        let mut stack = vec![(src.to_path_buf(), dst.to_path_buf(), 0usize)];
        while let Some((s, d, depth)) = stack.pop() {
            if depth > 16 {
                continue;
            }
            let rd = fs::read_dir(&s).map_err(|error| BuildError::Io {
                path: s.clone(),
                error,
            })?;
            for entry in rd {
                let entry = entry.map_err(|error| BuildError::Io {
                    path: s.clone(),
                    error,
                })?;
                let p = entry.path();
                let name = entry.file_name();
                let ft = entry.file_type().map_err(|error| BuildError::Io {
                    path: p.clone(),
                    error,
                })?;
                if ft.is_dir() {
                    let n = name.to_string_lossy();
                    if n.starts_with('.') || n == "target" {
                        continue;
                    }
                    stack.push((p, d.join(&name), depth + 1));
                } else if ft.is_file() {
                    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                    if HEADER_EXTS.contains(&ext) {
                        let text = read(&p)?;
                        let rw = rewrite(&text, &p, None)?;
                        write(&d.join(&name), &rw.text)?;
                        self.say(&format!("rerun-if-changed={}", p.display()));
                    } else if !SOURCE_EXTS.contains(&ext) {
                        continue;
                    }
                }
            }
        }
        Ok(())
    }
}

fn finish(orig: PathBuf, child: std::process::Child) -> Result<(), BuildError> {
    let out = child.wait_with_output().map_err(|error| BuildError::Io {
        path: orig.clone(),
        error,
    })?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        return Err(BuildError::Compile {
            file: orig,
            output: text,
        });
    }
    Ok(())
}

fn host_triple() -> String {
    let arch = std::env::consts::ARCH;
    match std::env::consts::OS {
        "linux" => format!("{arch}-unknown-linux-gnu"),
        "macos" => format!("{arch}-apple-darwin"),
        os => format!("{arch}-unknown-{os}"),
    }
}

fn canonical(p: &Path) -> Result<PathBuf, BuildError> {
    fs::canonicalize(p).map_err(|error| BuildError::Io {
        path: p.to_path_buf(),
        error,
    })
}

fn mkdir(p: &Path) -> Result<(), BuildError> {
    fs::create_dir_all(p).map_err(|error| BuildError::Io {
        path: p.to_path_buf(),
        error,
    })
}

fn read(p: &Path) -> Result<String, BuildError> {
    fs::read_to_string(p).map_err(|error| BuildError::Io {
        path: p.to_path_buf(),
        error,
    })
}

fn write(p: &Path, text: &str) -> Result<(), BuildError> {
    if let Some(parent) = p.parent() {
        mkdir(parent)?;
    }
    fs::write(p, text).map_err(|error| BuildError::Io {
        path: p.to_path_buf(),
        error,
    })
}

fn registry_source(lib: &str, kernels: &[KernelDecl]) -> String {
    let mut s = String::new();
    s.push_str("// Generated by linattn_emulator::build. Do not edit.\n");
    s.push_str(&format!(
        "extern \"C\" __thread LinattnEmuThreadCtx* {lib}_emu_tls = nullptr;\n"
    ));
    for k in kernels {
        s.push_str(&format!(
            "extern \"C\" void {lib}__emu_entry__{n}(const void*);\nextern \"C\" void {lib}__emu_info__{n}(LinattnEmuKernel*);\n",
            n = k.name
        ));
    }
    s.push_str(&format!(
        "static void {lib}_emu_set_ctx(LinattnEmuThreadCtx* c) {{ {lib}_emu_tls = c; }}\n"
    ));
    s.push_str(
        "#if defined(__SANITIZE_ADDRESS__)\nextern \"C\" void __asan_unpoison_memory_region(void const volatile*, decltype(sizeof(0)));\n#endif\n",
    );
    s.push_str(&format!(
        "static void {lib}_emu_unpoison(void* p, unsigned long long n) {{\n#if defined(__SANITIZE_ADDRESS__)\n  __asan_unpoison_memory_region(p, (decltype(sizeof(0)))n);\n#else\n  (void)p;\n  (void)n;\n#endif\n}}\n"
    ));
    s.push_str(&format!(
        "extern \"C\" const LinattnEmuModule* {lib}_emu_module(void) {{\n"
    ));
    s.push_str(&format!(
        "  static LinattnEmuKernel kernels[{}] = {{\n",
        kernels.len().max(1)
    ));
    for k in kernels {
        s.push_str(&format!(
            "    {{\"{n}\", {lib}__emu_entry__{n}, 0, 0, 0, 0}},\n",
            n = k.name
        ));
    }
    if kernels.is_empty() {
        s.push_str("    {nullptr, nullptr, 0, 0, 0, 0},\n");
    }
    s.push_str("  };\n");
    s.push_str("  static const LinattnEmuModule module = [] {\n");
    for (i, k) in kernels.iter().enumerate() {
        s.push_str(&format!(
            "    {lib}__emu_info__{n}(&kernels[{i}]);\n",
            n = k.name
        ));
    }
    s.push_str(&format!(
        "    return LinattnEmuModule{{LINATTN_EMU_MAGIC, LINATTN_EMU_ABI_VERSION, (uint32_t)sizeof(LinattnEmuThreadCtx), {}u, kernels, {lib}_emu_set_ctx, \"{lib}\", {lib}_emu_unpoison}};\n",
        kernels.len()
    ));
    s.push_str("  }();\n  return &module;\n}\n");
    s
}

// ------------------------------------------------------------------------------
// The rewriter: a small C++ scanner (comments, literals, directives, tokens).
// ------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ident,
    Number,
    Str,
    Punct,
    /// A whole preprocessor directive (statement boundary).
    Directive,
}

#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: Kind,
    start: usize,
    end: usize,
    line: usize,
}

fn tokenize(src: &str) -> Result<Vec<Tok>, (usize, String)> {
    let b = src.as_bytes();
    let n = b.len();
    let mut toks = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let mut at_line_start = true;
    while i < n {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            at_line_start = true;
            i += 1;
            continue;
        }
        if c == b' ' || c == b'\t' || c == b'\r' || c == 0x0c || c == 0x0b {
            i += 1;
            continue;
        }
        if c == b'\\'
            && i + 1 < n
            && (b[i + 1] == b'\n' || (b[i + 1] == b'\r' && i + 2 < n && b[i + 2] == b'\n'))
        {
            i += if b[i + 1] == b'\n' { 2 } else { 3 };
            line += 1;
            continue;
        }
        if c == b'/' && i + 1 < n && b[i + 1] == b'/' {
            while i < n && b[i] != b'\n' {
                if b[i] == b'\\' && i + 1 < n && b[i + 1] == b'\n' {
                    line += 1;
                    i += 1;
                }
                i += 1;
            }
            continue;
        }
        if c == b'/' && i + 1 < n && b[i + 1] == b'*' {
            let start_line = line;
            i += 2;
            loop {
                if i + 1 >= n {
                    return Err((start_line, "unterminated /* comment".into()));
                }
                if b[i] == b'*' && b[i + 1] == b'/' {
                    i += 2;
                    break;
                }
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            continue;
        }
        if c == b'#' && at_line_start {
            let start = i;
            let start_line = line;
            while i < n && b[i] != b'\n' {
                if b[i] == b'\\' && i + 1 < n && b[i + 1] == b'\n' {
                    line += 1;
                    i += 2;
                    continue;
                }
                if b[i] == b'/' && i + 1 < n && b[i + 1] == b'*' {
                    i += 2;
                    while i + 1 < n && !(b[i] == b'*' && b[i + 1] == b'/') {
                        if b[i] == b'\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                    i += 2;
                    continue;
                }
                i += 1;
            }
            let end = i.min(n);
            toks.push(Tok {
                kind: Kind::Directive,
                start,
                end,
                line: start_line,
            });
            continue;
        }
        at_line_start = false;
        let start = i;
        // Raw string literal.
        if (c == b'R' || c == b'u' || c == b'U' || c == b'L') && {
            let mut j = i;
            while j < n && (b[j] == b'u' || b[j] == b'U' || b[j] == b'L' || b[j] == b'8') {
                j += 1;
            }
            j < n && b[j] == b'R' && j + 1 < n && b[j + 1] == b'"'
        } {
            let mut j = i;
            while b[j] != b'R' {
                j += 1;
            }
            j += 2;
            let dstart = j;
            while j < n && b[j] != b'(' {
                j += 1;
            }
            let delim = format!("){}\"", &src[dstart..j.min(n)]);
            let close = src[j.min(n)..]
                .find(&delim)
                .ok_or((line, "unterminated raw string".to_string()))?;
            let end = j + close + delim.len();
            line += src[start..end].matches('\n').count();
            toks.push(Tok {
                kind: Kind::Str,
                start,
                end,
                line,
            });
            i = end;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            while i < n && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
                i += 1;
            }
            // Encoding prefix of a string or char literal.
            if i < n
                && (b[i] == b'"' || b[i] == b'\'')
                && matches!(&src[start..i], "u8" | "u" | "U" | "L")
            {
                // fall through to literal scanning below
            } else {
                toks.push(Tok {
                    kind: Kind::Ident,
                    start,
                    end: i,
                    line,
                });
                continue;
            }
        }
        if i < n && (b[i] == b'"' || b[i] == b'\'') {
            let q = b[i];
            i += 1;
            while i < n && b[i] != q {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < n && b[i] == b'\n' {
                    return Err((line, "unterminated literal".into()));
                }
                i += 1;
            }
            i += 1;
            toks.push(Tok {
                kind: Kind::Str,
                start,
                end: i.min(n),
                line,
            });
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && i + 1 < n && b[i + 1].is_ascii_digit()) {
            while i < n
                && (b[i].is_ascii_alphanumeric()
                    || b[i] == b'.'
                    || b[i] == b'\''
                    || ((b[i] == b'+' || b[i] == b'-')
                        && matches!(b[i - 1], b'e' | b'E' | b'p' | b'P')))
            {
                i += 1;
            }
            toks.push(Tok {
                kind: Kind::Number,
                start,
                end: i,
                line,
            });
            continue;
        }
        // Punctuation: `::` as one token, everything else one char.
        if c == b':' && i + 1 < n && b[i + 1] == b':' {
            i += 2;
        } else {
            i += 1;
        }
        toks.push(Tok {
            kind: Kind::Punct,
            start,
            end: i,
            line,
        });
    }
    Ok(toks)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Brace {
    Namespace,
    ExternC,
    Class,
    Code,
}

struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// Rewrites one file. `lib` is `Some(lib_name)` for translation units (kernels are
/// registered and get entry points), `None` for headers.
pub fn rewrite(src: &str, path: &Path, lib: Option<&str>) -> Result<Rewritten, BuildError> {
    let perr = |line: usize, message: String| BuildError::Parse {
        file: path.to_path_buf(),
        line,
        message,
    };
    let toks = tokenize(src).map_err(|(l, m)| perr(l, m))?;
    let t = |i: usize| &src[toks[i].start..toks[i].end];
    let is = |i: usize, s: &str| i < toks.len() && t(i) == s;

    let mut edits: Vec<Edit> = Vec::new();
    let mut kernels: Vec<KernelDecl> = Vec::new();
    let mut braces: Vec<Brace> = Vec::new();
    let mut stmt_start = 0usize; // first token of the current statement
    let mut shared_decls = 0;
    let mut i = 0;
    // Kernels whose body starts at a given brace depth: (depth, name, line).
    let mut pending_kernel: Option<PendingKernel> = None;
    let mut open_kernels: Vec<OpenKernel> = Vec::new();
    while i < toks.len() {
        let tok = toks[i];
        match tok.kind {
            Kind::Directive => {
                let text = &src[tok.start..tok.end];
                if has_word(text, "__shared__")
                    && !text
                        .trim_start_matches('#')
                        .trim_start()
                        .starts_with("error")
                {
                    let d = text.trim_start_matches('#').trim_start();
                    if d.starts_with("define") {
                        return Err(perr(
                            tok.line,
                            "`__shared__` inside a macro cannot be rewritten for the emulator; declare the variable \
                             in the function body"
                                .into(),
                        ));
                    }
                }
                if has_word(text, "__noinline__") {
                    edits.push(Edit {
                        start: tok.start,
                        end: tok.end,
                        text: replace_word(text, "__noinline__", "__attribute__((noinline))"),
                    });
                }
                stmt_start = i + 1;
                i += 1;
                continue;
            }
            Kind::Ident => {
                let word = t(i);
                if word == "__noinline__" {
                    edits.push(Edit {
                        start: tok.start,
                        end: tok.end,
                        text: "__attribute__((noinline))".into(),
                    });
                } else if word == "__shared__" {
                    if !braces.contains(&Brace::Code) {
                        return Err(perr(
                            tok.line,
                            "`__shared__` at namespace scope is not supported by the emulator; declare it inside \
                             the kernel or device function"
                                .into(),
                        ));
                    }
                    // Find the end of the statement.
                    let mut j = i + 1;
                    let mut depth = 0i32;
                    loop {
                        if j >= toks.len() {
                            return Err(perr(
                                tok.line,
                                "unterminated `__shared__` declaration".into(),
                            ));
                        }
                        let tk = toks[j];
                        if tk.kind == Kind::Directive {
                            return Err(perr(
                                tk.line,
                                "preprocessor directive inside a `__shared__` declaration".into(),
                            ));
                        }
                        let s = t(j);
                        match s {
                            "(" | "[" => depth += 1,
                            ")" | "]" => depth -= 1,
                            "{" | "}" => return Err(perr(
                                tok.line,
                                "cannot parse this `__shared__` declaration (braces before `;`; \
                                     __shared__ variables cannot have initializers)"
                                    .into(),
                            )),
                            ";" if depth == 0 => break,
                            _ => {}
                        }
                        j += 1;
                    }
                    let (text, extern_align) = shared_decl(src, &toks, stmt_start, j, path)?;
                    if let (Some(align), Some(k)) = (extern_align, open_kernels.last_mut()) {
                        k.extern_align.push(align);
                    }
                    let start = toks[stmt_start].start;
                    let end = toks[j].end;
                    let newlines = src[start..end].matches('\n').count();
                    edits.push(Edit {
                        start,
                        end,
                        text: format!("{text}{}", "\n".repeat(newlines)),
                    });
                    shared_decls += 1;
                    i = j + 1;
                    stmt_start = i;
                    continue;
                } else if word == "__global__" {
                    if let Some(k) = kernel_decl(src, &toks, stmt_start, i, &braces, path)? {
                        pending_kernel = Some(k);
                    }
                }
            }
            Kind::Punct => {
                let s = t(i);
                match s {
                    ";" => {
                        pending_kernel = None;
                        stmt_start = i + 1;
                    }
                    "{" => {
                        let kind = classify_brace(src, &toks, stmt_start, i);
                        braces.push(kind);
                        if let Some(k) = pending_kernel.take() {
                            open_kernels.push(OpenKernel {
                                depth: braces.len(),
                                name: k.name,
                                launch_bounds: k.launch_bounds,
                                extern_align: Vec::new(),
                            });
                        }
                        stmt_start = i + 1;
                    }
                    "}" => {
                        if open_kernels.last().is_some_and(|k| k.depth == braces.len()) {
                            if let (Some(k), Some(lib)) = (open_kernels.pop(), lib) {
                                if let Some(decl) = kernels.iter_mut().find(|d| d.name == k.name) {
                                    decl.extern_shared_align = k.extern_align.clone();
                                }
                                edits.push(Edit {
                                    start: tok.end,
                                    end: tok.end,
                                    text: entry_points(lib, &k),
                                });
                            }
                        }
                        braces.pop();
                        stmt_start = i + 1;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        // Record kernel definitions when their body opens.
        if let Some(k) = &pending_kernel {
            if is(i + 1, "{")
                && lib.is_some()
                && !kernels.iter().any(|d: &KernelDecl| d.name == k.name)
            {
                kernels.push(KernelDecl {
                    name: k.name.clone(),
                    params_type: k.params_type.clone(),
                    file: path.to_path_buf(),
                    line: k.line,
                    launch_bounds: k.launch_bounds.clone(),
                    extern_shared_align: Vec::new(),
                });
            }
        }
        i += 1;
    }
    // Apply edits.
    edits.sort_by_key(|e| e.start);
    let mut out = String::with_capacity(src.len() + 256);
    out.push_str(&format!("#line 1 \"{}\"\n", escape_path(path)));
    let mut pos = 0;
    for e in &edits {
        if e.start < pos {
            continue;
        }
        out.push_str(&src[pos..e.start]);
        out.push_str(&e.text);
        pos = e.end;
    }
    out.push_str(&src[pos..]);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(Rewritten {
        text: out,
        kernels,
        shared_decls,
    })
}

/// The entry point and the info function appended after a kernel's closing brace (in
/// the kernel's own scope, so constants in `__launch_bounds__` and `__align__` resolve).
fn entry_points(lib: &str, k: &OpenKernel) -> String {
    let name = &k.name;
    let max_threads = match &k.launch_bounds {
        Some(e) => format!("::linattn_emu::launch_bound({e})"),
        None => "1024ull".to_string(),
    };
    let aligns: Vec<String> = k
        .extern_align
        .iter()
        .map(|a| format!("(unsigned long long)({a})"))
        .collect();
    format!(
        " extern \"C\" void {lib}__emu_entry__{name}(const void* p) {{ ::linattn_emu::invoke_kernel(&{name}, p); }} \
         extern \"C\" void {lib}__emu_info__{name}(LinattnEmuKernel* k) {{ \
         ::linattn_emu::kernel_info(&{name}, &k->params_size, &k->params_align); \
         k->max_threads = {max_threads}; k->dyn_align = ::linattn_emu::max_align({{0ull{sep}{list}}}); }}",
        sep = if aligns.is_empty() { "" } else { ", " },
        list = aligns.join(", ")
    )
}

fn escape_path(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn word_positions(text: &str, word: &str) -> Vec<usize> {
    let b = text.as_bytes();
    text.match_indices(word)
        .map(|(p, _)| p)
        .filter(|&p| {
            (p == 0 || !is_ident_byte(b[p - 1]))
                && (p + word.len() >= b.len() || !is_ident_byte(b[p + word.len()]))
        })
        .collect()
}

fn has_word(text: &str, word: &str) -> bool {
    !word_positions(text, word).is_empty()
}

fn replace_word(text: &str, word: &str, with: &str) -> String {
    let mut out = String::new();
    let mut last = 0;
    for p in word_positions(text, word) {
        out.push_str(&text[last..p]);
        out.push_str(with);
        last = p + word.len();
    }
    out.push_str(&text[last..]);
    out
}

fn classify_brace(src: &str, toks: &[Tok], from: usize, to: usize) -> Brace {
    let words: Vec<&str> = toks[from.min(to)..to]
        .iter()
        .map(|t| &src[t.start..t.end])
        .collect();
    let first = words.iter().position(|w| *w != "inline");
    match first.map(|f| words[f]) {
        Some("namespace") => return Brace::Namespace,
        Some("extern") if words.len() == 2 && words[1].starts_with('"') => {
            return if words[1] == "\"C\"" {
                Brace::ExternC
            } else {
                Brace::Namespace
            }
        }
        _ => {}
    }
    let has_paren = words.contains(&"(");
    let has_class = words
        .iter()
        .any(|w| matches!(*w, "struct" | "class" | "union" | "enum"));
    let has_eq = words.contains(&"=");
    if has_class && !has_paren && !has_eq {
        Brace::Class
    } else {
        Brace::Code
    }
}

/// The first argument of the `__launch_bounds__(...)` whose keyword is token `at`
/// (tokens joined by spaces), or an error message.
fn launch_bounds_arg(src: &str, toks: &[Tok], at: usize) -> Result<String, String> {
    let t = |i: usize| &src[toks[i].start..toks[i].end];
    if at + 1 >= toks.len() || t(at + 1) != "(" {
        return Err("`__launch_bounds__` without an argument list".into());
    }
    let mut depth = 0i32;
    let mut first: Vec<&str> = Vec::new();
    let mut in_first = true;
    for j in at + 1..toks.len() {
        let s = t(j);
        match s {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => {
                depth -= 1;
                if depth == 0 {
                    return if first.is_empty() {
                        Err("empty `__launch_bounds__()`".into())
                    } else {
                        Ok(first.join(" "))
                    };
                }
            }
            "," if depth == 1 => in_first = false,
            _ => {}
        }
        if in_first && !(depth == 1 && s == "(" && j == at + 1) {
            first.push(s);
        }
    }
    Err("unbalanced parentheses after `__launch_bounds__`".into())
}

/// Parses `__global__ void [__launch_bounds__(..)] NAME(PARAMS)`. Returns the
/// kernel for extern "C" kernels, `None` for others.
fn kernel_decl(
    src: &str,
    toks: &[Tok],
    stmt_start: usize,
    at: usize,
    braces: &[Brace],
    path: &Path,
) -> Result<Option<PendingKernel>, BuildError> {
    let t = |i: usize| &src[toks[i].start..toks[i].end];
    let line = toks[at].line;
    let perr = |message: String| BuildError::Parse {
        file: path.to_path_buf(),
        line,
        message,
    };
    let head: Vec<&str> = (stmt_start..at).map(t).collect();
    if head.contains(&"template") {
        return Ok(None);
    }
    let extern_c = head.windows(2).any(|w| w[0] == "extern" && w[1] == "\"C\"")
        || braces.contains(&Brace::ExternC);
    let mut launch_bounds = None;
    for j in stmt_start..at {
        if t(j) == "__launch_bounds__" {
            launch_bounds = Some(launch_bounds_arg(src, toks, j).map_err(&perr)?);
        }
    }
    // Skip to the name: identifiers/attributes until an identifier followed by `(`.
    let mut j = at + 1;
    let mut name = None;
    while j < toks.len() {
        let s = t(j);
        if s == "__launch_bounds__" {
            launch_bounds = Some(launch_bounds_arg(src, toks, j).map_err(&perr)?);
        }
        if s == "__launch_bounds__" || s == "__attribute__" || s == "alignas" || s == "__align__" {
            // skip balanced parens
            j += 1;
            if j < toks.len() && t(j) == "(" {
                let mut depth = 0;
                while j < toks.len() {
                    match t(j) {
                        "(" => depth += 1,
                        ")" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            j += 1;
            continue;
        }
        if toks[j].kind == Kind::Ident && j + 1 < toks.len() && t(j + 1) == "(" {
            name = Some(j);
            break;
        }
        if matches!(s, ";" | "{" | "}" | "(" | "<") {
            break;
        }
        j += 1;
    }
    let Some(name_idx) = name else {
        return Err(perr(
            "cannot find the kernel name after `__global__`".into(),
        ));
    };
    if !extern_c {
        return Ok(None);
    }
    // Parameters.
    let mut k = name_idx + 2;
    let mut depth = 1;
    let mut params: Vec<Vec<usize>> = vec![Vec::new()];
    let mut angle = 0;
    while k < toks.len() {
        let s = t(k);
        match s {
            "(" | "[" => depth += 1,
            ")" | "]" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "<" => angle += 1,
            ">" if angle > 0 => angle -= 1,
            "," if depth == 1 && angle == 0 => {
                params.push(Vec::new());
                k += 1;
                continue;
            }
            _ => {}
        }
        if let Some(last) = params.last_mut() {
            last.push(k);
        }
        k += 1;
    }
    let name = t(name_idx).to_string();
    let params: Vec<Vec<usize>> = params.into_iter().filter(|p| !p.is_empty()).collect();
    let params_type = match params.len() {
        0 => String::new(),
        1 => {
            let words: Vec<&str> = params[0].iter().map(|&i| t(i)).collect();
            if words == ["void"] {
                String::new()
            } else {
                if words.contains(&"&") || words.contains(&"&&") {
                    return Err(perr(format!(
                        "kernel `{name}` takes its parameter by reference; kernels take one params struct by value"
                    )));
                }
                let mut ty: Vec<&str> = words
                    .iter()
                    .copied()
                    .filter(|w| !matches!(*w, "const" | "__restrict__" | "__grid_constant__"))
                    .collect();
                if ty.len() >= 2 && toks[params[0][params[0].len() - 1]].kind == Kind::Ident && {
                    let prev = ty[ty.len() - 2];
                    prev != "::"
                } {
                    ty.pop();
                }
                ty.join(" ")
            }
        }
        n => {
            return Err(perr(format!(
                "kernel `{name}` takes {n} parameters; the emulator registry needs exactly one params struct passed \
                 by value (wrap the arguments in a struct)"
            )))
        }
    };
    Ok(Some(PendingKernel {
        name,
        params_type,
        line,
        launch_bounds,
    }))
}

/// Translates one `__shared__` statement (tokens `from..=semi`). Also returns the
/// explicit alignment of an `extern __shared__` declaration.
fn shared_decl(
    src: &str,
    toks: &[Tok],
    from: usize,
    semi: usize,
    path: &Path,
) -> Result<(String, Option<String>), BuildError> {
    let t = |i: usize| &src[toks[i].start..toks[i].end];
    let line = toks
        .iter()
        .take(semi + 1)
        .skip(from)
        .find(|tk| &src[tk.start..tk.end] == "__shared__")
        .map_or(toks[from].line, |tk| tk.line);
    let perr = |message: String| BuildError::Parse {
        file: path.to_path_buf(),
        line,
        message,
    };
    let mut is_extern = false;
    let mut align = String::from("0");
    let mut rest: Vec<usize> = Vec::new();
    let mut i = from;
    while i < semi {
        let s = t(i);
        match s {
            "__shared__" | "static" | "__device__" | "__restrict__" => {}
            "extern" => is_extern = true,
            "__align__" | "alignas" | "__attribute__" => {
                // Balanced parens; extract the alignment value.
                let open = i + 1;
                if open >= semi || t(open) != "(" {
                    return Err(perr(format!(
                        "cannot parse `{s}` in a `__shared__` declaration"
                    )));
                }
                let mut depth = 0;
                let mut j = open;
                while j < semi {
                    match t(j) {
                        "(" => depth += 1,
                        ")" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                if j >= semi {
                    return Err(perr(format!("unbalanced parentheses after `{s}`")));
                }
                let inner: Vec<&str> = (open + 1..j).map(t).collect();
                let value: Vec<&str> = if s == "__attribute__" {
                    // ((aligned(N)))
                    let pos = inner
                        .iter()
                        .position(|w| *w == "aligned" || *w == "__aligned__");
                    match pos {
                        Some(p) if p + 1 < inner.len() && inner[p + 1] == "(" => inner[p + 2..]
                            .iter()
                            .copied()
                            .take_while(|w| *w != ")")
                            .collect(),
                        _ => {
                            return Err(perr(
                                "unsupported __attribute__ in a `__shared__` declaration".into(),
                            ))
                        }
                    }
                } else {
                    inner
                };
                if value.is_empty() {
                    return Err(perr(format!("empty `{s}` in a `__shared__` declaration")));
                }
                align = format!("({})", value.join(" "));
                i = j;
            }
            "=" => {
                return Err(perr(
                    "`__shared__` variables cannot have initializers".into(),
                ));
            }
            _ => rest.push(i),
        }
        i += 1;
    }
    // Split declarators at top-level commas.
    let mut decls: Vec<Vec<usize>> = vec![Vec::new()];
    let (mut paren, mut angle) = (0i32, 0i32);
    for &k in &rest {
        match t(k) {
            "(" | "[" => paren += 1,
            ")" | "]" => paren -= 1,
            "<" if paren == 0 => angle += 1,
            ">" if paren == 0 && angle > 0 => angle -= 1,
            "," if paren == 0 && angle == 0 => {
                decls.push(Vec::new());
                continue;
            }
            _ => {}
        }
        if let Some(d) = decls.last_mut() {
            d.push(k);
        }
    }
    let join = |ids: &[usize]| ids.iter().map(|&k| t(k)).collect::<Vec<_>>().join(" ");
    let mut base_type: Option<String> = None;
    let mut out = Vec::new();
    for (n, d) in decls.iter().enumerate() {
        // name = last identifier before the first top-level `[`
        let bracket = d.iter().position(|&k| t(k) == "[").unwrap_or(d.len());
        let name_pos = d[..bracket]
            .iter()
            .rposition(|&k| toks[k].kind == Kind::Ident);
        let Some(name_pos) = name_pos else {
            return Err(perr(
                "cannot find the variable name in this `__shared__` declaration".into(),
            ));
        };
        if d[..bracket].iter().any(|&k| matches!(t(k), "(" | ")")) {
            return Err(perr(
                "cannot parse this `__shared__` declaration (parentheses in the declarator)".into(),
            ));
        }
        let name = t(d[name_pos]);
        let dims = &d[bracket..];
        let ty = if n == 0 {
            let prefix = &d[..name_pos];
            if prefix.is_empty() {
                return Err(perr(format!("`__shared__` variable `{name}` has no type")));
            }
            let base_end = prefix
                .iter()
                .rposition(|&k| !matches!(t(k), "*" | "&"))
                .map_or(0, |p| p + 1);
            base_type = Some(join(&prefix[..base_end]));
            join(prefix)
        } else {
            let stars = join(&d[..name_pos]);
            format!("{} {stars}", base_type.clone().unwrap_or_default())
        };
        if is_extern {
            let dims_text = join(dims);
            if !dims_text.starts_with("[ ]") {
                return Err(perr(format!(
                    "`extern __shared__ {name}` must be an array of unknown size (`{name}[]`)"
                )));
            }
            let inner = dims_text.trim_start_matches("[ ]").trim();
            out.push(format!(
                "LINATTN_EMU_EXTERN_SHARED({align}, {name}, {ty} {inner})"
            ));
        } else {
            let dims_text = join(dims);
            if dims_text.contains("[ ]") {
                return Err(perr(format!(
                    "`__shared__ {name}[]` needs a size (or `extern`)"
                )));
            }
            out.push(format!(
                "LINATTN_EMU_SHARED({align}, {name}, {ty} {dims_text})"
            ));
        }
    }
    let extern_align = (is_extern && align != "0").then_some(align);
    Ok((format!("{};", out.join("; ")), extern_align))
}
