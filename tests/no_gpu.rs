//! The no-driver and no-device paths return errors; nothing panics.

use linattn_kernels::{device_count, driver_present, Error, Gpu};

#[test]
fn opening_a_gpu_never_panics() {
    let r = std::panic::catch_unwind(|| Gpu::new(0).map(|_| ()));
    let r = r.expect("Gpu::new must not panic");
    if !driver_present() {
        assert!(
            matches!(r, Err(Error::NoDriver)),
            "expected NoDriver, got {r:?}"
        );
        assert!(matches!(device_count(), Err(Error::NoDriver)));
        println!("no CUDA driver here: Gpu::new returned {}", r.unwrap_err());
    } else {
        match r {
            Ok(()) | Err(Error::NoDevice { .. }) => {}
            Err(e) => panic!("unexpected error with a driver present: {e}"),
        }
    }
}

#[test]
fn out_of_range_ordinal_is_an_error() {
    let r = Gpu::new(10_000);
    assert!(
        matches!(r, Err(Error::NoDriver) | Err(Error::NoDevice { .. })),
        "{r:?}"
    );
}

#[test]
fn info_report_describes_everything() {
    let s = linattn::info::report();
    assert!(s.contains("device code:"));
    assert!(s.contains("driver:"));
    if let linattn_kernels::BuildStatus::Built { .. } = linattn_kernels::build_status() {
        assert!(s.contains("feature_map_f32"), "ptxas report missing:\n{s}");
        assert!(s.contains("sm_80") && s.contains("PTX"), "{s}");
    }
}
