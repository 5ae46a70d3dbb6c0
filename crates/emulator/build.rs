//! Compiles the emulator's own test kernels (tests/cuda/*.cu) when the
//! `test-kernels` feature is on, with the same helper that kernel crates use.

#[path = "src/build/mod.rs"]
#[allow(unreachable_pub)]
mod emu_build;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/build");
    println!("cargo:rerun-if-changed=tests/cuda");
    if std::env::var_os("CARGO_FEATURE_TEST_KERNELS").is_none() {
        return;
    }
    let mut sources: Vec<std::path::PathBuf> = std::fs::read_dir("tests/cuda")
        .expect("tests/cuda")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    if let Err(e) = emu_build::Build::new("linattn_emu_test_kernels")
        .sources(&sources)
        .compile()
    {
        eprintln!("{e}");
        panic!("{e}");
    }
}
