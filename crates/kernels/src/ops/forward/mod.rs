//! The forward kernels (`cuda/forward.cu`, one module for both kinds):
//! linear attention over a batch (or a packed varlen batch) of sequences,
//! feature map and normaliser fused, optional initial state in and final
//! state out (fp32).
//!
//! Entry points, causal or not by [`Kind`]: [`forward()`] takes typed
//! memory on an executor that owns it (a [`crate::Device`] with
//! [`crate::Buffer`]s, or a [`crate::Gpu`] with cudarc slices and views: see
//! [`Memory`]); [`forward_raw`] takes device addresses ([`RawForward`]) for
//! engines that manage their own memory. Both validate the call ([`validate`]), then run the same plan
//! (`plan.rs`: the launch sequences of `docs/kernels.md`); the tiling and
//! the walk/split policy live in `tiling.rs` (see [`crate::ops::tuning`]).

pub(crate) mod plan;
#[cfg(test)]
mod tests;
pub(crate) mod tiling;

pub use plan::{validate, workspace_len, Lens, Problem, RawForward};

use self::plan::{check_raw, op_name, run_plan, write_regions};
use super::attention::{AttentionOptions, AttentionShape, Kind, Qkv, StateIo};
use super::memory::{Addrs, DeviceRead, DeviceWrite, Memory};
use crate::dtype::{DType, Element};
use crate::plan::Executor;
use crate::Result;

/// Linear attention, causal or not by `kind`:
///
/// - [`Kind::Causal`]: `o_i = s phi(q_i)^T S_i / (s phi(q_i)^T z_i + eps)`
///   with `S_i, z_i` the prefix sums over `j <= i` starting from
///   `states.initial`; the state after the last token goes to
///   `states.final_state`.
/// - [`Kind::NonCausal`]: every query reads the state of its whole
///   sequence (plus `states.initial`); `states.final_state` receives that
///   state.
///
/// `cu_seqlens` (host offsets) makes it a packed varlen call
/// (`shape.batch == 1`). `exec` is a [`crate::Device`] (memory:
/// [`crate::Buffer`]s) or a [`crate::Gpu`] (memory: cudarc slices or views,
/// on its stream). q, k, v and o have `T` elements with the strides of
/// `shape`; states are fp32.
///
/// The typed path: lengths from the memory, temporaries from the executor,
/// addresses gathered once, then the raw path's launch.
///
/// Errors: [`crate::Error::InvalidArgument`] naming the argument for a bad
/// shape, option, length, overlapping output rows or memory of another
/// device; driver errors from the launches.
#[allow(clippy::too_many_arguments)]
pub fn forward<E, T, B, O, I, F>(
    kind: Kind,
    exec: &E,
    x: Qkv<'_, B>,
    o: &mut O,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: StateIo<'_, I, F>,
) -> Result<()>
where
    E: Memory,
    T: Element,
    B: DeviceRead<T, E>,
    O: DeviceWrite<T, E>,
    I: DeviceRead<f32, E>,
    F: DeviceWrite<f32, E>,
{
    let kernel = op_name(kind);
    let lens = Lens {
        q: x.q.elems(),
        k: x.k.elems(),
        v: x.v.elems(),
        o: o.elems(),
        initial: states.initial.as_ref().map(|s| (s.s.elems(), s.z.elems())),
        final_state: states
            .final_state
            .as_ref()
            .map(|s| (s.s.elems(), s.z.elems())),
    };
    let problem = validate(
        kernel,
        T::DTYPE,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &exec.target(),
    )?;
    let (_tc, cu) = exec.offsets(&problem.cu_seqlens, kernel)?;
    let ws_floats = workspace_len(kind, &problem, opts);
    let (_tw, ws) = exec.workspace(ws_floats, kernel)?;
    let mut a = Addrs::new(exec, kernel);
    let (q, k, v) = (a.read(x.q, "q")?, a.read(x.k, "k")?, a.read(x.v, "v")?);
    let o = a.write(o, "o")?;
    let (initial_s, initial_z) = a.state(states.initial.as_ref(), ["initial.s", "initial.z"])?;
    let (final_s, final_z) = a.state_mut(states.final_state, ["final.s", "final.z"])?;
    let ptrs = RawForward {
        q,
        k,
        v,
        o,
        initial_s,
        initial_z,
        final_s,
        final_z,
        cu_seqlens: cu,
        workspace: ws,
        workspace_len: ws_floats,
    };
    // SAFETY: every address is memory of `exec` validated against the shape.
    unsafe { launch(kind, exec, T::DTYPE, &problem, opts, &ptrs) }
}

/// [`forward()`] on raw device addresses, for engines that manage their own
/// memory. Get the workspace size from [`workspace_len`] (with the
/// [`Problem`] from [`validate`]).
///
/// # Safety
/// Every non-zero address must point to memory the executor can reach
/// (device memory of the GPU's context, host memory for the emulator),
/// valid until the launches complete: q, k, v (`dtype`) and o (written)
/// covering `shape` with its strides; initial (read) and final (written) S
/// and z of `num_seqs * heads` fp32 states; the workspace of
/// `workspace_len` fp32 elements; for varlen, `cu_seqlens.len()` `int64`
/// offsets on the device equal to the host `cu_seqlens`; `workspace_len`
/// the workspace's true length (checked against this call's need, which
/// depends on the whole shape). Outputs must not overlap any input
/// (checked by address range).
pub unsafe fn forward_raw<E: Executor>(
    kind: Kind,
    exec: &E,
    dtype: DType,
    ptrs: &RawForward,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<()> {
    let kernel = op_name(kind);
    let lens = Lens::unknown(ptrs.initial_s != 0, ptrs.final_s != 0);
    let problem = validate(
        kernel,
        dtype,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &exec.target(),
    )?;
    check_raw(
        kernel,
        dtype,
        ptrs,
        &problem,
        workspace_len(kind, &problem, opts),
    )?;
    // SAFETY: forwarded to the caller.
    unsafe { launch(kind, exec, dtype, &problem, opts, ptrs) }
}

/// The one place both paths meet: plan the validated call and run it,
/// naming the regions it writes.
///
/// # Safety
/// `ptrs` valid for `exec` and `problem` (validated by the caller).
unsafe fn launch<E: Executor>(
    kind: Kind,
    exec: &E,
    dtype: DType,
    problem: &Problem,
    opts: &AttentionOptions,
    ptrs: &RawForward,
) -> Result<()> {
    let plan = plan::plan(kind, dtype, problem, opts, ptrs);
    let writes = write_regions(problem, dtype, ptrs, workspace_len(kind, problem, opts));
    // SAFETY: forwarded.
    unsafe { run_plan(exec, &plan, &writes) }
}
