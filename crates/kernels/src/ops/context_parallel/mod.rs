//! Context parallelism: one sequence (or a packed varlen batch) cut into R
//! contiguous pieces, one per rank, the ranks exchanging only their state
//! sums through one all-gather per direction (the algorithm, the backward's
//! derivation and the bytes moved: `docs/context-parallel.md`).
//!
//! Primitives an engine can use on their own, on typed memory of any
//! [`Memory`] executor:
//!
//! - [`local_state`]: the state sum of a piece from zero, no output written
//!   (the non-causal forward's partition states and combine, without its
//!   readout: k and v are read once, q never);
//! - [`combine_states`]: `out = initial + sum of slots first..first+count`
//!   of a gathered buffer, in slot order (the forward's `forward_state_scan`
//!   kernel over the flattened slots: deterministic, no atomics);
//! - [`noncausal_readout`]: every query of a piece against a given total
//!   state (the non-causal forward's last launch);
//! - the forward and backward of a piece from a starting state are the
//!   ordinary entry points ([`crate::forward_raw`] and [`crate::backward_raw`]).
//!
//! [`ContextParallel`] chains them over a [`Collective`] (all-gather of fp32
//! buffers): [`InProcess`] (threads, one [`crate::Device`] each) here, NCCL
//! behind the `nccl` feature.
//!
//! **Packed states.** Every state buffer of this module is one fp32 buffer
//! of [`StateLayout::len`] elements: S of every (sequence, head) (row-major
//! `d x m`, index `seq * heads + head`), then z of every (sequence, head)
//! (`d`). A gathered buffer is R such slots, rank order.

mod driver;
#[cfg(feature = "nccl")]
mod nccl;

pub use driver::{piece_offsets, Collective, ContextParallel, InProcess, PieceInputs, PieceStart};
#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;

use super::attention::{AttentionOptions, AttentionShape, Kind};
use super::forward::plan::{
    self as fplan, base_params, call_schedule, run_plan, validate, walk_launch, Lens, Problem,
    RawForward,
};
use super::memory::{Addrs, DeviceRead, DeviceWrite, Memory};
use crate::dtype::{DType, Element};
use crate::params::{LinattnForwardParams, LinattnStateLoad, LinattnStateScanParams};
use crate::plan::{Executor, LaunchPlan};
use crate::{Error, Result};

/// The states of one call: `num_seqs` sequences x `heads` heads of a `d x m`
/// S and a `d` z (fp32), packed as the module doc describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateLayout {
    /// Sequences (dense: the batch; varlen: `cu_seqlens.len() - 1`).
    pub num_seqs: usize,
    /// Heads.
    pub heads: usize,
    /// Key size D.
    pub d: usize,
    /// Value size M.
    pub m: usize,
}

impl StateLayout {
    /// The layout of a forward or backward call's states.
    pub fn of(shape: &AttentionShape, cu_seqlens: Option<&[usize]>) -> Self {
        StateLayout {
            num_seqs: cu_seqlens.map_or(shape.batch, |c| c.len().saturating_sub(1)),
            heads: shape.heads,
            d: shape.d,
            m: shape.m,
        }
    }

    /// fp32 elements of S (all states): `num_seqs * heads * d * m`. Like
    /// every length here it saturates at `usize::MAX` instead of
    /// overflowing: no buffer is that long, so the ops reject such a layout
    /// with [`Error::InvalidArgument`].
    pub fn s_len(&self) -> usize {
        self.z_len().saturating_mul(self.m)
    }

    /// fp32 elements of z (all states): `num_seqs * heads * d`.
    pub fn z_len(&self) -> usize {
        self.num_seqs
            .saturating_mul(self.heads)
            .saturating_mul(self.d)
    }

    /// fp32 elements of one packed state buffer: `num_seqs * heads * (d*m + d)`.
    pub fn len(&self) -> usize {
        self.s_len().saturating_add(self.z_len())
    }

    /// Whether the buffer is empty (no sequence or head).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes one rank receives from an all-gather of R slots: `R x len x 4`.
    pub fn gather_bytes(&self, ranks: usize) -> usize {
        ranks.saturating_mul(self.len()).saturating_mul(4)
    }
}

const LOCAL: &str = "local_state";
const COMBINE: &str = "combine_states";
const READOUT: &str = "noncausal_readout";

fn check_len(kernel: &'static str, arg: &'static str, found: usize, need: usize) -> Result<()> {
    if found != need {
        return Err(Error::invalid(
            kernel,
            arg,
            format!("expected a packed state buffer of {need} fp32 elements, found {found}"),
        ));
    }
    Ok(())
}

/// The state sum of one piece from zero (or from `initial`, a packed state):
/// `out = initial + sum_j phi(k_j) v_j^T` (S) and `+ sum_j phi(k_j)` (z)
/// over every token of each (sequence, head), written packed to `out`
/// ([`StateLayout::len`] fp32). No output is written and q is not read.
///
/// `shape` and `cu_seqlens` describe the piece as for
/// [`crate::forward()`] (q's strides are validated but never used);
/// `opts.schedule` picks one walk per sequence-head or split partitions
/// (combined in order). Empty sequences give `initial` (or zeros).
/// Errors: [`Error::InvalidArgument`] for a bad shape, option or length.
#[allow(clippy::too_many_arguments)]
pub fn local_state<E, T, B, I, F>(
    exec: &E,
    k: &B,
    v: &B,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    initial: Option<&I>,
    out: &mut F,
) -> Result<()>
where
    E: Memory,
    T: Element,
    B: DeviceRead<T, E>,
    I: DeviceRead<f32, E>,
    F: DeviceWrite<f32, E>,
{
    let layout = StateLayout::of(shape, cu_seqlens);
    let problem = validate_piece(LOCAL, T::DTYPE, shape, cu_seqlens, opts, exec)?;
    check_len(LOCAL, "out", out.elems(), layout.len())?;
    if let Some(i) = initial {
        check_len(LOCAL, "initial", i.elems(), layout.len())?;
    }
    let lens = (k.elems(), v.elems());
    let sp = &problem.shape;
    checks_hold(LOCAL, sp, lens)?;
    let (_tc, cu) = exec.offsets(&problem.cu_seqlens, LOCAL)?;
    let ws_floats = fplan::workspace_len(Kind::NonCausal, &problem, opts);
    let (_tw, ws) = exec.workspace(ws_floats, LOCAL)?;
    let mut a = Addrs::new(exec, LOCAL);
    let (k, v) = (a.read(k, "k")?, a.read(v, "v")?);
    let initial = match initial {
        Some(i) => a.read(i, "initial")?,
        None => 0,
    };
    let out = a.write(out, "out")?;
    let z_off = (layout.s_len() * 4) as u64;
    let ptrs = RawForward {
        q: k,
        k,
        v,
        o: 0,
        initial_s: initial,
        initial_z: if initial != 0 { initial + z_off } else { 0 },
        final_s: out,
        final_z: out + z_off,
        cu_seqlens: cu,
        workspace: ws,
        workspace_len: ws_floats,
    };
    // The non-causal plan with a final state is [partition states, combine
    // into the final state, readout]: everything but the readout.
    let mut plan = fplan::plan(Kind::NonCausal, T::DTYPE, &problem, opts, &ptrs);
    debug_assert_eq!(plan.launches.len(), 3);
    plan.launches.truncate(2);
    let writes = fplan::write_regions(&problem, T::DTYPE, &ptrs, ws_floats);
    // SAFETY: k, v, the states and the workspace are memory of `exec`
    // validated against the piece's shape; q and o are never touched by
    // launches that write no output.
    unsafe { run_plan(exec, &plan, &writes) }
}

/// Every query of a piece against a given total state (packed `total`):
/// `o_i = s phi(q_i)^T S / (s phi(q_i)^T z + eps)`, the non-causal
/// forward's readout. Used by [`ContextParallel`] so that each rank reads
/// the very total the single-device split forward would compute.
/// `total` is one packed state ([`StateLayout::of`] the call, fp32).
/// Errors: as [`crate::forward()`] with [`Kind::NonCausal`], and
/// [`Error::InvalidArgument`] for a `total` whose length is not
/// [`StateLayout::len`].
#[allow(clippy::too_many_arguments)]
pub fn noncausal_readout<E, T, B, O, I>(
    exec: &E,
    q: &B,
    o: &mut O,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    total: &I,
) -> Result<()>
where
    E: Memory,
    T: Element,
    B: DeviceRead<T, E>,
    O: DeviceWrite<T, E>,
    I: DeviceRead<f32, E>,
{
    let layout = StateLayout::of(shape, cu_seqlens);
    let problem = validate_piece(READOUT, T::DTYPE, shape, cu_seqlens, opts, exec)?;
    check_len(READOUT, "total", total.elems(), layout.len())?;
    let sp = &problem.shape;
    let need_q = sp.span(&sp.q, sp.d).unwrap_or(usize::MAX);
    let need_o = sp.span(&sp.o, sp.m).unwrap_or(usize::MAX);
    crate::ops::checks::holds(READOUT, "q", q.elems(), need_q)?;
    crate::ops::checks::holds(READOUT, "o", o.elems(), need_o)?;
    let (_tc, cu) = exec.offsets(&problem.cu_seqlens, READOUT)?;
    let mut a = Addrs::new(exec, READOUT);
    let qa = a.read(q, "q")?;
    let ta = a.read(total, "total")?;
    let oa = a.write(o, "o")?;
    let ptrs = RawForward {
        q: qa,
        k: qa,
        v: 0,
        o: oa,
        initial_s: ta,
        initial_z: ta + (layout.s_len() * 4) as u64,
        cu_seqlens: cu,
        ..Default::default()
    };
    let sched = call_schedule(&problem, opts);
    let base = base_params(&problem, opts, &sched, &ptrs);
    let launch = walk_launch(
        T::DTYPE,
        opts.f16_tiles,
        &problem,
        &sched,
        LinattnForwardParams {
            causal: 0,
            state_load: LinattnStateLoad::LINATTN_STATE_INITIAL as i32,
            ..base
        },
    );
    let plan = fplan::ForwardPlan {
        schedule: sched,
        launches: vec![launch],
    };
    let writes = fplan::write_regions(&problem, T::DTYPE, &ptrs, 0);
    // SAFETY: q, o and the total are memory of `exec` validated against the
    // shape; the non-causal readout reads neither k nor v.
    unsafe { run_plan(exec, &plan, &writes) }
}

/// The fixed-order sum of gathered states: `out = initial + slot[first] +
/// slot[first + 1] + ... + slot[first + count - 1]`, where slot `j` is the
/// packed state at `gathered[j * len..(j + 1) * len]` (`len` =
/// [`StateLayout::len`]); `initial` `None` is zeros. Every element is summed
/// in slot order by one thread (the forward's `forward_state_scan` over the
/// flattened slots): deterministic, and with `initial` the whole sequence's
/// initial state and `first = 0` it adds in the order the single-device
/// split schedule does.
///
/// `gathered` is scratch: when `count >= 1` slot `first` is overwritten
/// with the sum (the other slots are untouched).
///
/// For rank `r` of `R` the forward needs `first = 0, count = r` (causal:
/// its starting state) or the total, and the backward the exclusive suffix
/// `first = r + 1, count = R - r - 1` (see `docs/context-parallel.md`).
/// Errors: [`Error::InvalidArgument`] if `gathered` holds fewer than
/// `first + count` slots or `initial`/`out` are not one packed state.
pub fn combine_states<E, G, I, F>(
    exec: &E,
    layout: &StateLayout,
    gathered: &mut G,
    first: usize,
    count: usize,
    initial: Option<&I>,
    out: &mut F,
) -> Result<()>
where
    E: Memory,
    G: DeviceWrite<f32, E>,
    I: DeviceRead<f32, E>,
    F: DeviceWrite<f32, E>,
{
    let len = layout.len();
    check_len(COMBINE, "out", out.elems(), len)?;
    if let Some(i) = initial {
        check_len(COMBINE, "initial", i.elems(), len)?;
    }
    let slots = first
        .checked_add(count)
        .filter(|&s| s.checked_mul(len).is_some() && count <= i32::MAX as usize);
    let Some(slots) = slots else {
        return Err(Error::invalid(COMBINE, "count", "slot range overflows"));
    };
    crate::ops::checks::holds(COMBINE, "gathered", gathered.elems(), slots * len)?;
    if len == 0 {
        return Ok(());
    }
    if len as u64 + 1 > i64::MAX as u64 {
        return Err(Error::invalid(COMBINE, "layout", "state size overflows"));
    }
    // One "state" of d = 1, m = len per slot: S covers the whole packed slot
    // and the scan's z (one float per slot) lives in a scratch.
    let (_ts, scratch) = exec.workspace(count + 2, COMBINE)?;
    let mut a = Addrs::new(exec, COMBINE);
    let g = a.write(gathered, "gathered")?;
    let i = match initial {
        Some(i) => a.read(i, "initial")?,
        None => 0,
    };
    let o = a.write(out, "out")?;
    let threads = crate::ops::forward::tiling::THREADS;
    let bps = (len + 1).div_ceil(threads as usize);
    if bps > i32::MAX as usize {
        return Err(Error::invalid(COMBINE, "layout", "grid limit exceeded"));
    }
    let plan = LaunchPlan {
        module: fplan::MODULE,
        kernel: fplan::SCAN_NAME,
        grid: [bps as u32, 1, 1],
        block: [threads, 1, 1],
        shared_bytes: 0,
        params: LinattnStateScanParams {
            cu_seqlens: 0,
            state_in_s: i,
            state_in_z: if i != 0 {
                scratch + (count as u64) * 4
            } else {
                0
            },
            state_out_s: o,
            state_out_z: scratch + (count as u64 + 1) * 4,
            work_s: g + (first * len * 4) as u64,
            work_z: scratch,
            num_seqs: 1,
            heads: 1,
            tokens: count as i64,
            d: 1,
            m: len as i64,
            part_len: 1,
            num_parts: count.max(1) as i32,
            blocks_per_state: bps as i32,
            // Non-causal: only slot `first` is written (with the sum); with
            // no slot at all the causal mode writes none.
            causal: (count == 0) as i32,
            _pad0: 0,
        },
    };
    let writes = [
        (o, len * 4),
        (g + (first * len * 4) as u64, count.min(1) * len * 4),
        (scratch, (count + 2) * 4),
    ]
    .into_iter()
    .filter(|&(_, n)| n > 0)
    .collect::<Vec<_>>();
    // SAFETY: gathered holds slots first..first + count, initial and out one
    // packed state each (checked above), the scratch count + 2 floats.
    unsafe { exec.launch_writing(&plan, &writes) }
}

/// Shape validation of a piece (the forward's rules; lengths checked by the caller).
fn validate_piece<E: Executor>(
    kernel: &'static str,
    dtype: DType,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    exec: &E,
) -> Result<Problem> {
    let lens = Lens::unknown(false, false);
    validate(
        kernel,
        dtype,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &exec.target(),
    )
}

fn checks_hold(kernel: &'static str, sp: &AttentionShape, (k, v): (usize, usize)) -> Result<()> {
    let need_k = sp.span(&sp.k, sp.d).unwrap_or(usize::MAX);
    let need_v = sp.span(&sp.v, sp.m).unwrap_or(usize::MAX);
    crate::ops::checks::holds(kernel, "k", k, need_k)?;
    crate::ops::checks::holds(kernel, "v", v, need_v)
}
