//! The driver probe (`linattn_kernels::driver_present`) opens libcuda itself,
//! so it answers the same whichever linking mode cargo unified cudarc to.
//! Without candle's `cuda` feature cudarc is in its dynamic-loading mode here,
//! where cudarc's own `is_culib_present` exists: the two must agree. (With
//! `cuda`, cudarc is linked dynamically and a binary only starts where
//! libcuda is; `tests/cuda.rs` runs there.)
#![cfg(not(feature = "cuda"))]

#[test]
fn probe_agrees_with_cudarc_dynamic_loading() {
    let ours = std::panic::catch_unwind(linattn_kernels::driver_present)
        .expect("the probe must not panic");
    // SAFETY: only tries to load the library.
    let cudarc = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() })
        .unwrap_or(false);
    assert_eq!(
        ours, cudarc,
        "driver_present() = {ours}, cudarc's is_culib_present() = {cudarc}"
    );
    if !ours {
        assert!(matches!(
            linattn_kernels::device_count(),
            Err(linattn_kernels::Error::NoDriver)
        ));
        assert!(matches!(
            linattn_kernels::Gpu::new(0),
            Err(linattn_kernels::Error::NoDriver)
        ));
        eprintln!("no CUDA driver here: both say so, and the kernels answer NoDriver");
    }
}
