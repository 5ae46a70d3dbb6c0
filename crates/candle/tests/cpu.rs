//! linattn-candle on candle CPU tensors: every body of `common` on
//! `Device::Cpu`. `LINATTN_CANDLE_SEEDS=<n>` runs each randomised body over n
//! seeds (default 2).

mod common;

use candle_core::{DType, Device};

#[test]
fn forward_matches_reference_f32() {
    let e = common::forward_matches_reference(&Device::Cpu, DType::F32);
    eprintln!("worst forward/state rel L2 (f32): {e:.2e}");
}

#[test]
fn forward_matches_reference_f16_bf16() {
    for dt in [DType::F16, DType::BF16] {
        let e = common::forward_matches_reference(&Device::Cpu, dt);
        eprintln!("worst forward/state rel L2 ({dt:?}): {e:.2e}");
    }
}

#[test]
fn forward_matches_candle_formula() {
    let e = common::forward_matches_candle_formula(&Device::Cpu);
    eprintln!("worst rel L2 vs candle ops: {e:.2e}");
}

#[test]
fn gradients_match_reference_f32() {
    let e = common::gradients_match_reference(&Device::Cpu, DType::F32);
    eprintln!("worst gradient rel L2 (f32): {e:.2e}");
}

#[test]
fn gradients_match_reference_f16_bf16() {
    for dt in [DType::F16, DType::BF16] {
        let e = common::gradients_match_reference(&Device::Cpu, dt);
        eprintln!("worst gradient rel L2 ({dt:?}): {e:.2e}");
    }
}

#[test]
fn prefill_then_decode_equals_one_pass() {
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let e = common::prefill_then_decode(&Device::Cpu, dt);
        eprintln!("worst prefill+decode rel L2 ({dt:?}): {e:.2e}");
    }
}

#[test]
fn varlen_matches_per_sequence() {
    let e = common::varlen_matches_per_sequence(&Device::Cpu);
    eprintln!("worst varlen rel L2: {e:.2e}");
}

#[test]
fn varlen_without_tokens() {
    common::varlen_without_tokens(&Device::Cpu);
}

#[test]
fn strided_inputs() {
    common::strided_inputs(&Device::Cpu);
}

#[test]
fn bad_inputs() {
    common::bad_inputs(&Device::Cpu);
}

#[test]
fn tiny_model_trains() {
    let (first, last) = common::tiny_model_trains(&Device::Cpu);
    eprintln!("tiny model loss {first:.3} -> {last:.3}");
}
