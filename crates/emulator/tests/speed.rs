//! Speed measurement (not an assertion): `cargo test -p linattn-emulator --release
//! --test speed -- --ignored --nocapture`, or run the `emu_bench` example.

#[path = "../examples/emu_bench.rs"]
#[allow(dead_code)]
mod emu_bench;

#[test]
#[ignore = "measurement; prints numbers"]
fn fiber_switch_and_scan_speed() {
    let (switch_ns, emu, scalar, diff) = emu_bench::measure();
    println!("fiber switch: {switch_ns:.1} ns");
    println!(
        "causal scan: emulated {:.2} ms, scalar {:.2} ms, ratio {:.2}x",
        emu * 1e3,
        scalar * 1e3,
        emu / scalar
    );
    assert!(
        diff < 1e-3,
        "emulated scan differs from the scalar loop by {diff}"
    );
}

#[test]
fn emulated_scan_matches_the_scalar_loop() {
    // The same kernel as the measurement, checked for correctness in every run.
    let (_, _, _, diff) = emu_bench::measure();
    assert!(
        diff < 1e-3,
        "emulated scan differs from the scalar loop by {diff}"
    );
}
