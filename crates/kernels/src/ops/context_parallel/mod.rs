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
//! - [`add_state_gradient`]: a gradient flowing into a piece's final state,
//!   added to its dk and dv (`cuda/state_gradient.cu`): what the backward
//!   with that `d_final` adds to the backward without it;
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
use crate::params::{
    LinattnBackwardParams, LinattnForwardParams, LinattnStateLoad, LinattnStateScanParams,
};
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
const GRADIENT: &str = "add_state_gradient";

/// `cuda/state_gradient.cu`: the module, rows of dk or columns of dv per
/// block, warps per block, and tokens per block before the grid strides.
const GRAD_MODULE: &str = "state_gradient";
const GRAD_TILE: usize = 32;
const GRAD_WARPS: usize = 8;
const GRAD_TOKENS: usize = 256;

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

/// Adds a gradient `g` flowing into a piece's final state (one packed
/// state, [`StateLayout::of`] the piece, fp32) to the piece's dk and dv:
/// for every token j of each (sequence, head),
/// `dk_j += phi'(k_j) * (G_S v_j + G_z)` and `dv_j += G_S^T phi(k_j)`.
///
/// The final state is `S_0 + sum_j phi(k_j) v_j^T` (and `z_0 + sum_j
/// phi(k_j)`) for both kinds, so these are exactly the terms by which the
/// backward with `d_final = g` differs from the backward without it; dq
/// does not depend on `d_final`, and the initial state's gradient gains `g`
/// itself. [`ContextParallel::backward`] runs one backward per piece and
/// this, instead of a second backward.
///
/// `dk` and `dv` have the strides of k and v (as every gradient of
/// [`crate::backward()`]); both are read and written in the input dtype
/// (16-bit: rounded once more). Only `opts.feature_map` matters; the rest
/// is validated as for the forward. fp32 FMA: `2 D M` multiply-adds per
/// token-head. Errors: [`Error::InvalidArgument`] for a bad shape, option,
/// buffer length or `g` length.
#[allow(clippy::too_many_arguments)]
pub fn add_state_gradient<E, T, B, G, F>(
    exec: &E,
    k: &B,
    v: &B,
    dk: &mut G,
    dv: &mut G,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    g: &F,
) -> Result<()>
where
    E: Memory,
    T: Element,
    B: DeviceRead<T, E>,
    G: DeviceWrite<T, E>,
    F: DeviceRead<f32, E>,
{
    let layout = StateLayout::of(shape, cu_seqlens);
    let problem = validate_piece(GRADIENT, T::DTYPE, shape, cu_seqlens, opts, exec)?;
    check_len(GRADIENT, "g", g.elems(), layout.len())?;
    let sp = &problem.shape;
    checks_hold(GRADIENT, sp, (k.elems(), v.elems()))?;
    let need_dk = sp.span(&sp.k, sp.d).unwrap_or(usize::MAX);
    let need_dv = sp.span(&sp.v, sp.m).unwrap_or(usize::MAX);
    crate::ops::checks::holds(GRADIENT, "dk", dk.elems(), need_dk)?;
    crate::ops::checks::holds(GRADIENT, "dv", dv.elems(), need_dv)?;
    let tiles = state_gradient_tiles(sp.d, sp.m);
    if !crate::ops::checks::grid_x_fits(problem.seq_heads(), tiles) {
        return Err(Error::invalid(
            GRADIENT,
            "shape",
            "sequences x heads x tiles exceed the grid limit",
        ));
    }
    if problem.seq_heads() == 0 || problem.max_len == 0 {
        return Ok(());
    }
    let (_tc, cu) = exec.offsets(&problem.cu_seqlens, GRADIENT)?;
    let mut a = Addrs::new(exec, GRADIENT);
    let (ka, va) = (a.read(k, "k")?, a.read(v, "v")?);
    let ga = a.read(g, "g")?;
    let (dka, dva) = (a.write(dk, "dk")?, a.write(dv, "dv")?);
    let plan = state_gradient_plan(
        T::DTYPE,
        &problem,
        opts,
        LinattnBackwardParams {
            k: ka,
            v: va,
            dk: dka,
            dv: dva,
            d_final_s: ga,
            d_final_z: ga + (layout.s_len() * 4) as u64,
            cu_seqlens: cu,
            ..Default::default()
        },
    );
    let size = T::DTYPE.size();
    let writes = [(dka, need_dk * size), (dva, need_dv * size)];
    // SAFETY: k, v, dk, dv hold the piece's shape and strides, g one packed
    // state (all checked above), every one memory of `exec`.
    unsafe { exec.launch_writing(&plan, &writes) }
}

/// Blocks per (sequence, head) of `state_gradient.cu`: D tiles for dk, then
/// M tiles for dv.
fn state_gradient_tiles(d: usize, m: usize) -> usize {
    d.div_ceil(GRAD_TILE) + m.div_ceil(GRAD_TILE)
}

/// Dynamic shared memory of a `state_gradient.cu` block, as the kernel
/// carves it: the larger of the dk blocks' `GRAD_TILE x ld` slice of G_S
/// (`ld` = M rounded up to odd) plus a v row per warp, and the dv blocks'
/// `D x GRAD_TILE` slice plus a phi(k) row per warp (fp32).
fn state_gradient_shared_bytes(d: usize, m: usize) -> u32 {
    let dk = GRAD_TILE * (m | 1) + GRAD_WARPS * m;
    let dv = d * GRAD_TILE + GRAD_WARPS * d;
    (dk.max(dv) * 4) as u32
}

/// The launch of `state_gradient.cu` for a validated piece; `ptrs` carries
/// the addresses (k, v, dk, dv, d_final, cu_seqlens).
fn state_gradient_plan(
    dtype: DType,
    problem: &Problem,
    opts: &AttentionOptions,
    ptrs: LinattnBackwardParams,
) -> LaunchPlan<LinattnBackwardParams> {
    let sp = &problem.shape;
    let tiles = state_gradient_tiles(sp.d, sp.m);
    let groups = problem
        .max_len
        .div_ceil(GRAD_TOKENS)
        .clamp(1, crate::ops::checks::MAX_GRID_Y);
    LaunchPlan {
        module: GRAD_MODULE,
        kernel: match dtype {
            DType::F32 => "state_gradient_f32",
            DType::F16 => "state_gradient_f16",
            DType::Bf16 => "state_gradient_bf16",
        },
        grid: [(problem.seq_heads() * tiles) as u32, groups as u32, 1],
        block: [(GRAD_WARPS * 32) as u32, 1, 1],
        shared_bytes: state_gradient_shared_bytes(sp.d, sp.m),
        params: LinattnBackwardParams {
            num_seqs: problem.num_seqs as i64,
            heads: sp.heads as i64,
            tokens: sp.tokens as i64,
            d: sp.d as i64,
            m: sp.m as i64,
            k_batch_stride: sp.k.batch as i64,
            k_token_stride: sp.k.token as i64,
            k_head_stride: sp.k.head as i64,
            v_batch_stride: sp.v.batch as i64,
            v_token_stride: sp.v.token as i64,
            v_head_stride: sp.v.head as i64,
            tile: GRAD_TILE as i32,
            tiles: tiles as i32,
            feature_map: opts.feature_map.to_c(),
            ..ptrs
        },
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::Strides;
    use crate::target::Target;

    fn problem(d: usize, m: usize, tokens: usize, cu: Option<&[usize]>) -> Problem {
        let shape = AttentionShape {
            batch: if cu.is_some() { 1 } else { 2 },
            heads: 3,
            tokens,
            d,
            m,
            q: Strides::bhnd(3, tokens, d),
            k: Strides::bhnd(3, tokens, d),
            v: Strides::bhnd(3, tokens, m),
            o: Strides::bhnd(3, tokens, m),
        };
        let opts = AttentionOptions::default();
        let lens = Lens::unknown(false, false);
        validate(
            GRADIENT,
            DType::Bf16,
            &shape,
            cu,
            &opts,
            &lens,
            &Target::H200,
        )
        .unwrap()
    }

    #[test]
    fn state_gradient_plan_covers_every_tile_and_token() {
        // D = 40, M = 100: two dk tiles (32 + 8 rows) and four dv tiles.
        let p = problem(40, 100, 600, None);
        let plan = state_gradient_plan(
            DType::Bf16,
            &p,
            &AttentionOptions::default(),
            Default::default(),
        );
        assert_eq!(plan.kernel, "state_gradient_bf16");
        assert_eq!(
            plan.grid,
            [2 * 3 * (2 + 4), 3, 1],
            "600 tokens: 3 groups of 256"
        );
        assert_eq!(plan.block, [256, 1, 1]);
        assert_eq!((plan.params.tile, plan.params.tiles), (32, 6));
        assert_eq!(
            (plan.params.d, plan.params.m, plan.params.tokens),
            (40, 100, 600)
        );
        // dk blocks: 32 x 101 + 8 x 100 floats; dv blocks: 40 x 32 + 8 x 40.
        assert_eq!(plan.shared_bytes, ((32 * 101 + 8 * 100) * 4) as u32);
        // The largest head stays under the 48 KB that needs no opt-in.
        assert!(state_gradient_shared_bytes(256, 256) <= 48 * 1024);
        assert_eq!(
            state_gradient_shared_bytes(256, 1),
            ((256 * 32 + 8 * 256) * 4) as u32
        );
    }

    #[test]
    fn state_gradient_plan_uses_the_longest_sequence() {
        let cu = [0, 10, 10, 700, 705];
        let p = problem(16, 16, 705, Some(&cu));
        let plan = state_gradient_plan(
            DType::F32,
            &p,
            &AttentionOptions::default(),
            Default::default(),
        );
        // 4 sequences x 3 heads x 2 tiles; 690 tokens at most: 3 groups.
        assert_eq!(plan.grid, [4 * 3 * 2, 3, 1]);
        assert_eq!(plan.kernel, "state_gradient_f32");
    }
}
