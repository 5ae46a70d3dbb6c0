//! The operations, one module per kernel family, and the vocabulary they
//! share. Each family has the same shape: entry points on typed memory (a
//! [`crate::Device`] with [`crate::Buffer`]s, or a [`crate::Gpu`] with
//! cudarc memory: [`Memory`]) and on raw device addresses, both validating
//! the call and running one plain-Rust plan (unit-tested without a GPU).
//!
//! Everything a caller needs is re-exported here and at the crate root:
//!
//! | op | typed memory | raw addresses |
//! | --- | --- | --- |
//! | forward | [`forward()`] | [`forward_raw`] ([`RawForward`]) |
//! | backward | [`backward()`] | [`backward_raw`] ([`RawBackward`]) |
//! | decode | [`decode_step`] | [`decode_step_raw`] ([`RawDecode`]) |
//! | feature map | [`feature_map()`] | [`feature_map_raw`] |
//! | context parallel | [`local_state`], [`combine_states`], [`noncausal_readout`], [`ContextParallel`] over a [`Collective`] | the forward/backward `*_raw` entry points |
//!
//! Causality is an argument ([`Kind`]) of the forward and backward entry
//! points. Shapes and options: [`AttentionShape`] ([`Strides`]), [`AttentionOptions`]
//! ([`ScheduleChoice`]), [`DecodeShape`] ([`RowStrides`]), [`RowsShape`];
//! arguments: [`Qkv`], [`StateIo`] ([`StateRef`], [`StateMut`]),
//! [`BackwardInputs`], [`Grads`], [`BackwardStates`]. The tiling and
//! schedule policies are internal; [`tuning`] exposes them to tests and
//! benches.

pub mod attention;
pub mod backward;
pub(crate) mod checks;
pub mod context_parallel;
pub mod decode;
pub mod feature_map;
pub mod forward;
mod memory;
mod temp;
pub mod tuning;

pub use attention::{
    AttentionOptions, AttentionShape, DqPrecision, F16Tiles, Kind, Qkv, ScheduleChoice, StateIo,
    StateMut, StateRef, Strides, MAX_DIM,
};
pub use backward::{backward, backward_raw, BackwardInputs, BackwardStates, Grads, RawBackward};
#[cfg(feature = "nccl")]
pub use context_parallel::NcclCollective;
pub use context_parallel::{
    add_state_gradient, combine_states, local_state, noncausal_readout, piece_offsets, Collective,
    ContextParallel, InProcess, PieceInputs, PieceStart, StateLayout,
};
pub use decode::{decode_step, decode_step_raw, DecodeShape, RawDecode, RowStrides};
pub use feature_map::{feature_map, feature_map_raw, RowsShape};
pub use forward::{forward, forward_raw, RawForward};
pub use memory::{DeviceRead, DeviceWrite, Memory};
