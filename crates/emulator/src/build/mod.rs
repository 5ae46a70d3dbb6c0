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

mod lex;
mod registry;
mod rewrite;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use registry::registry_source;
pub use rewrite::rewrite;

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
