//! Shared by the cross-crate kernel tests: which executors to run on, and
//! conversions between kernel dtypes and the reference's f64.
//!
//! `LINATTN_TEST_DEVICES` picks the executors [`devices`] returns:
//! `all` (the default: the GPU when usable, and always the emulator), `gpu`
//! (the GPU only; `scripts/gpu-check.sh` uses it so its test step measures
//! the GPU and not the emulator again) or `emulator` (the emulator only).
//! With `gpu` and no usable GPU, every test that asks for devices fails with
//! "GPU skipped: ..." instead of passing on nothing. Any other value fails
//! the same way, naming the variable.
#![allow(dead_code)]

use std::sync::Arc;

use linattn_kernels::{AttentionOptions, AttentionShape, Strides};
use linattn_kernels::{BuildStatus, Device, Element, FeatureMap, Gpu};
use linattn_reference::{Layout, LinearAttentionOptions};

/// The executors `LINATTN_TEST_DEVICES` asks for (see the module doc): the
/// GPU when a driver, a device and built kernels are present, and the CPU
/// emulator (with its two-schedule race check on). Prints why the GPU is
/// skipped; panics when the GPU alone was asked for and is not usable, or
/// when the variable holds anything else.
pub fn devices() -> Vec<Device> {
    let wanted = std::env::var("LINATTN_TEST_DEVICES").unwrap_or_default();
    let (gpu, emulator) = match wanted.trim() {
        "" | "all" => (true, true),
        "gpu" => (true, false),
        "emulator" => (false, true),
        other => panic!("LINATTN_TEST_DEVICES={other:?}: expected `gpu`, `emulator` or `all`"),
    };
    let mut out = Vec::new();
    if gpu {
        let skipped = match (Gpu::new(0), linattn_kernels::build_status()) {
            (Ok(g), BuildStatus::Built { .. }) => {
                out.push(Device::Gpu(Arc::new(g)));
                None
            }
            (Ok(_), BuildStatus::NotBuilt(why)) => Some(format!(
                "GPU present but kernels not built ({why}): GPU skipped"
            )),
            (Err(e), _) => Some(format!("GPU skipped: {e}")),
        };
        match skipped {
            Some(why) if !emulator => panic!("LINATTN_TEST_DEVICES=gpu, but {why}"),
            Some(why) => eprintln!("{why}"),
            None => {}
        }
    }
    if emulator {
        out.push(Device::Emulator(Arc::new(
            linattn_kernels::Emulator::checked().expect("the emulator is compiled into tests"),
        )));
    }
    out
}

/// Rounds f64 data to the kernel dtype.
pub fn to_dtype<T: Element>(xs: &[f64]) -> Vec<T> {
    xs.iter().map(|&x| T::from_f64(x)).collect()
}

/// Widens kernel data to f64.
pub fn to_f64<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|&x| x.to_f64()).collect()
}

/// The relative-norm thresholds of DEVELOPERS.md: fp32 well under 1e-5, 16-bit inputs under 1e-2.
pub fn tolerance<T: Element>(f32_tol: f64, f16_tol: f64, bf16_tol: f64) -> f64 {
    match T::DTYPE {
        linattn_kernels::DType::F32 => f32_tol,
        linattn_kernels::DType::F16 => f16_tol,
        linattn_kernels::DType::Bf16 => bf16_tol,
    }
}

/// The reference's name for a kernel feature map.
pub fn ref_map(m: FeatureMap) -> linattn_reference::FeatureMap {
    match m {
        FeatureMap::EluPlusOne => linattn_reference::FeatureMap::EluPlusOne,
        FeatureMap::Relu => linattn_reference::FeatureMap::Relu,
        FeatureMap::Identity => linattn_reference::FeatureMap::Identity,
    }
}

/// The reference options matching kernel options (eps and scale widened from f32).
pub fn ref_opts(o: &AttentionOptions) -> LinearAttentionOptions {
    LinearAttentionOptions {
        feature_map: ref_map(o.feature_map),
        normalize: o.normalize,
        eps: o.eps as f64,
        scale: o.scale as f64,
    }
}

/// The reference layout of one kernel tensor (`dim` wide, with its strides).
pub fn layout(shape: &AttentionShape, s: &Strides, dim: usize) -> Layout {
    Layout {
        batch: shape.batch,
        heads: shape.heads,
        tokens: shape.tokens,
        dim,
        batch_stride: s.batch,
        token_stride: s.token,
        head_stride: s.head,
    }
}

/// Elements a buffer with this layout must hold.
pub fn span(shape: &AttentionShape, s: &Strides, dim: usize) -> usize {
    layout(shape, s, dim).required_len().unwrap()
}
