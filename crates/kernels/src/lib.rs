//! Hand-written CUDA kernels for linear attention ("Transformers are RNNs",
//! Katharopoulos et al. 2020), with safe Rust wrappers over `cudarc` and a
//! CPU emulator that runs the very same `.cu` sources.
//!
//! The data path reads in one direction: a call's shapes are validated, a
//! [`LaunchPlan`] is built (grid, block, shared memory, a params struct from
//! `cuda/include/linattn/params.h`), and an [`Executor`] runs it: a [`Gpu`]
//! (a CUDA stream) or, with the `emulator` feature, the CPU `Emulator`.
//!
//! Nothing here panics or aborts on a machine without a GPU: a missing driver
//! is [`Error::NoDriver`], a build without nvcc is [`Error::KernelsNotBuilt`].
//! On such a machine `Device::Emulator(Arc::new(Emulator::new()?))` (feature
//! `emulator`) runs every kernel on the CPU; [`Device::best_available`] picks
//! it when no GPU is usable.
//!
//! Where to look:
//! - the ops: [`forward()`], [`backward()`], [`decode_step`], [`feature_map()`]
//!   (typed memory) and their `_raw` twins (device addresses); their
//!   options, [`AttentionOptions`]: feature map, normalisation, schedule,
//!   dq precision ([`DqPrecision`]) and, for f16 inputs whose elu+1 keys
//!   can fall below about -10, bf16 tiles ([`F16Tiles`]);
//! - context parallelism (one sequence across ranks, states exchanged by an
//!   all-gather): [`ContextParallel`] over a [`Collective`] ([`InProcess`];
//!   NCCL with the `nccl` feature), and its primitives [`local_state`],
//!   [`combine_states`], [`noncausal_readout`], [`add_state_gradient`]
//!   (`docs/context-parallel.md`);
//! - the math and every kernel: `docs/linear-attention.md`, `docs/kernels.md`.
//!
//! Prefill a prompt with the chunked causal kernel, keep the fp32 state, then
//! generate in RNN mode: each decode step costs the same whatever the
//! position. Runs on the GPU when there is one, else on the CPU emulator.
//!
//! ```
//! use linattn_kernels::{
//!     decode_step, forward, AttentionOptions, AttentionShape, DecodeShape, Device, Error, Kind,
//!     Qkv, StateIo, StateMut,
//! };
//!
//! # fn main() -> Result<(), Error> {
//! let dev = match Device::best_available() {
//!     Ok(dev) => dev,
//!     Err(e) => { eprintln!("skipping: {e}"); return Ok(()); }
//! };
//! let (b, h, n, d, m) = (1, 2, 40, 16, 16);
//! let rand = |len: usize, seed: u32| -> Vec<f32> {
//!     (0..len).map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) % 1000).map(|x| x as f32 / 500.0 - 1.0).collect()
//! };
//! // Prefill: q, k, v in [B, N, H, D] layout, one causal pass, final state out.
//! let shape = AttentionShape::bnhd(b, h, n, d, m);
//! let (q, k, v) = (dev.upload(&rand(b * n * h * d, 1))?, dev.upload(&rand(b * n * h * d, 2))?,
//!                  dev.upload(&rand(b * n * h * m, 3))?);
//! let mut o = dev.upload(&vec![f32::NAN; b * n * h * m])?;
//! let mut s = dev.upload(&vec![0f32; b * h * d * m])?; // fp32 state S: D x M per head
//! let mut z = dev.upload(&vec![0f32; b * h * d])?;     // fp32 normaliser z: D per head
//! let opts = AttentionOptions::default(); // elu+1, normalised, eps 1e-6, scale 1
//! let states = StateIo::final_only(StateMut { s: &mut s, z: &mut z });
//! match forward(Kind::Causal, &dev, Qkv { q: &q, k: &k, v: &v }, &mut o, &shape, None, &opts, states) {
//!     Err(e @ Error::KernelsNotBuilt { .. }) => { eprintln!("{e}"); return Ok(()); }
//!     r => r?,
//! }
//! // Decode: one new token per (batch, head); the state is updated in place.
//! let step = DecodeShape::contiguous(b, h, d, m);
//! for t in 0..4 {
//!     let (qt, kt, vt) = (dev.upload(&rand(b * h * d, 10 + t))?, dev.upload(&rand(b * h * d, 20 + t))?,
//!                         dev.upload(&rand(b * h * m, 30 + t))?);
//!     let mut ot = dev.upload(&vec![f32::NAN; b * h * m])?;
//!     decode_step(&dev, Qkv { q: &qt, k: &kt, v: &vt }, &mut ot, &mut s, &mut z, &step, &opts)?;
//!     let out = dev.download(&ot)?;
//!     // elu+1 makes the output a convex combination of the values seen so far.
//!     assert!(out.iter().all(|x| x.is_finite() && x.abs() <= 1.0));
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod device;
pub mod dtype;
mod embedded;
#[cfg(feature = "emulator")]
mod emu;
mod error;
mod gpu;
pub mod ops;
pub mod params;
#[rustfmt::skip]
mod params_sys;
pub mod plan;
pub mod target;

pub use device::{Buffer, Device};
pub use dtype::{DType, Element};
pub use embedded::{build_status, embedded_modules, ptxas_report, BuildStatus, KernelResources};
#[cfg(feature = "emulator")]
pub use emu::Emulator;
pub use error::{Error, Result};
pub use gpu::{device_count, driver_present, DeviceInfo, Gpu, SYNC_LAUNCHES_ENV};
#[cfg(feature = "nccl")]
pub use ops::NcclCollective;
pub use ops::{
    add_state_gradient, combine_states, local_state, noncausal_readout, piece_offsets, Collective,
    ContextParallel, InProcess, PieceInputs, PieceStart, StateLayout,
};
pub use ops::{
    backward, backward_raw, decode_step, decode_step_raw, feature_map, feature_map_raw, forward,
    forward_raw, AttentionOptions, AttentionShape, BackwardInputs, BackwardStates, DecodeShape,
    DeviceRead, DeviceWrite, DqPrecision, F16Tiles, Grads, Kind, Memory, Qkv, RawBackward,
    RawDecode, RawForward, RowStrides, RowsShape, ScheduleChoice, StateIo, StateMut, StateRef,
    Strides,
};
pub use plan::{Executor, LaunchPlan};
pub use target::{KernelFootprint, Target};

/// Whether this build includes the CPU emulator (feature `emulator`).
pub const EMULATOR_BUILT: bool = cfg!(feature = "emulator");

/// The feature map phi applied to queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FeatureMap {
    /// elu(x) + 1: positive everywhere (the paper's default).
    #[default]
    EluPlusOne,
    /// max(x, 0).
    Relu,
    /// The caller already applied a map.
    Identity,
}

impl FeatureMap {
    /// The `LinattnFeatureMap` value the kernels take.
    pub fn to_c(self) -> i32 {
        use params::LinattnFeatureMap as C;
        (match self {
            FeatureMap::EluPlusOne => C::LINATTN_FEATURE_MAP_ELU_PLUS_ONE,
            FeatureMap::Relu => C::LINATTN_FEATURE_MAP_RELU,
            FeatureMap::Identity => C::LINATTN_FEATURE_MAP_IDENTITY,
        }) as i32
    }

    /// phi(x) in f64, the same definition the kernels use (for host-side checks).
    pub fn apply(self, x: f64) -> f64 {
        match self {
            FeatureMap::EluPlusOne => {
                if x > 0.0 {
                    x + 1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => x.max(0.0),
            FeatureMap::Identity => x,
        }
    }
}
