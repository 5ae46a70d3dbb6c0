//! The forward's launch plan: validation of a call ([`validate`] into a
//! [`Problem`]), the workspace it needs ([`workspace_len`]), the raw
//! addresses ([`RawForward`]) and the launches, built in named steps:
//! [`base_params`] (everything but the mode flags), [`walk_launch`] and
//! [`scan_launch`] (one launch each), then [`plan`], which picks the
//! sequence for the call's kind and schedule.

use super::tiling::{
    schedule, tiling, walk_footprint, walk_shared_bytes, Schedule, Tiling, THREADS,
};
use crate::dtype::DType;
use crate::ops::attention::{AttentionOptions, AttentionShape, F16Tiles, Kind};
use crate::ops::checks::{self, byte_range};
use crate::params::{
    LinattnForwardParams, LinattnStateLoad, LinattnStateScanParams, LinattnStateStore,
};
use crate::plan::{Executor, LaunchPlan};
use crate::target::Target;
use crate::{Error, Result};

/// A validated call: everything the plan needs besides addresses.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The shape as given.
    pub shape: AttentionShape,
    /// Sequences (batch, or `cu_seqlens.len() - 1`).
    pub num_seqs: usize,
    /// Longest sequence.
    pub max_len: usize,
    /// The offsets, as the kernels read them (empty for dense).
    pub cu_seqlens: Vec<i64>,
    /// Tiling for (d, m).
    pub tiling: Tiling,
    /// Walk blocks of this call's dtype and tiling the target GPU holds at
    /// once ([`Target::resident_blocks`] of [`walk_footprint`]): the
    /// schedule policy's measure of a full GPU.
    pub resident_walks: usize,
}

impl Problem {
    /// Number of states: sequences x heads.
    pub fn seq_heads(&self) -> usize {
        self.num_seqs * self.shape.heads
    }

    /// fp32 elements of S over all states.
    pub fn state_s_len(&self) -> usize {
        self.seq_heads() * self.shape.d * self.shape.m
    }

    /// fp32 elements of z over all states.
    pub fn state_z_len(&self) -> usize {
        self.seq_heads() * self.shape.d
    }

    /// Every given state pair's lengths `(S, z)` hold this call's states.
    pub(crate) fn check_states(
        &self,
        kernel: &'static str,
        states: &[(&'static str, Option<(usize, usize)>)],
    ) -> Result<()> {
        let (s_need, z_need) = (self.state_s_len(), self.state_z_len());
        for &(arg, st) in states {
            if let Some((s, z)) = st {
                if s < s_need || z < z_need {
                    return Err(Error::invalid(
                        kernel,
                        arg,
                        format!(
                            "expected S of {s_need} and z of {z_need} fp32 elements ({} states of d = {}, m = {}), found {s} and {z}",
                            self.seq_heads(),
                            self.shape.d,
                            self.shape.m
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A varlen call names its device offsets.
    pub(crate) fn check_device_offsets(&self, kernel: &'static str, cu: u64) -> Result<()> {
        if !self.cu_seqlens.is_empty() && cu == 0 {
            return Err(Error::invalid(
                kernel,
                "cu_seqlens",
                "varlen call without device offsets",
            ));
        }
        Ok(())
    }
}

/// Buffer lengths in elements (`usize::MAX` when unknown, as for raw pointers).
#[derive(Debug, Clone, Copy)]
pub struct Lens {
    /// q.
    pub q: usize,
    /// k.
    pub k: usize,
    /// v.
    pub v: usize,
    /// o.
    pub o: usize,
    /// Initial (S, z), if given.
    pub initial: Option<(usize, usize)>,
    /// Final (S, z), if wanted.
    pub final_state: Option<(usize, usize)>,
}

impl Lens {
    /// Lengths the caller cannot vouch for (raw addresses): every tensor
    /// unknown, the states present or absent as given.
    pub fn unknown(initial: bool, final_state: bool) -> Self {
        let pair = |on: bool| on.then_some((usize::MAX, usize::MAX));
        Lens {
            q: usize::MAX,
            k: usize::MAX,
            v: usize::MAX,
            o: usize::MAX,
            initial: pair(initial),
            final_state: pair(final_state),
        }
    }
}

/// Validates a forward call; `cu_seqlens` makes it a varlen call. `target`
/// is the GPU the schedule is planned for (the executor's
/// [`Executor::target`]); it changes the schedule, never the tiling.
pub fn validate(
    kernel: &'static str,
    dtype: DType,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    lens: &Lens,
    target: &Target,
) -> Result<Problem> {
    opts.check(kernel)?;
    checks::dim(kernel, "d", shape.d)?;
    checks::dim(kernel, "m", shape.m)?;
    if shape.batch == 0 || shape.heads == 0 {
        return Err(Error::invalid(
            kernel,
            if shape.batch == 0 { "batch" } else { "heads" },
            "must be at least 1",
        ));
    }
    let (num_seqs, max_len, cu) = match cu_seqlens {
        None => (shape.batch, shape.tokens, Vec::new()),
        Some(cu) => {
            if shape.batch != 1 {
                return Err(Error::invalid(
                    kernel,
                    "shape.batch",
                    format!(
                        "varlen batches are packed along tokens: batch must be 1, found {}",
                        shape.batch
                    ),
                ));
            }
            if cu.len() < 2 || cu[0] != 0 || *cu.last().unwrap_or(&0) != shape.tokens {
                return Err(Error::invalid(kernel, "cu_seqlens", match (cu.first(), cu.last()) {
                    (Some(a), Some(b)) => format!("expected offsets from 0 to tokens = {} (at least two entries), found {} entries from {a} to {b}", shape.tokens, cu.len()),
                    _ => format!("expected offsets from 0 to tokens = {} (at least two entries), found none", shape.tokens),
                }));
            }
            if let Some(w) = cu.windows(2).position(|w| w[1] < w[0]) {
                return Err(Error::invalid(
                    kernel,
                    "cu_seqlens",
                    format!(
                        "offsets decrease at index {}: {} then {}",
                        w + 1,
                        cu[w],
                        cu[w + 1]
                    ),
                ));
            }
            let max_len = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            (
                cu.len() - 1,
                max_len,
                cu.iter().map(|&x| x as i64).collect(),
            )
        }
    };
    for (arg, s, dim, len) in [
        ("q", &shape.q, shape.d, lens.q),
        ("k", &shape.k, shape.d, lens.k),
        ("v", &shape.v, shape.m, lens.v),
        ("o", &shape.o, shape.m, lens.o),
    ] {
        let need = shape.span(s, dim).ok_or_else(|| {
            Error::invalid(kernel, arg, "the tensor's extent overflows 64-bit indexing")
        })?;
        checks::holds(kernel, arg, len, need)?;
    }
    if !shape.rows_disjoint(&shape.o, shape.m) {
        return Err(Error::invalid(
            kernel,
            "o",
            format!(
                "output strides {:?} make rows of {} elements overlap",
                shape.o, shape.m
            ),
        ));
    }
    let tiling = tiling(dtype, shape.d, shape.m);
    let seq_heads = num_seqs.checked_mul(shape.heads);
    let grid_ok = seq_heads.is_some_and(|sh| {
        checks::grid_x_fits(sh, tiling.m_tiles)
            && checks::grid_x_fits(sh, scan_blocks_per_state(shape.d, shape.m))
    });
    let seq_heads = seq_heads.filter(|_| grid_ok).ok_or_else(|| {
        Error::invalid(
            kernel,
            "shape",
            format!(
                "{num_seqs} sequences x {} heads exceed the grid limit",
                shape.heads
            ),
        )
    })?;
    let problem = Problem {
        shape: *shape,
        num_seqs,
        max_len,
        cu_seqlens: cu,
        tiling,
        resident_walks: target.resident_blocks(&walk_footprint(dtype, shape.d, &tiling)),
    };
    seq_heads
        .checked_mul(shape.d * shape.m)
        .filter(|&n| n <= i64::MAX as usize)
        .ok_or_else(|| Error::invalid(kernel, "states", "state size overflows 64-bit indexing"))?;
    problem.check_states(
        kernel,
        &[
            ("initial state", lens.initial),
            ("final state", lens.final_state),
        ],
    )?;
    Ok(problem)
}

fn scan_blocks_per_state(d: usize, m: usize) -> usize {
    (d * m + d).div_ceil(THREADS as usize)
}

/// Device addresses of one forward call (0 = absent where optional).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawForward {
    /// q, `dtype` elements.
    pub q: u64,
    /// k.
    pub k: u64,
    /// v.
    pub v: u64,
    /// o (written).
    pub o: u64,
    /// Initial S and z (fp32), or 0 for zeros.
    pub initial_s: u64,
    /// See `initial_s`.
    pub initial_z: u64,
    /// Final S and z (fp32, written), or 0 when not wanted.
    pub final_s: u64,
    /// See `final_s`.
    pub final_z: u64,
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

/// One launch of a forward plan.
#[derive(Debug, Clone, Copy)]
pub enum Launch {
    /// The chunk walk (any mode).
    Walk(LaunchPlan<LinattnForwardParams>),
    /// The fixed-order state combine.
    Scan(LaunchPlan<LinattnStateScanParams>),
}

/// The launches of one forward call, in order.
#[derive(Debug, Clone)]
pub struct ForwardPlan {
    /// The walk/split decision.
    pub schedule: Schedule,
    /// The launches.
    pub launches: Vec<Launch>,
}

/// Workspace (fp32 elements) a call needs: one state per (sequence-head,
/// partition) for the split causal and every non-causal call, else 0.
pub fn workspace_len(kind: Kind, problem: &Problem, opts: &AttentionOptions) -> usize {
    let s = call_schedule(problem, opts);
    if kind == Kind::Causal && s.parts == 1 {
        return 0;
    }
    let d = problem.shape.d;
    problem.seq_heads() * s.parts * (d * problem.shape.m + d)
}

/// The walk kernels' and the scan's module (`cuda/forward.cu`: one module
/// for both kinds; causality is the params' `causal` flag).
pub(crate) const MODULE: &str = "forward";

/// The op's name in errors: the public entry point of a kind.
pub(crate) fn op_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Causal => "causal_forward",
        Kind::NonCausal => "noncausal_forward",
    }
}

/// The walk kernel's symbol for a dtype and f16 tile choice (the same
/// kernel for both kinds; `tiles` matters for f16 only).
pub fn kernel_name(dtype: DType, tiles: F16Tiles) -> &'static str {
    match (dtype, tiles) {
        (DType::F32, _) => "forward_f32",
        (DType::F16, F16Tiles::F16) => "forward_f16",
        (DType::F16, F16Tiles::Bf16) => "forward_f16_bf16tc",
        (DType::Bf16, _) => "forward_bf16",
    }
}

/// The state scan's symbol (both kinds).
pub(crate) const SCAN_NAME: &str = "forward_state_scan";

/// Step 1: the schedule of a validated call ([`schedule`] with the
/// problem's tiling and resident walks).
pub fn call_schedule(problem: &Problem, opts: &AttentionOptions) -> Schedule {
    schedule(
        opts.schedule,
        problem.seq_heads(),
        &problem.tiling,
        problem.max_len,
        problem.resident_walks,
    )
}

/// The workspace's partition states: S of every (sequence-head,
/// partition), then z (both 0 without a workspace).
fn work_states(problem: &Problem, sched: &Schedule, ptrs: &RawForward) -> (u64, u64) {
    let work_s = ptrs.workspace;
    if work_s == 0 {
        return (0, 0);
    }
    let sp = &problem.shape;
    let s_bytes = problem.seq_heads() * sched.parts * sp.d * sp.m * 4;
    (work_s, work_s + s_bytes as u64)
}

/// Step 2: the walk's params with every address, size and stride filled
/// in, as a causal walk that loads zeros, stores nothing and writes o; the
/// launches below change only the mode fields.
pub fn base_params(
    problem: &Problem,
    opts: &AttentionOptions,
    sched: &Schedule,
    ptrs: &RawForward,
) -> LinattnForwardParams {
    let sp = &problem.shape;
    let t = problem.tiling;
    let (work_s, work_z) = work_states(problem, sched, ptrs);
    LinattnForwardParams {
        q: ptrs.q,
        k: ptrs.k,
        v: ptrs.v,
        o: ptrs.o,
        cu_seqlens: ptrs.cu_seqlens,
        state_in_s: ptrs.initial_s,
        state_in_z: ptrs.initial_z,
        state_out_s: ptrs.final_s,
        state_out_z: ptrs.final_z,
        work_s,
        work_z,
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
        part_len: sched.part_len as i64,
        num_parts: sched.parts as i32,
        chunk: t.chunk as i32,
        m_tile: t.m_tile as i32,
        m_tiles: t.m_tiles as i32,
        feature_map: opts.feature_map.to_c(),
        normalize: opts.normalize as i32,
        causal: 1,
        write_output: 1,
        state_load: LinattnStateLoad::LINATTN_STATE_ZERO as i32,
        state_store: LinattnStateStore::LINATTN_STORE_NONE as i32,
        eps: opts.eps,
        scale: opts.scale,
    }
}

/// Step 3a: one walk launch: a block per (sequence-head, value tile) and
/// partition.
pub fn walk_launch(
    dtype: DType,
    tiles: F16Tiles,
    problem: &Problem,
    sched: &Schedule,
    params: LinattnForwardParams,
) -> Launch {
    let t = problem.tiling;
    Launch::Walk(LaunchPlan {
        module: MODULE,
        kernel: kernel_name(dtype, tiles),
        grid: [
            (problem.seq_heads() * t.m_tiles) as u32,
            sched.parts as u32,
            1,
        ],
        block: [THREADS, 1, 1],
        shared_bytes: walk_shared_bytes(dtype, problem.shape.d, t.chunk, t.m_tile) as u32,
        params,
    })
}

/// Step 3b: the fixed-order combine of the partition states (one thread
/// per state element).
pub fn scan_launch(kind: Kind, problem: &Problem, sched: &Schedule, ptrs: &RawForward) -> Launch {
    let sp = &problem.shape;
    let (work_s, work_z) = work_states(problem, sched, ptrs);
    let bps = scan_blocks_per_state(sp.d, sp.m);
    Launch::Scan(LaunchPlan {
        module: MODULE,
        kernel: SCAN_NAME,
        grid: [(problem.seq_heads() * bps) as u32, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
        params: LinattnStateScanParams {
            cu_seqlens: ptrs.cu_seqlens,
            state_in_s: ptrs.initial_s,
            state_in_z: ptrs.initial_z,
            state_out_s: ptrs.final_s,
            state_out_z: ptrs.final_z,
            work_s,
            work_z,
            num_seqs: problem.num_seqs as i64,
            heads: sp.heads as i64,
            tokens: sp.tokens as i64,
            d: sp.d as i64,
            m: sp.m as i64,
            part_len: sched.part_len as i64,
            num_parts: sched.parts as i32,
            blocks_per_state: bps as i32,
            causal: (kind == Kind::Causal) as i32,
            _pad0: 0,
        },
    })
}

/// Builds the launches for a validated problem and its addresses (the
/// sequences are described in `docs/kernels.md`):
///
/// - causal walk: one walk, loading the initial state (if any) and storing
///   the final one (if wanted);
/// - causal split: partition states (no output), the scan, then every
///   partition from its starting state;
/// - non-causal: the partition states, the scan (unless one partition
///   already holds the total and no state goes in or out), then every
///   query against its sequence's total.
pub fn plan(
    kind: Kind,
    dtype: DType,
    problem: &Problem,
    opts: &AttentionOptions,
    ptrs: &RawForward,
) -> ForwardPlan {
    let sched = call_schedule(problem, opts);
    let base = base_params(problem, opts, &sched, ptrs);
    let walk = |params| walk_launch(dtype, opts.f16_tiles, problem, &sched, params);
    let has_initial = ptrs.initial_s != 0;
    let has_final = ptrs.final_s != 0;
    let partials = walk(LinattnForwardParams {
        write_output: 0,
        state_store: LinattnStateStore::LINATTN_STORE_WORK_PART as i32,
        ..base
    });
    let scan = || scan_launch(kind, problem, &sched, ptrs);
    let launches = match (kind, sched.parts) {
        (Kind::Causal, 1) => vec![walk(LinattnForwardParams {
            state_load: if has_initial {
                LinattnStateLoad::LINATTN_STATE_INITIAL
            } else {
                LinattnStateLoad::LINATTN_STATE_ZERO
            } as i32,
            state_store: if has_final {
                LinattnStateStore::LINATTN_STORE_FINAL
            } else {
                LinattnStateStore::LINATTN_STORE_NONE
            } as i32,
            ..base
        })],
        (Kind::Causal, _) => vec![
            partials,
            scan(),
            walk(LinattnForwardParams {
                state_load: LinattnStateLoad::LINATTN_STATE_WORK_PART as i32,
                ..base
            }),
        ],
        (Kind::NonCausal, parts) => {
            let mut l = vec![partials];
            // With one partition and nothing to add or report, slot 0 already
            // holds the total.
            if parts > 1 || has_initial || has_final {
                l.push(scan());
            }
            l.push(walk(LinattnForwardParams {
                causal: 0,
                state_load: LinattnStateLoad::LINATTN_STATE_WORK_TOTAL as i32,
                ..base
            }));
            l
        }
    };
    ForwardPlan {
        schedule: sched,
        launches,
    }
}

/// Runs every launch of a plan in order. `writes` names every region the
/// launches may write (for the emulator's two-schedule check).
///
/// # Safety
/// The plan's addresses must be valid for `exec` as [`plan`]'s inputs were validated.
pub(crate) unsafe fn run_plan<E: Executor>(
    exec: &E,
    plan: &ForwardPlan,
    writes: &[(u64, usize)],
) -> Result<()> {
    for l in &plan.launches {
        // SAFETY: forwarded.
        unsafe {
            match l {
                Launch::Walk(p) => exec.launch_writing(p, writes)?,
                Launch::Scan(p) => exec.launch_writing(p, writes)?,
            }
        }
    }
    Ok(())
}

/// The regions a forward call writes: o, the final state, the workspace.
pub(crate) fn write_regions(
    problem: &Problem,
    dtype: DType,
    p: &RawForward,
    ws_floats: usize,
) -> Vec<(u64, usize)> {
    let sp = &problem.shape;
    let o_elems = sp.span(&sp.o, sp.m).unwrap_or(0);
    [
        (p.o, o_elems * dtype.size()),
        (p.final_s, problem.state_s_len() * 4),
        (p.final_z, problem.state_z_len() * 4),
        (p.workspace, ws_floats * 4),
    ]
    .into_iter()
    .filter(|&(a, n)| a != 0 && n > 0)
    .collect()
}

/// Validation of raw addresses: non-null where needed, outputs disjoint from
/// inputs and from each other (by address range).
pub(crate) fn check_raw(
    kernel: &'static str,
    dtype: DType,
    p: &RawForward,
    problem: &Problem,
    need_ws: usize,
) -> Result<()> {
    let sp = &problem.shape;
    if sp.tokens > 0 {
        checks::non_null(kernel, &[("q", p.q), ("k", p.k), ("v", p.v), ("o", p.o)])?;
    }
    checks::pairs(
        kernel,
        &[
            ("states", p.initial_s, p.initial_z),
            ("states", p.final_s, p.final_z),
        ],
    )?;
    checks::workspace(kernel, p.workspace, p.workspace_len, need_ws)?;
    problem.check_device_offsets(kernel, p.cu_seqlens)?;
    let es = dtype.size();
    let bytes = |p: u64, s, dim| byte_range(p, sp.span(s, dim).unwrap_or(usize::MAX), es);
    let (sn, zn) = (problem.state_s_len(), problem.state_z_len());
    let inputs = [
        ("q", bytes(p.q, &sp.q, sp.d)),
        ("k", bytes(p.k, &sp.k, sp.d)),
        ("v", bytes(p.v, &sp.v, sp.m)),
        ("initial state", byte_range(p.initial_s, sn, 4)),
        ("initial state", byte_range(p.initial_z, zn, 4)),
        ("workspace", byte_range(p.workspace, need_ws, 4)),
    ];
    let outputs = [
        ("o", bytes(p.o, &sp.o, sp.m)),
        ("final state", byte_range(p.final_s, sn, 4)),
        ("final state", byte_range(p.final_z, zn, 4)),
    ];
    checks::outputs_disjoint(kernel, &inputs, &outputs)
}
