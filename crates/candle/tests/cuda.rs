//! linattn-candle on a CUDA device: the bodies of `common` (the same as
//! `tests/cpu.rs`) on `Device::new_cuda(0)`, where the op runs the project's
//! kernels on candle's stream. Built with the `cuda` feature only:
//!
//! `cargo test -p linattn-candle --features cuda --test cuda`
//!
//! `LINATTN_TEST_DEVICES` as in the workspace's tests (`tests/common`):
//! unset or `all`, a test without a usable CUDA device (no driver, no
//! device, kernels not built) says why on stderr and checks nothing; `gpu`
//! (how `scripts/gpu-check.sh` runs this binary) makes that a failure
//! naming why, so a GPU run never passes on nothing; `emulator` skips
//! (candle has no emulator device); anything else fails. With the `cuda`
//! feature, candle links libcuda, so this binary only starts where a
//! driver is installed; the checks here cover a driver without a usable
//! device.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device};
use linattn_kernels::BuildStatus;

/// Why no test can run on CUDA here, if so.
fn unusable() -> Option<String> {
    if !linattn_kernels::driver_present() {
        return Some("no CUDA driver (libcuda could not be loaded)".into());
    }
    if let BuildStatus::NotBuilt(why) = linattn_kernels::build_status() {
        return Some(format!("the kernels were not built ({why})"));
    }
    None
}

/// The CUDA device the tests run on, or `None` (said on stderr) when there
/// is none and the run did not ask for the GPU only.
fn cuda() -> Option<Device> {
    let wanted = std::env::var("LINATTN_TEST_DEVICES").unwrap_or_default();
    let gpu_only = match wanted.trim() {
        "" | "all" => false,
        "gpu" => true,
        "emulator" => {
            eprintln!("GPU skipped: LINATTN_TEST_DEVICES=emulator (candle has no emulator device)");
            return None;
        }
        other => panic!("LINATTN_TEST_DEVICES={other:?}: expected `gpu`, `emulator` or `all`"),
    };
    let why = match unusable() {
        Some(why) => why,
        None => match Device::new_cuda(0) {
            Ok(d) => return Some(d),
            Err(e) => format!("no CUDA device ({e})"),
        },
    };
    if gpu_only {
        panic!("LINATTN_TEST_DEVICES=gpu, but GPU skipped: {why}");
    }
    eprintln!("GPU skipped: {why}");
    None
}

#[test]
fn cuda_forward_matches_reference() {
    let Some(dev) = cuda() else { return };
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let e = common::forward_matches_reference(&dev, dt);
        eprintln!("cuda: worst forward/state rel L2 ({dt:?}): {e:.2e}");
    }
}

#[test]
fn cuda_forward_matches_candle_formula() {
    let Some(dev) = cuda() else { return };
    let e = common::forward_matches_candle_formula(&dev);
    eprintln!("cuda: worst rel L2 vs candle ops: {e:.2e}");
}

#[test]
fn cuda_gradients_match_reference() {
    let Some(dev) = cuda() else { return };
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let e = common::gradients_match_reference(&dev, dt);
        eprintln!("cuda: worst gradient rel L2 ({dt:?}): {e:.2e}");
    }
}

#[test]
fn cuda_prefill_then_decode_equals_one_pass() {
    let Some(dev) = cuda() else { return };
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let e = common::prefill_then_decode(&dev, dt);
        eprintln!("cuda: worst prefill+decode rel L2 ({dt:?}): {e:.2e}");
    }
}

#[test]
fn cuda_varlen_matches_per_sequence() {
    let Some(dev) = cuda() else { return };
    let e = common::varlen_matches_per_sequence(&dev);
    eprintln!("cuda: worst varlen rel L2: {e:.2e}");
}

#[test]
fn cuda_strided_inputs() {
    let Some(dev) = cuda() else { return };
    common::strided_inputs(&dev);
}

#[test]
fn cuda_bad_inputs() {
    let Some(dev) = cuda() else { return };
    common::bad_inputs(&dev);
}

#[test]
fn cuda_tiny_model_trains() {
    let Some(dev) = cuda() else { return };
    let (first, last) = common::tiny_model_trains(&dev);
    eprintln!("cuda: tiny model loss {first:.3} -> {last:.3}");
}

#[test]
fn cuda_varlen_without_tokens() {
    let Some(dev) = cuda() else { return };
    common::varlen_without_tokens(&dev);
}
