//! The backward's launch plan: validation ([`validate`] into a
//! [`BackwardProblem`]), the workspace ([`workspace_len`]), the raw
//! addresses ([`RawBackward`]) and the launches, built in named steps:
//! [`base_params`], [`prep_dq_launches`] (prep + dq, or the fused walk),
//! [`dk_dv_launches`] (dk + dv, or the merged walk), each whole-head walk
//! preceded by its [`split_prelude`] (partition sums and the scan) when the
//! schedule splits; [`plan`] strings them together.

use super::tiling::*;
use crate::dtype::DType;
use crate::ops::attention::{
    AttentionOptions, AttentionShape, DqPrecision, F16Tiles, Kind, Strides,
};
use crate::ops::checks::{self, byte_range};
use crate::ops::forward::tiling::{Schedule, THREADS};
use crate::ops::forward::{self, Lens, Problem};
use crate::params::{LinattnBackwardParams, LinattnBackwardState, LinattnDqPrecision};
use crate::plan::{Executor, LaunchPlan};
use crate::target::Target;
use crate::{Error, Result};

/// The backward module (`cuda/backward.cu`: one module for both kinds;
/// causality is the params' `causal` flag).
pub(crate) const MODULE: &str = "backward";

/// The op's name in errors: the public entry point of a kind.
pub(crate) fn op_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Causal => "causal_backward",
        Kind::NonCausal => "noncausal_backward",
    }
}

/// The kernel symbol of a pass for a dtype and f16 tile choice, the same
/// for both kinds (`None`: no such kernel, the merged [`Pass::Dkv`] and
/// [`Pass::PrepDq`] walks exist for f16 and bf16 only). `tiles` matters for
/// f16 only: [`F16Tiles::Bf16`] names the `_f16_bf16tc` kernels.
pub fn kernel_name(pass: Pass, dtype: DType, tiles: F16Tiles) -> Option<&'static str> {
    use DType::*;
    use Pass::*;
    let bf16_tiles = tiles == F16Tiles::Bf16;
    Some(match (pass, dtype) {
        (Prep, F32) => "backward_prep_f32",
        (Prep, F16) if bf16_tiles => "backward_prep_f16_bf16tc",
        (Prep, F16) => "backward_prep_f16",
        (Prep, Bf16) => "backward_prep_bf16",
        (Dq, F32) => "backward_dq_f32",
        (Dq, F16) if bf16_tiles => "backward_dq_f16_bf16tc",
        (Dq, F16) => "backward_dq_f16",
        (Dq, Bf16) => "backward_dq_bf16",
        (Dk, F32) => "backward_dk_f32",
        (Dk, F16) if bf16_tiles => "backward_dk_f16_bf16tc",
        (Dk, F16) => "backward_dk_f16",
        (Dk, Bf16) => "backward_dk_bf16",
        (Dv, F32) => "backward_dv_f32",
        (Dv, F16) if bf16_tiles => "backward_dv_f16_bf16tc",
        (Dv, F16) => "backward_dv_f16",
        (Dv, Bf16) => "backward_dv_bf16",
        (Dkv, F16) if bf16_tiles => "backward_dkv_f16_bf16tc",
        (Dkv, F16) => "backward_dkv_f16",
        (Dkv, Bf16) => "backward_dkv_bf16",
        (PrepDq, F16) if bf16_tiles => "backward_prepdq_f16_bf16tc",
        (PrepDq, F16) => "backward_prepdq_f16",
        (PrepDq, Bf16) => "backward_prepdq_bf16",
        (Dkv | PrepDq, F32) => return None,
        (StateScan, _) => "backward_state_scan",
    })
}

/// A validated backward call.
#[derive(Debug, Clone)]
pub struct BackwardProblem {
    /// The forward's view of the call (shape, sequences, offsets).
    pub problem: Problem,
    /// The backward tiling.
    pub tiling: BackwardTiling,
    /// Whether the call normalises (needs the prep workspace).
    pub normalize: bool,
    /// Partitions of the whole-head walks ([`split_schedule`]; one
    /// partition otherwise). The workspace holds their states whenever
    /// `parts > 1`.
    pub schedule: Schedule,
}

impl BackwardProblem {
    /// Rows of the per-token workspaces: `batch * tokens * heads`.
    pub fn work_rows(&self) -> usize {
        let s = &self.problem.shape;
        s.batch * s.tokens * s.heads
    }
}

/// Buffer lengths of the backward's extra tensors (`usize::MAX` when unknown).
#[derive(Debug, Clone, Copy)]
pub struct GradLens {
    /// dL/do (strides of o).
    pub d_o: usize,
    /// dq (strides of q).
    pub dq: usize,
    /// dk (strides of k).
    pub dk: usize,
    /// dv (strides of v).
    pub dv: usize,
    /// Gradient into the final state (S, z), if given.
    pub d_final: Option<(usize, usize)>,
    /// Gradient of the initial state (S, z), if wanted.
    pub d_initial: Option<(usize, usize)>,
}

impl GradLens {
    /// Lengths the caller cannot vouch for (raw addresses): every gradient
    /// unknown, the state gradients present or absent as given.
    pub fn unknown(d_final: bool, d_initial: bool) -> Self {
        let pair = |on: bool| on.then_some((usize::MAX, usize::MAX));
        GradLens {
            d_o: usize::MAX,
            dq: usize::MAX,
            dk: usize::MAX,
            dv: usize::MAX,
            d_final: pair(d_final),
            d_initial: pair(d_initial),
        }
    }
}

/// Validates a backward call: everything [`forward::validate`] checks for
/// q, k, v, o and the initial state, plus dL/do, the gradient buffers
/// (lengths, rows that never overlap) and the state gradients. `target`
/// (the executor's [`Executor::target`]) decides the split schedule, never
/// the tiling.
#[allow(clippy::too_many_arguments)]
pub fn validate(
    kernel: &'static str,
    dtype: DType,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    lens: &Lens,
    grads: &GradLens,
    target: &Target,
) -> Result<BackwardProblem> {
    let fwd_lens = Lens {
        o: usize::MAX,
        final_state: None,
        ..*lens
    };
    let problem = forward::validate(kernel, dtype, shape, cu_seqlens, opts, &fwd_lens, target)?;
    for (arg, s, dim, len) in [
        ("d_o", &shape.o, shape.m, grads.d_o),
        ("dq", &shape.q, shape.d, grads.dq),
        ("dk", &shape.k, shape.d, grads.dk),
        ("dv", &shape.v, shape.m, grads.dv),
    ] {
        // forward::validate has checked that the spans fit 64-bit indexing.
        let need = shape.span(s, dim).unwrap_or(usize::MAX);
        checks::holds(kernel, arg, len, need)?;
    }
    for (arg, s, dim) in [
        ("dq", &shape.q, shape.d),
        ("dk", &shape.k, shape.d),
        ("dv", &shape.v, shape.m),
    ] {
        if !shape.rows_disjoint(s, dim) {
            return Err(Error::invalid(
                kernel,
                arg,
                format!("gradient strides {s:?} make rows of {dim} elements overlap"),
            ));
        }
    }
    problem.check_states(
        kernel,
        &[("d_final", grads.d_final), ("d_initial", grads.d_initial)],
    )?;
    let tiling = tiling_for(dtype, shape.d, shape.m);
    let sh = problem.seq_heads();
    let grid_ok = [tiling.prep.tiles, tiling.dqk.tiles, tiling.dv.tiles]
        .iter()
        .all(|&t| checks::grid_x_fits(sh, t));
    let rows_ok = shape
        .batch
        .checked_mul(shape.tokens)
        .and_then(|x| x.checked_mul(shape.heads))
        .and_then(|x| x.checked_mul(1 + tiling.prep.tiles))
        .is_some_and(|x| x <= i64::MAX as usize);
    if !grid_ok || !rows_ok {
        return Err(Error::invalid(
            kernel,
            "shape",
            format!(
                "{} sequences x {} heads exceed the grid or indexing limits",
                problem.num_seqs, shape.heads
            ),
        ));
    }
    let schedule = split_schedule(
        opts.schedule,
        dtype,
        &tiling,
        shape.d,
        shape.m,
        sh,
        problem.max_len,
        whole_head_resident(target, shape.d, shape.m, &tiling),
    );
    Ok(BackwardProblem {
        problem,
        tiling,
        normalize: opts.normalize,
        schedule,
    })
}

/// fp32 workspace elements a call needs: when normalising, den per token
/// and one partial per token and prep tile
/// (`(1 + prep tiles) * batch * tokens * heads`); for a split schedule,
/// one state per sequence-head and partition (`seq_heads * parts * (d * m
/// + d)`).
pub fn workspace_len(problem: &BackwardProblem) -> usize {
    norm_floats(problem) + split_floats(problem)
}

/// The per-token part of the workspace (den and the `G . num` partials).
fn norm_floats(problem: &BackwardProblem) -> usize {
    if problem.normalize {
        (1 + problem.tiling.prep.tiles) * problem.work_rows()
    } else {
        0
    }
}

/// The split walks' partition states (S and z, then dS and dz, in turn).
fn split_floats(problem: &BackwardProblem) -> usize {
    let (parts, s) = (problem.schedule.parts, &problem.problem.shape);
    if parts > 1 {
        problem.problem.seq_heads() * parts * (s.d * s.m + s.d)
    } else {
        0
    }
}

/// Device addresses of one backward call (0 = absent where optional).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawBackward {
    /// q, `dtype` elements.
    pub q: u64,
    /// k.
    pub k: u64,
    /// v.
    pub v: u64,
    /// dL/do, strides of o.
    pub d_o: u64,
    /// dq (written), strides of q.
    pub dq: u64,
    /// dk (written), strides of k.
    pub dk: u64,
    /// dv (written), strides of v.
    pub dv: u64,
    /// The forward's initial S and z (fp32), or 0 for zeros.
    pub initial_s: u64,
    /// See `initial_s`.
    pub initial_z: u64,
    /// Gradient flowing into the final S and z (fp32), or 0.
    pub d_final_s: u64,
    /// See `d_final_s`.
    pub d_final_z: u64,
    /// Gradient of the initial S and z (fp32, written), or 0 when not wanted.
    pub d_initial_s: u64,
    /// See `d_initial_s`.
    pub d_initial_z: u64,
    /// `int64` offsets (`num_seqs + 1`) for varlen calls, else 0.
    pub cu_seqlens: u64,
    /// fp32 workspace of [`workspace_len`] elements (0 if that is 0).
    pub workspace: u64,
    /// fp32 elements at `workspace`. Checked against [`workspace_len`] of
    /// this call: it depends on the whole shape (a split schedule's
    /// partition states), not only on its size, so a smaller batch can
    /// need more.
    pub workspace_len: usize,
}

/// One launch and the memory it writes (`(address, bytes)`), for
/// [`Executor::launch_writing`].
#[derive(Debug, Clone)]
pub struct BackwardLaunch {
    /// Which kernel.
    pub pass: Pass,
    /// The launch.
    pub plan: LaunchPlan<LinattnBackwardParams>,
    /// Every region the kernel writes.
    pub writes: Vec<(u64, usize)>,
}

/// Where the plan's launches find their workspace and how the call runs:
/// what every step below shares.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The fused prep + dq walk's tiling, when it runs.
    pub fused: Option<PassTiling>,
    /// The merged dk + dv walk's tiling, when it runs.
    pub merged: Option<PassTiling>,
    /// Whether the whole-head walks split (`schedule.parts > 1`, both walks).
    pub split: bool,
    /// `dL/do . num` partials per token: one per prep tile, or one from
    /// the fused walk.
    pub prep_slots: usize,
    /// den per token (0 when not normalising).
    pub work_den: u64,
    /// The `dL/do . num` partials (0 when not normalising).
    pub work_dden: u64,
    /// The split walks' partition states S (then z at `work_z`), after the
    /// per-token workspace; 0 when not split.
    pub work_s: u64,
    /// See `work_s`.
    pub work_z: u64,
}

/// Step 1: which walks run (a hand-built tiling may name a whole-head walk
/// for a dtype without one, f32, or a head whose state does not fit the
/// fragments: the separate walks run then) and where the workspace's parts
/// start.
pub fn layout(dtype: DType, bp: &BackwardProblem, ptrs: &RawBackward) -> Layout {
    let sp = &bp.problem.shape;
    let (d, m) = (sp.d, sp.m);
    let t = bp.tiling;
    let whole = |pass: Pass, pt: Option<PassTiling>| {
        // Which passes exist does not depend on the f16 tile choice.
        pt.filter(|_| {
            kernel_name(pass, dtype, F16Tiles::F16).is_some() && dkv_threads(d, m).is_some()
        })
    };
    let fused = whole(Pass::PrepDq, t.prep_dq);
    let merged = whole(Pass::Dkv, t.dkv);
    let rows = bp.work_rows();
    let (work_den, work_dden) = if bp.normalize && ptrs.workspace != 0 {
        (ptrs.workspace, ptrs.workspace + (rows * 4) as u64)
    } else {
        (0, 0)
    };
    let parts = bp.schedule.parts;
    let split = fused.is_some() && merged.is_some() && parts > 1;
    let (work_s, work_z) = if split {
        let s = ptrs.workspace + (norm_floats(bp) * 4) as u64;
        (s, s + (bp.problem.seq_heads() * parts * d * m * 4) as u64)
    } else {
        (0, 0)
    };
    Layout {
        fused,
        merged,
        split,
        prep_slots: if fused.is_some() { 1 } else { t.prep.tiles },
        work_den,
        work_dden,
        work_s,
        work_z,
    }
}

/// Step 2: the params every launch shares (addresses, sizes, strides,
/// options); each launch sets its chunk, tile and state mode.
pub fn base_params(
    kind: Kind,
    bp: &BackwardProblem,
    opts: &AttentionOptions,
    ptrs: &RawBackward,
    lay: &Layout,
) -> LinattnBackwardParams {
    let problem = &bp.problem;
    let sp = &problem.shape;
    LinattnBackwardParams {
        q: ptrs.q,
        k: ptrs.k,
        v: ptrs.v,
        d_o: ptrs.d_o,
        dq: ptrs.dq,
        dk: ptrs.dk,
        dv: ptrs.dv,
        cu_seqlens: ptrs.cu_seqlens,
        state_in_s: ptrs.initial_s,
        state_in_z: ptrs.initial_z,
        d_final_s: ptrs.d_final_s,
        d_final_z: ptrs.d_final_z,
        d_initial_s: ptrs.d_initial_s,
        d_initial_z: ptrs.d_initial_z,
        work_den: lay.work_den,
        work_dden: lay.work_dden,
        work_s: lay.work_s,
        work_z: lay.work_z,
        num_seqs: problem.num_seqs as i64,
        heads: sp.heads as i64,
        tokens: sp.tokens as i64,
        d: sp.d as i64,
        m: sp.m as i64,
        q_batch_stride: sp.q.batch as i64,
        q_token_stride: sp.q.token as i64,
        q_head_stride: sp.q.head as i64,
        k_batch_stride: sp.k.batch as i64,
        k_token_stride: sp.k.token as i64,
        k_head_stride: sp.k.head as i64,
        v_batch_stride: sp.v.batch as i64,
        v_token_stride: sp.v.token as i64,
        v_head_stride: sp.v.head as i64,
        o_batch_stride: sp.o.batch as i64,
        o_token_stride: sp.o.token as i64,
        o_head_stride: sp.o.head as i64,
        chunk: 0,
        tile: 0,
        tiles: 0,
        feature_map: opts.feature_map.to_c(),
        normalize: bp.normalize as i32,
        causal: (kind == Kind::Causal) as i32,
        prep_tiles: lay.prep_slots as i32,
        num_parts: if lay.split {
            bp.schedule.parts as i32
        } else {
            1
        },
        part_len: bp.schedule.part_len as i64,
        state_mode: LinattnBackwardState::LINATTN_BWD_WHOLE as i32,
        dq_precision: match opts.dq_precision {
            DqPrecision::Split => LinattnDqPrecision::LINATTN_DQ_SPLIT,
            DqPrecision::Single => LinattnDqPrecision::LINATTN_DQ_SINGLE,
        } as i32,
        eps: opts.eps,
        scale: opts.scale,
    }
}

/// Everything one launch needs besides its pass, tiling, mode and writes.
#[derive(Debug, Clone, Copy)]
pub struct Steps<'a> {
    /// Backward or non-causal.
    pub kind: Kind,
    /// Element type of q, k, v and the gradients.
    pub dtype: DType,
    /// The validated call.
    pub bp: &'a BackwardProblem,
    /// Its addresses.
    pub ptrs: &'a RawBackward,
    /// Step 1.
    pub layout: Layout,
    /// Step 2.
    pub base: LinattnBackwardParams,
    /// The f16 tile choice ([`AttentionOptions::f16_tiles`]): which
    /// kernels the launches name.
    pub tiles: F16Tiles,
}

impl<'a> Steps<'a> {
    /// Steps 1 and 2 for a call.
    pub fn new(
        kind: Kind,
        dtype: DType,
        bp: &'a BackwardProblem,
        opts: &AttentionOptions,
        ptrs: &'a RawBackward,
    ) -> Self {
        let layout = layout(dtype, bp, ptrs);
        let base = base_params(kind, bp, opts, ptrs, &layout);
        Steps {
            kind,
            dtype,
            bp,
            ptrs,
            layout,
            base,
            tiles: opts.f16_tiles,
        }
    }

    /// Bytes `(address, bytes)` of a gradient with its primal's strides.
    fn grad(&self, p: u64, s: &Strides, dim: usize) -> (u64, usize) {
        let sp = &self.bp.problem.shape;
        (
            p,
            sp.span(s, dim)
                .unwrap_or(0)
                .saturating_mul(self.dtype.size()),
        )
    }

    /// One launch of `pass` over its tiling, in state `mode`, naming the
    /// non-empty regions it writes.
    pub fn launch(
        &self,
        pass: Pass,
        pt: PassTiling,
        mode: LinattnBackwardState,
        writes: Vec<(u64, usize)>,
    ) -> BackwardLaunch {
        let sp = &self.bp.problem.shape;
        let (d, m) = (sp.d, sp.m);
        let split_grid = self.layout.split && pass != Pass::StateScan;
        // The whole-head walks are planned only where the state fits their
        // fragments (step 1).
        let threads = match pass {
            Pass::Dkv | Pass::PrepDq => dkv_threads(d, m).unwrap_or(THREADS),
            _ => THREADS,
        };
        BackwardLaunch {
            pass,
            plan: LaunchPlan {
                module: MODULE,
                // Every pass but Dkv, PrepDq and StateScan exists for every
                // dtype and kind, and those are planned only where they
                // exist (step 1).
                kernel: kernel_name(pass, self.dtype, self.tiles).unwrap_or(""),
                grid: [
                    (self.bp.problem.seq_heads() * pt.tiles) as u32,
                    if split_grid {
                        self.bp.schedule.parts as u32
                    } else {
                        1
                    },
                    1,
                ],
                block: [threads, 1, 1],
                shared_bytes: shared_bytes(self.dtype, pass, d, m, pt) as u32,
                params: LinattnBackwardParams {
                    chunk: pt.chunk as i32,
                    tile: pt.tile as i32,
                    tiles: pt.tiles as i32,
                    state_mode: mode as i32,
                    ..self.base
                },
            },
            writes: writes
                .into_iter()
                .filter(|w| w.0 != 0 && w.1 != 0)
                .collect(),
        }
    }

    /// A walk's main launch: from the scanned partition states when split,
    /// else whole.
    fn walk(&self, pass: Pass, pt: PassTiling, writes: Vec<(u64, usize)>) -> BackwardLaunch {
        let mode = if self.layout.split {
            LinattnBackwardState::LINATTN_BWD_FROM_WORK
        } else {
            LinattnBackwardState::LINATTN_BWD_WHOLE
        };
        self.launch(pass, pt, mode, writes)
    }

    /// Step 3 (split schedules only): a whole-head walk's partition sums,
    /// then the scan (`scan` mode) that turns them into each partition's
    /// starting state.
    pub fn split_prelude(
        &self,
        pass: Pass,
        pt: PassTiling,
        scan: LinattnBackwardState,
    ) -> [BackwardLaunch; 2] {
        let sp = &self.bp.problem.shape;
        let scan_tiling = PassTiling {
            chunk: 0,
            tile: 0,
            tiles: scan_blocks(sp.d, sp.m),
        };
        let w = vec![(self.layout.work_s, split_floats(self.bp) * 4)];
        [
            self.launch(
                pass,
                pt,
                LinattnBackwardState::LINATTN_BWD_PARTIALS,
                w.clone(),
            ),
            self.launch(Pass::StateScan, scan_tiling, scan, w),
        ]
    }

    /// Step 4: the normaliser's pieces and dq: prep (when normalising) and
    /// dq, or the fused walk (after its split prelude, when split).
    pub fn prep_dq_launches(&self) -> Vec<BackwardLaunch> {
        let (bp, lay, ptrs) = (self.bp, &self.layout, self.ptrs);
        let sp = &bp.problem.shape;
        let rows = bp.work_rows();
        let work = vec![
            (lay.work_den, rows * 4),
            (lay.work_dden, lay.prep_slots * rows * 4),
        ];
        let dq = self.grad(ptrs.dq, &sp.q, sp.d);
        let mut out = Vec::with_capacity(3);
        match lay.fused {
            Some(pt) => {
                if lay.split {
                    let scan = if self.kind == Kind::Causal {
                        LinattnBackwardState::LINATTN_BWD_SCAN_PREFIX
                    } else {
                        LinattnBackwardState::LINATTN_BWD_SCAN_TOTAL_IN
                    };
                    out.extend(self.split_prelude(Pass::PrepDq, pt, scan));
                }
                let mut writes = if bp.normalize { work } else { Vec::new() };
                writes.push(dq);
                out.push(self.walk(Pass::PrepDq, pt, writes));
            }
            None => {
                if bp.normalize {
                    out.push(self.walk(Pass::Prep, bp.tiling.prep, work));
                }
                out.push(self.walk(Pass::Dq, bp.tiling.dqk, vec![dq]));
            }
        }
        out
    }

    /// Step 5: dk, dv and the initial state's gradient: dk and dv, or the
    /// merged walk (after its split prelude, when split).
    pub fn dk_dv_launches(&self) -> Vec<BackwardLaunch> {
        let (bp, lay, ptrs) = (self.bp, &self.layout, self.ptrs);
        let sp = &bp.problem.shape;
        let (sn, zn) = (bp.problem.state_s_len() * 4, bp.problem.state_z_len() * 4);
        let dk = self.grad(ptrs.dk, &sp.k, sp.d);
        let dv = self.grad(ptrs.dv, &sp.v, sp.m);
        let d_initial = [(ptrs.d_initial_s, sn), (ptrs.d_initial_z, zn)];
        let Some(pt) = lay.merged else {
            return vec![
                self.walk(
                    Pass::Dk,
                    bp.tiling.dqk,
                    [vec![dk], d_initial.to_vec()].concat(),
                ),
                self.walk(Pass::Dv, bp.tiling.dv, vec![dv]),
            ];
        };
        let mut out = Vec::with_capacity(3);
        if lay.split {
            let scan = if self.kind == Kind::Causal {
                LinattnBackwardState::LINATTN_BWD_SCAN_SUFFIX
            } else {
                LinattnBackwardState::LINATTN_BWD_SCAN_TOTAL_FINAL
            };
            out.extend(self.split_prelude(Pass::Dkv, pt, scan));
        }
        out.push(self.walk(Pass::Dkv, pt, [vec![dk, dv], d_initial.to_vec()].concat()));
        out
    }
}

/// Builds the launches ([`Steps`]): prep (when normalising) and dq, or the
/// fused prep + dq walk; then dk and dv, or the merged dk + dv walk. A split
/// schedule (whole-head walks, `bp.schedule.parts > 1`) precedes each walk
/// with its partition sums and the scan: six launches. `docs/kernels.md`
/// describes the sequences.
pub fn plan(
    kind: Kind,
    dtype: DType,
    bp: &BackwardProblem,
    opts: &AttentionOptions,
    ptrs: &RawBackward,
) -> Vec<BackwardLaunch> {
    let steps = Steps::new(kind, dtype, bp, opts, ptrs);
    let mut out = steps.prep_dq_launches();
    out.extend(steps.dk_dv_launches());
    out
}

/// Runs the launches in order, naming what each writes.
///
/// # Safety
/// The plan's addresses must be valid for `exec` (as validated).
pub(crate) unsafe fn run_plan<E: Executor>(exec: &E, launches: &[BackwardLaunch]) -> Result<()> {
    for l in launches {
        // SAFETY: forwarded; the write regions lie inside validated buffers.
        unsafe { exec.launch_writing(&l.plan, &l.writes)? };
    }
    Ok(())
}

/// Validation of raw addresses: non-null where needed, pairs given together,
/// outputs (gradients, workspace) disjoint from inputs and from each other.
pub(crate) fn check_raw(
    kernel: &'static str,
    dtype: DType,
    p: &RawBackward,
    bp: &BackwardProblem,
) -> Result<()> {
    let sp = &bp.problem.shape;
    if sp.tokens > 0 {
        checks::non_null(
            kernel,
            &[
                ("q", p.q),
                ("k", p.k),
                ("v", p.v),
                ("d_o", p.d_o),
                ("dq", p.dq),
                ("dk", p.dk),
                ("dv", p.dv),
            ],
        )?;
    }
    checks::pairs(
        kernel,
        &[
            ("initial", p.initial_s, p.initial_z),
            ("d_final", p.d_final_s, p.d_final_z),
            ("d_initial", p.d_initial_s, p.d_initial_z),
        ],
    )?;
    let ws = workspace_len(bp);
    checks::workspace(kernel, p.workspace, p.workspace_len, ws)?;
    bp.problem.check_device_offsets(kernel, p.cu_seqlens)?;
    let es = dtype.size();
    let bytes = |p: u64, s, dim| byte_range(p, sp.span(s, dim).unwrap_or(usize::MAX), es);
    let (sn, zn) = (bp.problem.state_s_len(), bp.problem.state_z_len());
    let inputs = [
        ("q", bytes(p.q, &sp.q, sp.d)),
        ("k", bytes(p.k, &sp.k, sp.d)),
        ("v", bytes(p.v, &sp.v, sp.m)),
        ("d_o", bytes(p.d_o, &sp.o, sp.m)),
        ("initial state", byte_range(p.initial_s, sn, 4)),
        ("initial state", byte_range(p.initial_z, zn, 4)),
        ("d_final", byte_range(p.d_final_s, sn, 4)),
        ("d_final", byte_range(p.d_final_z, zn, 4)),
    ];
    let outputs = [
        ("dq", bytes(p.dq, &sp.q, sp.d)),
        ("dk", bytes(p.dk, &sp.k, sp.d)),
        ("dv", bytes(p.dv, &sp.v, sp.m)),
        ("d_initial", byte_range(p.d_initial_s, sn, 4)),
        ("d_initial", byte_range(p.d_initial_z, zn, 4)),
        ("workspace", byte_range(p.workspace, ws, 4)),
    ];
    checks::outputs_disjoint(kernel, &inputs, &outputs)
}
