//! linattn-candle on a CUDA device: the bodies of `common` (the same as
//! `tests/cpu.rs`) on `Device::new_cuda(0)`, where the op runs the project's
//! kernels on candle's stream. Built with the `cuda` feature only:
//!
//! `cargo test -p linattn-candle --features cuda --test cuda`
//!
//! Without a CUDA device each test says so on stderr and passes.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device};

fn cuda() -> Option<Device> {
    if !linattn_kernels::driver_present() {
        eprintln!("skipping: no CUDA driver");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
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
