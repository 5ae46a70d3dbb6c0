//! The backward kernels (`cuda/backward.cu`, one module for both kinds):
//! gradients of linear attention with
//! respect to q, k, v and the initial state, feature map and normaliser
//! differentiated inside the kernels.
//!
//! Same conventions as [`crate::ops::forward`](mod@crate::ops::forward): the shape is an
//! [`AttentionShape`] (+ optional host `cu_seqlens` for packed varlen
//! batches), the options are the forward's [`AttentionOptions`] (its
//! `schedule` also picks walk or split for the whole-head walks), states
//! are fp32, one per (sequence, head). Every gradient uses the strides of
//! its primal: `dq` those of q, `dk` of k, `dv` of v, and the incoming
//! `d_o` (dL/do) those of o.
//!
//! What the forward must keep for the backward: only its inputs (q, k, v
//! and the initial state if any). No output, no N x N matrix, no per-token
//! or per-chunk state: the kernels recompute the prefix (dq) and suffix
//! (dk, dv) states chunk by chunk, and the normaliser's pieces.
//!
//! Entry points, causal or not by [`Kind`]: [`backward()`] on typed memory
//! ([`Memory`]), [`backward_raw`] on device addresses ([`RawBackward`]). Both
//! validate ([`validate`]) and run one plan (`plan.rs`, in named steps; the
//! launch sequences are described in `docs/kernels.md`); tiling and
//! policies live in `tiling.rs` (see [`crate::ops::tuning`]).

pub(crate) mod plan;
#[cfg(test)]
mod tests;
pub(crate) mod tiling;

pub use plan::{validate, workspace_len, BackwardProblem, GradLens, RawBackward};

use self::plan::{check_raw, op_name, run_plan};
use super::attention::{AttentionOptions, AttentionShape, Kind, StateMut, StateRef};
use super::forward::Lens;
use super::memory::{Addrs, DeviceRead, DeviceWrite, Memory};
use crate::dtype::{DType, Element};
use crate::plan::Executor;
use crate::Result;

/// The tensors a backward call reads: the forward's inputs and dL/do.
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a, B> {
    /// Queries, `d` wide.
    pub q: &'a B,
    /// Keys, `d` wide.
    pub k: &'a B,
    /// Values, `m` wide.
    pub v: &'a B,
    /// dL/do (strides of o).
    pub d_o: &'a B,
}

/// The gradient buffers a call writes (each with its primal's strides).
#[derive(Debug)]
pub struct Grads<'a, B> {
    /// dL/dq.
    pub dq: &'a mut B,
    /// dL/dk.
    pub dk: &'a mut B,
    /// dL/dv.
    pub dv: &'a mut B,
}

/// The states of a backward call (all fp32, one per sequence-head).
///
/// `I` is the memory type of the states read, `F` of the one written. When
/// a call leaves one of them out (say `d_initial: None`), Rust cannot infer
/// its type: name both, `BackwardStates::<'_, Buffer<f32>, Buffer<f32>> {
/// .. }` for [`crate::Device`] memory, as [`BackwardStates::none`] does.
#[derive(Debug)]
pub struct BackwardStates<'a, I, F> {
    /// The initial state the forward started from (zeros when `None`).
    pub initial: Option<StateRef<'a, I>>,
    /// A gradient flowing into the forward's final state, if any.
    pub d_final: Option<StateRef<'a, I>>,
    /// Receives dL/dS0 and dL/dz0 (the gradient at the initial state, also
    /// when that was zeros).
    pub d_initial: Option<StateMut<'a, F>>,
}

impl BackwardStates<'_, crate::Buffer<f32>, crate::Buffer<f32>> {
    /// No states at all (for [`crate::Device`] calls; with cudarc memory
    /// name the types, as for [`crate::StateIo::none`]).
    pub fn none() -> Self {
        BackwardStates {
            initial: None,
            d_final: None,
            d_initial: None,
        }
    }
}

/// Gradients of [`forward()`](crate::forward()) of the same `kind`: writes
/// dq, dk, dv (strides of q, k, v) and, when `states.d_initial` is given,
/// dL/dS0 and dL/dz0. `x.d_o` is dL/do (strides of o); `states.initial`
/// must be the initial state the forward started from, and
/// `states.d_final` an optional gradient flowing into its final state.
/// `cu_seqlens` (host offsets) makes it a packed varlen call
/// (`shape.batch == 1`).
///
/// `exec` and memory as for [`forward()`](crate::forward()). The typed
/// path: lengths from the memory, temporaries from the executor, addresses
/// gathered once, then the raw path's launch.
///
/// Errors: [`crate::Error::InvalidArgument`] naming the argument for a bad
/// shape, option, length, overlapping gradient rows or memory of another
/// device; driver errors from the launches.
#[allow(clippy::too_many_arguments)]
pub fn backward<E, T, B, G, I, F>(
    kind: Kind,
    exec: &E,
    x: BackwardInputs<'_, B>,
    grads: Grads<'_, G>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: BackwardStates<'_, I, F>,
) -> Result<()>
where
    E: Memory,
    T: Element,
    B: DeviceRead<T, E>,
    G: DeviceWrite<T, E>,
    I: DeviceRead<f32, E>,
    F: DeviceWrite<f32, E>,
{
    let kernel = op_name(kind);
    let pair = |s: &StateRef<'_, I>| (s.s.elems(), s.z.elems());
    let lens = Lens {
        q: x.q.elems(),
        k: x.k.elems(),
        v: x.v.elems(),
        o: usize::MAX,
        initial: states.initial.as_ref().map(pair),
        final_state: None,
    };
    let glens = GradLens {
        d_o: x.d_o.elems(),
        dq: grads.dq.elems(),
        dk: grads.dk.elems(),
        dv: grads.dv.elems(),
        d_final: states.d_final.as_ref().map(pair),
        d_initial: states
            .d_initial
            .as_ref()
            .map(|s| (s.s.elems(), s.z.elems())),
    };
    let bp = validate(
        kernel,
        T::DTYPE,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &glens,
        &exec.target(),
    )?;
    let (_tc, cu) = exec.offsets(&bp.problem.cu_seqlens, kernel)?;
    let ws_floats = workspace_len(&bp);
    let (_tw, ws) = exec.workspace(ws_floats, kernel)?;
    let mut a = Addrs::new(exec, kernel);
    let (q, k, v) = (a.read(x.q, "q")?, a.read(x.k, "k")?, a.read(x.v, "v")?);
    let d_o = a.read(x.d_o, "d_o")?;
    let (initial_s, initial_z) = a.state(states.initial.as_ref(), ["initial.s", "initial.z"])?;
    let (d_final_s, d_final_z) = a.state(states.d_final.as_ref(), ["d_final.s", "d_final.z"])?;
    let Grads { dq, dk, dv } = grads;
    let (dq, dk, dv) = (a.write(dq, "dq")?, a.write(dk, "dk")?, a.write(dv, "dv")?);
    let (d_initial_s, d_initial_z) =
        a.state_mut(states.d_initial, ["d_initial.s", "d_initial.z"])?;
    let ptrs = RawBackward {
        q,
        k,
        v,
        d_o,
        dq,
        dk,
        dv,
        initial_s,
        initial_z,
        d_final_s,
        d_final_z,
        d_initial_s,
        d_initial_z,
        cu_seqlens: cu,
        workspace: ws,
        workspace_len: ws_floats,
    };
    // SAFETY: every address is memory of `exec` validated against the shape.
    unsafe { launch(kind, exec, T::DTYPE, &bp, opts, &ptrs) }
}

/// [`backward()`] on raw device addresses, for engines that manage their
/// own memory. Get the workspace size from [`workspace_len`] (with the
/// problem from [`validate`]).
///
/// # Safety
/// Every non-zero address must point to memory the executor can reach,
/// valid until the launches complete: q, k, v and d_o (`dtype`, read) and
/// dq, dk, dv (written) covering `shape` with the strides of their primals
/// (d_o: those of o); the initial state and d_final (read) and d_initial
/// (written) as `num_seqs * heads` fp32 states; the workspace of
/// `ptrs.workspace_len` fp32 elements (checked against [`workspace_len`] of
/// this call, which depends on the whole shape: recompute it per call, a
/// smaller batch can need more); for varlen, `cu_seqlens.len()` `int64`
/// offsets on the device equal to the host `cu_seqlens`. Outputs must not
/// overlap any input (checked by address range).
pub unsafe fn backward_raw<E: Executor>(
    kind: Kind,
    exec: &E,
    dtype: DType,
    ptrs: &RawBackward,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<()> {
    let kernel = op_name(kind);
    let lens = Lens::unknown(ptrs.initial_s != 0, false);
    let glens = GradLens::unknown(ptrs.d_final_s != 0, ptrs.d_initial_s != 0);
    let bp = validate(
        kernel,
        dtype,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &glens,
        &exec.target(),
    )?;
    check_raw(kernel, dtype, ptrs, &bp)?;
    // SAFETY: forwarded to the caller.
    unsafe { launch(kind, exec, dtype, &bp, opts, ptrs) }
}

/// The one place both paths meet: plan the validated call and run it.
///
/// # Safety
/// `ptrs` valid for `exec` and `bp` (validated by the caller).
unsafe fn launch<E: Executor>(
    kind: Kind,
    exec: &E,
    dtype: DType,
    bp: &BackwardProblem,
    opts: &AttentionOptions,
    ptrs: &RawBackward,
) -> Result<()> {
    let launches = plan::plan(kind, dtype, bp, opts, ptrs);
    // SAFETY: forwarded; the write regions lie inside validated buffers.
    unsafe { run_plan(exec, &launches) }
}
