//! `causal_forward.cu` and `noncausal_forward.cu`: linear attention over a
//! batch (or a packed varlen batch) of sequences, feature map and normaliser
//! fused, optional initial state in and final state out (fp32).
//!
//! Layers, as in every op module: a validated [`AttentionShape`] (+ optional
//! `cu_seqlens`), a plain-Rust [`plan`] (tiling, the walk/split policy
//! [`schedule`], the launches), and entry points for [`Device`] buffers
//! ([`causal_forward`], [`noncausal_forward`]), cudarc memory
//! ([`causal_forward_cuda`], [`noncausal_forward_cuda`]) and raw device
//! addresses ([`causal_forward_raw`], [`noncausal_forward_raw`]).
//!
//! States are one per (sequence, head), index `seq * heads + head`: `S` is
//! row-major `d x m` fp32 at `index * d * m`, `z` is `d` fp32 at `index * d`.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::temp;
use crate::device::PtrGuard;
use crate::dtype::{DType, Element};
use crate::params::{
    LinattnForwardParams, LinattnStateLoad, LinattnStateScanParams, LinattnStateStore,
};
use crate::plan::{Executor, LaunchPlan};
use crate::target::{KernelFootprint, Target, MIN_SHARED_PER_BLOCK_OPTIN};
use crate::{Buffer, Device, Error, FeatureMap, Gpu, Result};

/// Largest key size D and value size M the kernels accept.
pub const MAX_DIM: usize = 256;
/// Threads per block of the walk and the state scan (as in the `.cu` files).
pub const THREADS: u32 = 256;
/// Dynamic shared memory one walk block may use: 99 KiB, the largest
/// opt-in every default architecture grants (sm_86/sm_89 allow 99 KiB per
/// block, sm_80 163 KiB, sm_90 227 KiB;
/// [`MIN_SHARED_PER_BLOCK_OPTIN`]). The tiling is deliberately
/// arch-independent: one tiling serves every GPU and the emulator (which
/// refuses anything larger) tests exactly the blocks every GPU runs. Only
/// the schedule depends on the GPU ([`schedule`], [`Target`]). How many
/// such blocks an SM holds does depend on it: at bf16 D = M = 128 (98,176
/// B) two on sm_90 (228 KiB per SM), one on sm_80 (164 KiB) and sm_86/89
/// (100 KiB); see [`Target::blocks_per_sm`].
pub const SHARED_BUDGET_BYTES: usize = MIN_SHARED_PER_BLOCK_OPTIN as usize;
/// Threads of a walk block and the minimum blocks per SM in its
/// `__launch_bounds__(256, 2)` (every `causal_forward_*` and
/// `noncausal_forward_*`): ptxas keeps it within 128 registers, so an SM's
/// 64K registers hold at most two, whatever its shared memory.
pub const WALK_LAUNCH_BOUNDS: (u32, u32) = (THREADS, 2);
const MAX_GRID_X: u64 = i32::MAX as u64;
const MAX_GRID_Y: usize = 65_535;

/// Element strides of one `(batch, heads, tokens, dim)` tensor; the last
/// dimension is contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strides {
    /// Elements between consecutive batch entries.
    pub batch: usize,
    /// Elements between consecutive tokens.
    pub token: usize,
    /// Elements between consecutive heads.
    pub head: usize,
}

impl Strides {
    /// Contiguous `[B, H, N, dim]`.
    pub fn bhnd(heads: usize, tokens: usize, dim: usize) -> Self {
        Strides {
            batch: heads * tokens * dim,
            token: dim,
            head: tokens * dim,
        }
    }

    /// Contiguous `[B, N, H, dim]`.
    pub fn bnhd(heads: usize, tokens: usize, dim: usize) -> Self {
        Strides {
            batch: tokens * heads * dim,
            token: heads * dim,
            head: dim,
        }
    }
}

/// Shapes and strides of q, k (`d` wide), v and o (`m` wide).
///
/// Dense batches: `batch` sequences of `tokens` tokens each. Varlen batches:
/// `batch == 1`, `tokens` is the total, and `cu_seqlens` (passed alongside)
/// cuts the token axis into sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    /// Batch entries (1 for varlen).
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Tokens per sequence (dense) or in total (varlen).
    pub tokens: usize,
    /// Key size D (1..=256).
    pub d: usize,
    /// Value size M (1..=256).
    pub m: usize,
    /// Strides of q.
    pub q: Strides,
    /// Strides of k.
    pub k: Strides,
    /// Strides of v.
    pub v: Strides,
    /// Strides of o.
    pub o: Strides,
}

impl AttentionShape {
    /// All four tensors contiguous `[B, H, N, dim]`.
    pub fn bhnd(batch: usize, heads: usize, tokens: usize, d: usize, m: usize) -> Self {
        let (qk, vo) = (
            Strides::bhnd(heads, tokens, d),
            Strides::bhnd(heads, tokens, m),
        );
        AttentionShape {
            batch,
            heads,
            tokens,
            d,
            m,
            q: qk,
            k: qk,
            v: vo,
            o: vo,
        }
    }

    /// All four tensors contiguous `[B, N, H, dim]`.
    pub fn bnhd(batch: usize, heads: usize, tokens: usize, d: usize, m: usize) -> Self {
        let (qk, vo) = (
            Strides::bnhd(heads, tokens, d),
            Strides::bnhd(heads, tokens, m),
        );
        AttentionShape {
            batch,
            heads,
            tokens,
            d,
            m,
            q: qk,
            k: qk,
            v: vo,
            o: vo,
        }
    }

    /// Packed varlen `[total_tokens, H, dim]` tensors (use with `cu_seqlens`).
    pub fn packed(total_tokens: usize, heads: usize, d: usize, m: usize) -> Self {
        Self::bnhd(1, heads, total_tokens, d, m)
    }

    /// Elements a buffer needs for `strides` over `dim` (None on overflow).
    fn span(&self, s: &Strides, dim: usize) -> Option<usize> {
        if self.tokens == 0 {
            return Some(0);
        }
        (self.batch - 1)
            .checked_mul(s.batch)?
            .checked_add((self.heads - 1).checked_mul(s.head)?)?
            .checked_add((self.tokens - 1).checked_mul(s.token)?)?
            .checked_add(dim)
            .filter(|&n| n <= i64::MAX as usize)
    }
}

/// How the causal forward spreads work (see [`schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ScheduleChoice {
    /// Let the policy decide from the shape.
    #[default]
    Auto,
    /// One block per (sequence-head, value tile) walks every chunk in order.
    Walk,
    /// Cut every sequence into (up to) this many partitions: partition
    /// states, a fixed-order prefix combine, then all partitions in parallel.
    Split {
        /// Partitions per sequence (>= 1; capped by the number of chunks).
        parts: usize,
    },
}

/// Options of the forward kernels and the decode step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// phi applied to q and k.
    pub feature_map: FeatureMap,
    /// Divide by `s phi(q)^T z + eps` (false: the numerator alone).
    ///
    /// Normalised outputs with elu+1 or relu are convex combinations of
    /// values, so within the input's range whatever the size of q, k and
    /// `scale`. The numerator alone, `s phi(q)^T S`, grows with the sequence
    /// and can exceed the output type's range (f16: 65,504): such elements
    /// come out as the infinity of their sign (the correct rounding), while
    /// every element whose exact value fits is finite.
    pub normalize: bool,
    /// Keeps the denominator away from zero (default 1e-6): finite and >= 0,
    /// and > 0 when `normalize` (eps = 0 is an `InvalidArgument` error there,
    /// for the forward, the backward and the decode step alike: relu with
    /// all-negative keys makes a zero denominator routine).
    pub eps: f32,
    /// The scale `s` on phi(q) (default 1.0).
    pub scale: f32,
    /// Walk or split: the forward kernels, and the backward's whole-head
    /// walks ([`crate::ops::backward::split_schedule`]).
    pub schedule: ScheduleChoice,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            feature_map: FeatureMap::EluPlusOne,
            normalize: true,
            eps: 1e-6,
            scale: 1.0,
            schedule: ScheduleChoice::Auto,
        }
    }
}

impl AttentionOptions {
    pub(crate) fn check(&self, kernel: &'static str) -> Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid(
                kernel,
                "opts.eps",
                format!("eps = {}; expected a finite number >= 0", self.eps),
            ));
        }
        // A zero denominator is routine without eps (relu with all-negative
        // keys, an empty prefix): with normalize, eps must keep it away.
        if self.normalize && self.eps == 0.0 {
            return Err(Error::invalid(
                kernel,
                "opts.eps",
                "eps = 0 with normalize = true; expected eps > 0 (o = num / (den + eps) \
                 divides by zero wherever s phi(q)^T z = 0)",
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid(
                kernel,
                "opts.scale",
                format!("scale = {}; expected a finite number", self.scale),
            ));
        }
        if let ScheduleChoice::Split { parts: 0 } = self.schedule {
            return Err(Error::invalid(
                kernel,
                "opts.schedule",
                "Split { parts: 0 }: at least one partition",
            ));
        }
        Ok(())
    }
}

/// Causal (prefix sums) or non-causal (every query sees the whole sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `causal_forward.cu`.
    Causal,
    /// `noncausal_forward.cu`.
    NonCausal,
}

impl Kind {
    fn module(self) -> &'static str {
        match self {
            Kind::Causal => "causal_forward",
            Kind::NonCausal => "noncausal_forward",
        }
    }

    /// The walk kernel's symbol for a dtype.
    pub fn kernel_name(self, dtype: DType) -> &'static str {
        match (self, dtype) {
            (Kind::Causal, DType::F32) => "causal_forward_f32",
            (Kind::Causal, DType::F16) => "causal_forward_f16",
            (Kind::Causal, DType::Bf16) => "causal_forward_bf16",
            (Kind::NonCausal, DType::F32) => "noncausal_forward_f32",
            (Kind::NonCausal, DType::F16) => "noncausal_forward_f16",
            (Kind::NonCausal, DType::Bf16) => "noncausal_forward_bf16",
        }
    }

    fn scan_name(self) -> &'static str {
        match self {
            Kind::Causal => "causal_state_scan",
            Kind::NonCausal => "noncausal_state_scan",
        }
    }
}

/// Rows per chunk and value columns per block, chosen so a block's fp32
/// state slice and chunk tiles fit [`SHARED_BUDGET_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tiling {
    /// Rows per chunk C.
    pub chunk: usize,
    /// Value columns per block.
    pub m_tile: usize,
    /// Blocks per sequence-head along M: `ceil(m / m_tile)`.
    pub m_tiles: usize,
}

/// Whether the walk runs its chunk products on tensor cores: every 16-bit
/// input does (`chunk_walk_mma` in `cuda/include/linattn/walk_mma.cuh`, D
/// padded to a multiple of 16 inside the kernel); f32 runs the fp32 FMA walk.
pub fn uses_mma(dtype: DType) -> bool {
    dtype != DType::F32
}

/// Warps per walk block.
const WARPS: usize = THREADS as usize / 32;
/// The tensor-core walk keeps the fp32 state as accumulator fragments, at
/// most this many 16 x 16 tiles per warp (`kStateFrags`): `DP * m_tile <=
/// 4 * 8 * 256`, which with the output fragments keeps the kernel within
/// its 128 registers.
pub const MMA_STATE_FRAGS: usize = 4;
/// Output accumulator fragments per warp of the tensor-core walk
/// (`kOutFrags`): `chunk * m_tile <= 2 * 8 * 256`.
pub const MMA_OUT_FRAGS: usize = 2;

/// Dynamic shared memory of one walk block in bytes, in the order the
/// kernel carves it. Tensor-core walk (16-bit, `DP` = d rounded up to 16):
/// 16-bit s*phi(q), phi(k) (C x DP+8 each), v (C x MT+8), the state copy
/// (DP x MT+8) and masked scores (C x C+8), then fp32 scores/outputs (C x
/// max(C, MT)+4), a 16 x 16 scratch per warp, z (DP), denominators (C) and
/// the per-tile state scales. fp32 walk: the S slice, z, phi(q) and phi(k)
/// tiles (odd row stride), v, scores and normaliser.
pub fn walk_shared_bytes(dtype: DType, d: usize, chunk: usize, m_tile: usize) -> usize {
    if uses_mma(dtype) {
        let dp = d.next_multiple_of(16);
        let halves =
            2 * chunk * (dp + 8) + chunk * (m_tile + 8) + dp * (m_tile + 8) + chunk * (chunk + 8);
        let floats = chunk * (chunk.max(m_tile) + 4)
            + WARPS * 256
            + dp
            + chunk
            + (dp / 16) * m_tile.div_ceil(16);
        halves * 2 + floats * 4
    } else {
        let dp = d | 1;
        let floats = d * m_tile + d + 2 * chunk * dp + chunk * m_tile + chunk * chunk + chunk;
        floats * 4
    }
}

/// The tiling for key size `d` and value size `m` (both in 1..=256; other
/// sizes get a nominal tiling, never a panic: validation rejects them before
/// any launch).
///
/// Tensor-core walk (16-bit inputs): the fewest value tiles first (each
/// tile recomputes the chunk's scores and reloads q and k), then the largest
/// chunk; value tiles are multiples of 16 and within the per-warp fragment
/// limits ([`MMA_STATE_FRAGS`], [`MMA_OUT_FRAGS`]).
///
/// fp32 walk: largest chunk first (fewer, larger products; less redundant
/// score work per value tile), as long as a value tile of at least `min(m,
/// 32)` columns still fits; value tiles are then balanced so none is nearly
/// empty.
pub fn tiling(dtype: DType, d: usize, m: usize) -> Tiling {
    if !(1..=MAX_DIM).contains(&d) || !(1..=MAX_DIM).contains(&m) {
        return Tiling {
            chunk: 16,
            m_tile: 16,
            m_tiles: 1,
        };
    }
    let fits = |chunk, mt| walk_shared_bytes(dtype, d, chunk, mt) <= SHARED_BUDGET_BYTES;
    if uses_mma(dtype) {
        let dp = d.next_multiple_of(16);
        let frag = WARPS * 256;
        for mt in (16..=m.next_multiple_of(16)).rev().step_by(16) {
            if dp * mt > MMA_STATE_FRAGS * frag {
                continue;
            }
            for chunk in [64usize, 32, 16] {
                if chunk * mt <= MMA_OUT_FRAGS * frag && fits(chunk, mt) {
                    let m_tiles = m.div_ceil(mt);
                    return Tiling {
                        chunk,
                        m_tile: m.div_ceil(m_tiles).next_multiple_of(16),
                        m_tiles,
                    };
                }
            }
        }
        // Chunk 16 with a 16-column value tile fits for every d <= 256.
        return Tiling {
            chunk: 16,
            m_tile: 16,
            m_tiles: m.div_ceil(16),
        };
    }
    for chunk in [64usize, 32, 16, 8] {
        if !fits(chunk, 1) {
            continue;
        }
        let mt_max = (1..=m).rev().find(|&mt| fits(chunk, mt)).unwrap_or(1);
        if mt_max < m.min(32) && chunk != 8 {
            continue;
        }
        let m_tiles = m.div_ceil(mt_max);
        let m_tile = m.div_ceil(m_tiles);
        return Tiling {
            chunk,
            m_tile,
            m_tiles: m.div_ceil(m_tile),
        };
    }
    // Chunk 8 with one value column fits for every d <= 256.
    Tiling {
        chunk: 8,
        m_tile: 1,
        m_tiles: m,
    }
}

/// What one walk block of this tiling asks of an SM (threads, registers
/// from [`WALK_LAUNCH_BOUNDS`], shared memory from [`walk_shared_bytes`]),
/// for [`Target::resident_blocks`].
pub fn walk_footprint(dtype: DType, d: usize, tiling: &Tiling) -> KernelFootprint {
    let (max_threads, min_blocks) = WALK_LAUNCH_BOUNDS;
    KernelFootprint::with_launch_bounds(
        max_threads,
        min_blocks,
        THREADS,
        walk_shared_bytes(dtype, d, tiling.chunk, tiling.m_tile) as u32,
    )
}

/// Walk or split, as decided by [`schedule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Schedule {
    /// Partitions per sequence (1: the state-on-chip walk).
    pub parts: usize,
    /// Tokens per partition (a multiple of the chunk).
    pub part_len: usize,
}

/// The walk/split policy, plain Rust so it is unit-tested without a GPU.
///
/// `blocks = seq_heads * m_tiles` walk blocks each walk a whole sequence
/// of `L` chunks; `resident` is how many the GPU holds at once (SMs times
/// blocks per SM for this walk's shared memory, registers and threads:
/// [`Target::resident_blocks`] of [`walk_footprint`]). Counting time in
/// whole-sequence walks of one block (and taking a block's speed as
/// independent of its neighbours), the walk takes `ceil(blocks /
/// resident)` waves of `L`.
///
/// A split into `p` partitions runs a state-only pass and the output pass,
/// each over `blocks * p` blocks of `L / p` chunks (plus a small scan). The
/// state-only pass does one of the output pass's four chunk products
/// (phi(k)^T v; the output pass also forms the scores, scores * v and
/// phi(q) S), so it costs `c` ~ 1/4 to 1/2 of it. With `p = floor(resident
/// / blocks)` both passes fit one wave: `(1 + c) / p <= 0.75` of the walk
/// when `p >= 2`. With `p = 1` (more than half the resident slots already
/// busy) any split spills into a second wave and costs more than it
/// saves (`blocks = 0.6 * resident`, `p = 2`: two waves of `L / 2` per
/// pass, `(1 + c) L >= L`). So: split, with `p = floor(resident / blocks)`
/// partitions of at least two chunks each, when that gives `p >= 2`; else
/// walk (one launch, no workspace). The non-causal forward runs the state
/// pass anyway, so there the same rule is conservative.
///
/// Examples (bf16, D = M = 128: 98,176 B per block, two value tiles): on
/// an H200 (132 SMs, two blocks each: 264 resident) B1 T8192 H96 has 192
/// blocks: `p = 1`, walk, every SM busy; on an A100 (108 SMs, one block
/// each: 108 resident) it walks in two waves, as a split would too. B1 H1
/// T8192 (2 blocks, 128 chunks) splits into `min(264 / 2, 128 / 2) = 64`
/// partitions on the H200; on an A100 `floor(108 / 2) = 54` asked become
/// 43 partitions of three whole chunks.
pub fn schedule(
    choice: ScheduleChoice,
    seq_heads: usize,
    tiling: &Tiling,
    max_len: usize,
    resident: usize,
) -> Schedule {
    let chunk = tiling.chunk;
    let chunks = max_len.div_ceil(chunk).max(1);
    let walk = Schedule {
        parts: 1,
        part_len: chunks * chunk,
    };
    let parts = match choice {
        ScheduleChoice::Walk => return walk,
        ScheduleChoice::Split { parts } => parts.max(1),
        ScheduleChoice::Auto => {
            let blocks = seq_heads.saturating_mul(tiling.m_tiles).max(1);
            let parts = (resident / blocks).min(chunks / 2);
            if parts < 2 {
                return walk;
            }
            parts
        }
    };
    let parts = parts.min(chunks).min(MAX_GRID_Y);
    let part_len = chunks.div_ceil(parts) * chunk;
    Schedule {
        parts: max_len.div_ceil(part_len).max(1),
        part_len,
    }
}

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
}

fn check_dim(kernel: &'static str, arg: &'static str, v: usize) -> Result<()> {
    if v == 0 || v > MAX_DIM {
        return Err(Error::invalid(
            kernel,
            arg,
            format!("{arg} = {v}; supported sizes are 1..={MAX_DIM}"),
        ));
    }
    Ok(())
}

/// Whether rows of `dim` elements at these strides can never share an
/// element: sorted by stride, each stride must clear the extent of the
/// smaller axes. Conservative (interleavings that happen not to collide are
/// rejected), which is fine for an output.
fn rows_disjoint(counts: &[(usize, usize)], dim: usize) -> bool {
    let mut axes: Vec<(usize, usize)> = counts.iter().copied().filter(|&(n, _)| n > 1).collect();
    axes.sort_by_key(|&(_, s)| s);
    let mut reach = dim;
    for (n, s) in axes {
        if s < reach {
            return false;
        }
        reach = reach.saturating_add((n - 1).saturating_mul(s));
    }
    true
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
    check_dim(kernel, "d", shape.d)?;
    check_dim(kernel, "m", shape.m)?;
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
                return Err(Error::invalid(kernel, "cu_seqlens", format!("expected offsets from 0 to tokens = {} (at least two entries), found {} entries starting {:?} and ending {:?}", shape.tokens, cu.len(), cu.first(), cu.last())));
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
        if len < need {
            return Err(Error::invalid(
                kernel,
                arg,
                format!("buffer holds {len} elements, the shape and strides need {need}"),
            ));
        }
    }
    if !rows_disjoint(
        &[
            (shape.batch, shape.o.batch),
            (shape.heads, shape.o.head),
            (shape.tokens, shape.o.token),
        ],
        shape.m,
    ) {
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
    let grid_ok = seq_heads
        .and_then(|sh| sh.checked_mul(tiling.m_tiles))
        .is_some_and(|b| (b as u64) <= MAX_GRID_X)
        && seq_heads
            .and_then(|sh| sh.checked_mul(scan_blocks_per_state(shape.d, shape.m)))
            .is_some_and(|b| (b as u64) <= MAX_GRID_X);
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
    let (s_need, z_need) = (
        seq_heads
            .checked_mul(shape.d * shape.m)
            .filter(|&n| n <= i64::MAX as usize),
        seq_heads * shape.d,
    );
    let s_need = s_need
        .ok_or_else(|| Error::invalid(kernel, "states", "state size overflows 64-bit indexing"))?;
    for (arg, st) in [
        ("initial state", lens.initial),
        ("final state", lens.final_state),
    ] {
        if let Some((s, z)) = st {
            if s < s_need || z < z_need {
                return Err(Error::invalid(kernel, arg, format!("expected S of {s_need} and z of {z_need} fp32 elements ({seq_heads} states of d = {}, m = {}), found {s} and {z}", shape.d, shape.m)));
            }
        }
    }
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
    let s = schedule(
        opts.schedule,
        problem.seq_heads(),
        &problem.tiling,
        problem.max_len,
        problem.resident_walks,
    );
    if kind == Kind::Causal && s.parts == 1 {
        return 0;
    }
    let d = problem.shape.d;
    problem.seq_heads() * s.parts * (d * problem.shape.m + d)
}

/// Builds the launches for a validated problem and its addresses.
pub fn plan(
    kind: Kind,
    dtype: DType,
    problem: &Problem,
    opts: &AttentionOptions,
    ptrs: &RawForward,
) -> ForwardPlan {
    let sh = problem.seq_heads();
    let t = problem.tiling;
    let sched = schedule(
        opts.schedule,
        sh,
        &t,
        problem.max_len,
        problem.resident_walks,
    );
    let sp = &problem.shape;
    let (d, m) = (sp.d, sp.m);
    let work_s = ptrs.workspace;
    let work_z = if work_s == 0 {
        0
    } else {
        work_s + (sh * sched.parts * d * m * 4) as u64
    };
    let has_initial = ptrs.initial_s != 0;
    let has_final = ptrs.final_s != 0;
    let base = LinattnForwardParams {
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
        d: d as i64,
        m: m as i64,
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
    };
    let walk = |params: LinattnForwardParams| {
        Launch::Walk(LaunchPlan {
            module: kind.module(),
            kernel: kind.kernel_name(dtype),
            grid: [(sh * t.m_tiles) as u32, sched.parts as u32, 1],
            block: [THREADS, 1, 1],
            shared_bytes: walk_shared_bytes(dtype, d, t.chunk, t.m_tile) as u32,
            params,
        })
    };
    let bps = scan_blocks_per_state(d, m);
    let scan = Launch::Scan(LaunchPlan {
        module: kind.module(),
        kernel: kind.scan_name(),
        grid: [(sh * bps) as u32, 1, 1],
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
            d: d as i64,
            m: m as i64,
            part_len: sched.part_len as i64,
            num_parts: sched.parts as i32,
            blocks_per_state: bps as i32,
            causal: (kind == Kind::Causal) as i32,
            _pad0: 0,
        },
    });
    let partials = walk(LinattnForwardParams {
        write_output: 0,
        state_store: LinattnStateStore::LINATTN_STORE_WORK_PART as i32,
        ..base
    });
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
            scan,
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
                l.push(scan);
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
unsafe fn run_plan<E: Executor>(
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
fn write_regions(
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

/// q, k and v of a call.
#[derive(Debug, Clone, Copy)]
pub struct Qkv<'a, B> {
    /// Queries, `d` wide.
    pub q: &'a B,
    /// Keys, `d` wide.
    pub k: &'a B,
    /// Values, `m` wide.
    pub v: &'a B,
}

/// A read-only state pair (fp32 S and z).
#[derive(Debug)]
pub struct StateRef<'a, B> {
    /// S, `states * d * m`.
    pub s: &'a B,
    /// z, `states * d`.
    pub z: &'a B,
}

/// A writable state pair (fp32 S and z).
#[derive(Debug)]
pub struct StateMut<'a, B> {
    /// S, `states * d * m`.
    pub s: &'a mut B,
    /// z, `states * d`.
    pub z: &'a mut B,
}

/// The optional initial state read and final state written by a call.
#[derive(Debug)]
pub struct StateIo<'a, I, F> {
    /// Start from this state (zeros when `None`).
    pub initial: Option<StateRef<'a, I>>,
    /// Write the state after the last token here.
    pub final_state: Option<StateMut<'a, F>>,
}

impl<I, F> StateIo<'_, I, F> {
    /// No initial state, no final state.
    pub fn none() -> Self {
        StateIo {
            initial: None,
            final_state: None,
        }
    }
}

fn ptr_pair<'a>(
    st: &'a Option<StateRef<'a, Buffer<f32>>>,
    dev: &'a Device,
    kernel: &'static str,
) -> Result<(u64, u64, Vec<PtrGuard<'a>>)> {
    match st {
        None => Ok((0, 0, Vec::new())),
        Some(s) => {
            let (ps, gs) = s.s.read_ptr(dev, kernel, "initial.s")?;
            let (pz, gz) = s.z.read_ptr(dev, kernel, "initial.z")?;
            Ok((ps, pz, vec![gs, gz]))
        }
    }
}

// Private dispatcher: the public entry points pin `kind`.
#[allow(clippy::too_many_arguments)]
fn forward_device<T: Element>(
    kind: Kind,
    dev: &Device,
    x: Qkv<'_, Buffer<T>>,
    o: &mut Buffer<T>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: StateIo<'_, Buffer<f32>, Buffer<f32>>,
) -> Result<()> {
    let kernel = kind.module();
    let lens = Lens {
        q: x.q.len(),
        k: x.k.len(),
        v: x.v.len(),
        o: o.len(),
        initial: states.initial.as_ref().map(|s| (s.s.len(), s.z.len())),
        final_state: states.final_state.as_ref().map(|s| (s.s.len(), s.z.len())),
    };
    let problem = validate(
        kernel,
        T::DTYPE,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &dev.target(),
    )?;
    let (_tc, cu) = temp::offsets(dev, &problem.cu_seqlens, kernel)?;
    let ws_floats = workspace_len(kind, &problem, opts);
    let (_tw, ws) = temp::workspace(dev, ws_floats, kernel)?;
    let (qp, _gq) = x.q.read_ptr(dev, kernel, "q")?;
    let (kp, _gk) = x.k.read_ptr(dev, kernel, "k")?;
    let (vp, _gv) = x.v.read_ptr(dev, kernel, "v")?;
    let (op, _go) = o.write_ptr(dev, kernel, "o")?;
    let (is, iz, _gi) = ptr_pair(&states.initial, dev, kernel)?;
    let mut fin = states.final_state;
    let (fs, fz, _gf) = match fin.as_mut() {
        None => (0, 0, Vec::new()),
        Some(f) => {
            let (ps, gs) = f.s.write_ptr(dev, kernel, "final.s")?;
            let (pz, gz) = f.z.write_ptr(dev, kernel, "final.z")?;
            (ps, pz, vec![gs, gz])
        }
    };
    let ptrs = RawForward {
        q: qp,
        k: kp,
        v: vp,
        o: op,
        initial_s: is,
        initial_z: iz,
        final_s: fs,
        final_z: fz,
        cu_seqlens: cu,
        workspace: ws,
        workspace_len: ws_floats,
    };
    let plan = plan(kind, T::DTYPE, &problem, opts, &ptrs);
    let writes = write_regions(&problem, T::DTYPE, &ptrs, ws_floats);
    // SAFETY: every buffer belongs to `dev` and was validated against the shape.
    unsafe { run_plan(dev, &plan, &writes) }
}

/// Causal linear attention on a [`Device`]:
/// `o_i = s phi(q_i)^T S_i / (s phi(q_i)^T z_i + eps)`, prefix sums over
/// `j <= i` starting from `states.initial`; the state after the last token
/// goes to `states.final_state`. `cu_seqlens` (host offsets) makes it a
/// packed varlen call (`shape.batch == 1`).
pub fn causal_forward<T: Element>(
    dev: &Device,
    x: Qkv<'_, Buffer<T>>,
    o: &mut Buffer<T>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: StateIo<'_, Buffer<f32>, Buffer<f32>>,
) -> Result<()> {
    forward_device(Kind::Causal, dev, x, o, shape, cu_seqlens, opts, states)
}

/// Non-causal linear attention on a [`Device`]: every query reads the state
/// of its whole sequence (plus `states.initial`); `states.final_state`
/// receives that state.
pub fn noncausal_forward<T: Element>(
    dev: &Device,
    x: Qkv<'_, Buffer<T>>,
    o: &mut Buffer<T>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: StateIo<'_, Buffer<f32>, Buffer<f32>>,
) -> Result<()> {
    forward_device(Kind::NonCausal, dev, x, o, shape, cu_seqlens, opts, states)
}

#[allow(clippy::too_many_arguments)]
fn forward_cuda<T: Element, B: DevicePtr<T>, I: DevicePtr<f32>, F: DevicePtrMut<f32>>(
    kind: Kind,
    gpu: &Gpu,
    x: Qkv<'_, B>,
    o: &mut impl DevicePtrMut<T>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: StateIo<'_, I, F>,
) -> Result<()> {
    let kernel = kind.module();
    let lens = Lens {
        q: x.q.len(),
        k: x.k.len(),
        v: x.v.len(),
        o: o.len(),
        initial: states.initial.as_ref().map(|s| (s.s.len(), s.z.len())),
        final_state: states.final_state.as_ref().map(|s| (s.s.len(), s.z.len())),
    };
    let problem = validate(
        kernel,
        T::DTYPE,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &gpu.target(),
    )?;
    let st = gpu.stream();
    let (_tc, cu) = temp::offsets_cuda(gpu, &problem.cu_seqlens, kernel)?;
    let ws_floats = workspace_len(kind, &problem, opts);
    let (_tw, ws) = temp::workspace_cuda(gpu, ws_floats, kernel)?;
    let (qp, _gq) = x.q.device_ptr(st);
    let (kp, _gk) = x.k.device_ptr(st);
    let (vp, _gv) = x.v.device_ptr(st);
    let (op, _go) = o.device_ptr_mut(st);
    let (mut is, mut iz, mut gi) = (0, 0, Vec::new());
    if let Some(s) = states.initial.as_ref() {
        let (a, ga) = s.s.device_ptr(st);
        let (b, gb) = s.z.device_ptr(st);
        (is, iz) = (a, b);
        gi.push(ga);
        gi.push(gb);
    }
    let mut fin = states.final_state;
    let (mut fs, mut fz, mut gf) = (0, 0, Vec::new());
    if let Some(f) = fin.as_mut() {
        let (a, ga) = f.s.device_ptr_mut(st);
        let (b, gb) = f.z.device_ptr_mut(st);
        (fs, fz) = (a, b);
        gf.push(ga);
        gf.push(gb);
    }
    let ptrs = RawForward {
        q: qp,
        k: kp,
        v: vp,
        o: op,
        initial_s: is,
        initial_z: iz,
        final_s: fs,
        final_z: fz,
        cu_seqlens: cu,
        workspace: ws,
        workspace_len: ws_floats,
    };
    let plan = plan(kind, T::DTYPE, &problem, opts, &ptrs);
    // SAFETY: cudarc memory of this context, validated lengths.
    unsafe { run_plan(gpu, &plan, &[]) }
}

/// [`causal_forward`] on cudarc memory (slices or views), on `gpu`'s stream.
pub fn causal_forward_cuda<T: Element, B: DevicePtr<T>, I: DevicePtr<f32>, F: DevicePtrMut<f32>>(
    gpu: &Gpu,
    x: Qkv<'_, B>,
    o: &mut impl DevicePtrMut<T>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: StateIo<'_, I, F>,
) -> Result<()> {
    forward_cuda(Kind::Causal, gpu, x, o, shape, cu_seqlens, opts, states)
}

/// [`noncausal_forward`] on cudarc memory (slices or views), on `gpu`'s stream.
pub fn noncausal_forward_cuda<
    T: Element,
    B: DevicePtr<T>,
    I: DevicePtr<f32>,
    F: DevicePtrMut<f32>,
>(
    gpu: &Gpu,
    x: Qkv<'_, B>,
    o: &mut impl DevicePtrMut<T>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: StateIo<'_, I, F>,
) -> Result<()> {
    forward_cuda(Kind::NonCausal, gpu, x, o, shape, cu_seqlens, opts, states)
}

/// The bytes `[start, end)` a buffer covers; absent (null) buffers cover none.
fn byte_range(p: u64, elems: usize, size: usize) -> (u64, u64) {
    if p == 0 {
        return (0, 0);
    }
    (
        p,
        p.saturating_add((elems as u64).saturating_mul(size as u64)),
    )
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 != a.1 && b.0 != b.1
}

/// Validation of raw addresses: non-null where needed, outputs disjoint from
/// inputs and from each other (by address range).
fn check_raw(
    kernel: &'static str,
    dtype: DType,
    p: &RawForward,
    problem: &Problem,
    need_ws: usize,
) -> Result<()> {
    let sp = &problem.shape;
    for (arg, v) in [("q", p.q), ("k", p.k), ("v", p.v), ("o", p.o)] {
        if v == 0 && sp.tokens > 0 {
            return Err(Error::invalid(kernel, arg, "null pointer"));
        }
    }
    if (p.initial_s == 0) != (p.initial_z == 0) || (p.final_s == 0) != (p.final_z == 0) {
        return Err(Error::invalid(
            kernel,
            "states",
            "S and z must be given together (both or neither)",
        ));
    }
    if need_ws > 0 && (p.workspace == 0 || p.workspace_len < need_ws) {
        return Err(Error::invalid(
            kernel,
            "workspace",
            format!(
                "this call needs a workspace of {need_ws} fp32 elements, {} given",
                if p.workspace == 0 { 0 } else { p.workspace_len }
            ),
        ));
    }
    if !problem.cu_seqlens.is_empty() && p.cu_seqlens == 0 {
        return Err(Error::invalid(
            kernel,
            "cu_seqlens",
            "varlen call without device offsets",
        ));
    }
    let es = dtype.size();
    let span = |s: &Strides, dim| sp.span(s, dim).unwrap_or(usize::MAX);
    let o = byte_range(p.o, span(&sp.o, sp.m), es);
    let inputs = [
        ("q", byte_range(p.q, span(&sp.q, sp.d), es)),
        ("k", byte_range(p.k, span(&sp.k, sp.d), es)),
        ("v", byte_range(p.v, span(&sp.v, sp.m), es)),
        (
            "initial state",
            byte_range(p.initial_s, problem.state_s_len(), 4),
        ),
        (
            "initial state",
            byte_range(p.initial_z, problem.state_z_len(), 4),
        ),
        ("workspace", byte_range(p.workspace, need_ws, 4)),
    ];
    let outputs = [
        ("o", o),
        (
            "final state",
            byte_range(p.final_s, problem.state_s_len(), 4),
        ),
        (
            "final state",
            byte_range(p.final_z, problem.state_z_len(), 4),
        ),
    ];
    for (i, (oa, orng)) in outputs.iter().enumerate() {
        for (ia, irng) in inputs.iter().chain(outputs[i + 1..].iter()) {
            if overlaps(*orng, *irng) {
                return Err(Error::invalid(
                    kernel,
                    oa,
                    format!("output overlaps `{ia}`"),
                ));
            }
        }
    }
    Ok(())
}

unsafe fn forward_raw<E: Executor>(
    kind: Kind,
    exec: &E,
    dtype: DType,
    ptrs: &RawForward,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<()> {
    let kernel = kind.module();
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
    let ws_floats = workspace_len(kind, &problem, opts);
    check_raw(kernel, dtype, ptrs, &problem, ws_floats)?;
    let plan = plan(kind, dtype, &problem, opts, ptrs);
    let writes = write_regions(&problem, dtype, ptrs, ws_floats);
    // SAFETY: forwarded to the caller.
    unsafe { run_plan(exec, &plan, &writes) }
}

/// [`causal_forward`] on raw device addresses, for engines that manage
/// their own memory. Get the workspace size from [`workspace_len`] (with the
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
pub unsafe fn causal_forward_raw<E: Executor>(
    exec: &E,
    dtype: DType,
    ptrs: &RawForward,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<()> {
    // SAFETY: forwarded.
    unsafe { forward_raw(Kind::Causal, exec, dtype, ptrs, shape, cu_seqlens, opts) }
}

/// [`noncausal_forward`] on raw device addresses.
///
/// # Safety
/// As for [`causal_forward_raw`].
pub unsafe fn noncausal_forward_raw<E: Executor>(
    exec: &E,
    dtype: DType,
    ptrs: &RawForward,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<()> {
    // SAFETY: forwarded.
    unsafe { forward_raw(Kind::NonCausal, exec, dtype, ptrs, shape, cu_seqlens, opts) }
}

#[cfg(test)]
mod tests {
    use super::*;
    const H200: Target = Target::H200;

    fn lens_for(shape: &AttentionShape) -> Lens {
        Lens {
            q: shape.span(&shape.q, shape.d).unwrap(),
            k: shape.span(&shape.k, shape.d).unwrap(),
            v: shape.span(&shape.v, shape.m).unwrap(),
            o: shape.span(&shape.o, shape.m).unwrap(),
            initial: None,
            final_state: None,
        }
    }

    #[test]
    fn tiling_fits_shared_memory_for_every_size() {
        for d in 1..=MAX_DIM {
            for m in [1, 2, 17, 31, 64, 100, 128, 255, 256] {
                for dtype in [DType::F16, DType::Bf16] {
                    let t = tiling(dtype, d, m);
                    let bytes = walk_shared_bytes(dtype, d, t.chunk, t.m_tile);
                    assert!(bytes <= SHARED_BUDGET_BYTES, "d {d} m {m}: {t:?}");
                    assert_eq!(t.m_tile % 16, 0, "d {d} m {m}: {t:?}");
                    assert_eq!(t.chunk % 16, 0, "d {d} m {m}: {t:?}");
                    assert!(t.m_tile <= m.next_multiple_of(16));
                    assert_eq!(t.m_tiles, m.div_ceil(t.m_tile), "d {d} m {m}");
                    assert!((t.m_tiles - 1) * t.m_tile < m);
                    // Within the kernel's per-warp fragment arrays.
                    let frags = |rows: usize| (rows / 16) * (t.m_tile / 16);
                    assert!(
                        frags(d.next_multiple_of(16)) <= MMA_STATE_FRAGS * WARPS,
                        "{t:?}"
                    );
                    assert!(frags(t.chunk) <= MMA_OUT_FRAGS * WARPS, "{t:?}");
                }
                let t = tiling(DType::F32, d, m);
                let bytes = walk_shared_bytes(DType::F32, d, t.chunk, t.m_tile);
                assert!(
                    bytes <= SHARED_BUDGET_BYTES,
                    "d {d} m {m}: {t:?} needs {bytes}"
                );
                assert!(t.m_tile >= 1 && t.m_tile <= m);
                assert_eq!(t.m_tiles, m.div_ceil(t.m_tile), "d {d} m {m}");
                // Tiles are balanced: the last one is not nearly empty.
                assert!(m - (t.m_tiles - 1) * t.m_tile >= 1);
                assert!((t.m_tiles - 1) * t.m_tile < m);
            }
        }
        assert_eq!(tiling(DType::F32, 16, 16).chunk, 64);
        assert_eq!(tiling(DType::F32, 64, 64).m_tiles, 1);
    }

    #[test]
    fn tensor_core_policy() {
        assert!(uses_mma(DType::F16) && uses_mma(DType::Bf16));
        assert!(!uses_mma(DType::F32));
        // The first anchor shape (D = M = 128): chunk 64, two 64-column
        // value tiles (the state fragments cap D * MT at 8192).
        for dtype in [DType::F16, DType::Bf16] {
            let t = tiling(dtype, 128, 128);
            assert_eq!((t.chunk, t.m_tile, t.m_tiles), (64, 64, 2));
            // D = M = 64: one value tile, chunk 64.
            let t = tiling(dtype, 64, 64);
            assert_eq!((t.chunk, t.m_tile, t.m_tiles), (64, 64, 1));
            // D not a multiple of 16 is padded, not sent to the fp32 walk.
            let t = tiling(dtype, 17, 5);
            assert_eq!((t.chunk, t.m_tile, t.m_tiles), (64, 16, 1));
        }
        // Sizes outside 1..=256 (rejected by validation) never panic here.
        for (d, m) in [(0, 0), (0, 7), (300, 5), (5, 1000), (usize::MAX / 4, 1)] {
            for dtype in [DType::F32, DType::F16, DType::Bf16] {
                let t = tiling(dtype, d, m);
                assert!(t.chunk >= 8 && t.m_tile >= 1 && t.m_tiles >= 1, "{t:?}");
            }
        }
        // The layout the kernel carves at D = M = 128, chunk 64, tile 64.
        let halves = 2 * 64 * 136 + 64 * 72 + 128 * 72 + 64 * 72;
        let floats = 64 * 68 + 8 * 256 + 128 + 64 + 8 * 4;
        assert_eq!(
            walk_shared_bytes(DType::Bf16, 128, 64, 64),
            halves * 2 + floats * 4
        );
    }

    #[test]
    fn policy_walks_when_the_gpu_is_full_and_splits_when_not() {
        let t = tiling(DType::F32, 128, 128);
        let resident = H200.resident_blocks(&walk_footprint(DType::F32, 128, &t));
        assert!(resident >= 132, "{resident}");
        // Many seq-heads: walk.
        let s = schedule(ScheduleChoice::Auto, 1024, &t, 8192, resident);
        assert_eq!(s.parts, 1);
        assert!(s.part_len >= 8192);
        // One seq-head, long sequence: split to fill the GPU.
        let s = schedule(ScheduleChoice::Auto, 1, &t, 8192, resident);
        assert!(s.parts > 1);
        assert!(s.parts * s.part_len >= 8192 && (s.parts - 1) * s.part_len < 8192);
        assert_eq!(s.part_len % t.chunk, 0);
        assert!(s.part_len >= 2 * t.chunk);
        // Short sequences never split.
        let auto = |sh, n| schedule(ScheduleChoice::Auto, sh, &t, n, resident).parts;
        assert_eq!(auto(1, 2 * t.chunk), 1);
        assert_eq!(auto(1, 3 * t.chunk), 1);
        assert_eq!(auto(1, 0), 1);
        // A GPU reporting nothing resident never splits (and never divides by 0).
        assert_eq!(schedule(ScheduleChoice::Auto, 0, &t, 8192, 0).parts, 1);
        // Forced choices; partitions are capped by the chunks there are.
        assert_eq!(
            schedule(ScheduleChoice::Walk, 1, &t, 8192, resident).parts,
            1
        );
        let s = schedule(ScheduleChoice::Split { parts: 3 }, 1, &t, 5 * t.chunk, 0);
        assert_eq!((s.parts, s.part_len), (3, 2 * t.chunk));
        let s = schedule(ScheduleChoice::Split { parts: 100 }, 4, &t, 3, resident);
        assert_eq!((s.parts, s.part_len), (1, t.chunk));
        // Partitions exactly cover every length.
        for n in 1..300 {
            for parts in 1..6 {
                let s = schedule(ScheduleChoice::Split { parts }, 1, &t, n, resident);
                assert!(s.parts * s.part_len >= n && (s.parts - 1) * s.part_len < n);
                assert!(s.parts <= parts);
            }
        }
    }

    /// The policy per architecture at bf16 D = M = 128 (98,176 B per walk
    /// block, two value tiles): sm_90 holds two blocks per SM, sm_80 and
    /// sm_86/89 one, and the decisions follow the SM counts.
    #[test]
    fn policy_per_architecture() {
        let t = tiling(DType::Bf16, 128, 128);
        assert_eq!((t.chunk, t.m_tiles), (64, 2));
        let fp = walk_footprint(DType::Bf16, 128, &t);
        assert_eq!(fp.shared_bytes, 98_176);
        let a100 = Target::A100;
        let sm86 = Target::sm86(84);
        let sm89 = Target::sm89(142);
        let per_sm: Vec<u32> = [H200, a100, sm86, sm89]
            .iter()
            .map(|g| g.blocks_per_sm(&fp))
            .collect();
        assert_eq!(per_sm, [2, 1, 1, 1]);
        let auto = |g: &Target, sh: usize, n: usize| {
            schedule(ScheduleChoice::Auto, sh, &t, n, g.resident_blocks(&fp)).parts
        };
        // First anchor, B1 T8192 H96: 192 blocks. H200: 264 resident, a
        // split would spill into a second wave: walk. A100 (108), sm_86
        // (84): two or three waves already: walk.
        for g in [&H200, &a100, &sm86, &sm89] {
            assert_eq!(auto(g, 96, 8192), 1, "{}", g.arch());
        }
        // 66 seq-heads = 132 blocks: half the H200's slots, split in two;
        // the A100 is already full.
        assert_eq!(auto(&H200, 66, 8192), 2);
        assert_eq!(auto(&a100, 66, 8192), 1);
        assert_eq!(auto(&sm86, 66, 8192), 1);
        // 67 seq-heads (134 blocks): past half of 264, walk.
        assert_eq!(auto(&H200, 67, 8192), 1);
        // B1 H1 T8192: 2 blocks, 128 chunks. H200 and sm_89 (142 SMs):
        // capped at 64 partitions of two chunks. A100: 54 asked, whole
        // chunks per partition make it 43 of three; sm_86: 42 asked, 32 of
        // four.
        assert_eq!(auto(&H200, 1, 8192), 64);
        assert_eq!(auto(&a100, 1, 8192), 43);
        assert_eq!(auto(&sm86, 1, 8192), 32);
        assert_eq!(auto(&sm89, 1, 8192), 64);
        // 16 seq-heads (32 blocks): 264 / 32 = 8 on the H200, 108 / 32 = 3
        // on the A100 (one wave of 96, not two waves of 128), 2 on sm_86.
        assert_eq!(auto(&H200, 16, 8192), 8);
        assert_eq!(auto(&a100, 16, 8192), 3);
        assert_eq!(auto(&sm86, 16, 8192), 2);
        // Whatever the partitions, the grid stays within one wave.
        for g in [&H200, &a100, &sm86, &sm89] {
            for sh in 1..200 {
                let p = auto(g, sh, 1 << 16);
                if p > 1 {
                    assert!(sh * 2 * p <= g.resident_blocks(&fp), "{} {sh}", g.arch());
                }
            }
        }
    }

    /// The footprint the policy assumes is the one the `.cu` files declare.
    #[test]
    fn walk_launch_bounds_match_the_sources() {
        let (threads, min_blocks) = WALK_LAUNCH_BOUNDS;
        let bounds = format!("__launch_bounds__({threads}, {min_blocks})");
        for (src, kind) in [
            (
                include_str!("../../../../cuda/causal_forward.cu"),
                Kind::Causal,
            ),
            (
                include_str!("../../../../cuda/noncausal_forward.cu"),
                Kind::NonCausal,
            ),
        ] {
            for dtype in [DType::F32, DType::F16, DType::Bf16] {
                let decl = format!("{bounds} {}(", kind.kernel_name(dtype));
                assert!(src.contains(&decl), "missing `{decl}`");
            }
        }
    }

    #[test]
    fn plans_have_the_expected_launches() {
        let shape = AttentionShape::bhnd(1, 2, 300, 32, 48);
        let mut opts = AttentionOptions::default();
        let p = validate(
            "t",
            DType::F32,
            &shape,
            None,
            &opts,
            &lens_for(&shape),
            &H200,
        )
        .unwrap();
        let ptrs = RawForward {
            q: 16,
            k: 32,
            v: 48,
            o: 64,
            final_s: 128,
            final_z: 256,
            workspace: 4096,
            ..Default::default()
        };
        opts.schedule = ScheduleChoice::Walk;
        let w = plan(Kind::Causal, DType::F16, &p, &opts, &ptrs);
        assert_eq!(w.launches.len(), 1);
        assert_eq!(workspace_len(Kind::Causal, &p, &opts), 0);
        let Launch::Walk(l) = w.launches[0] else {
            panic!()
        };
        assert_eq!(l.kernel, "causal_forward_f16");
        assert_eq!(l.grid, [2 * p.tiling.m_tiles as u32, 1, 1]);
        assert_eq!(
            l.params.state_store,
            LinattnStateStore::LINATTN_STORE_FINAL as i32
        );
        assert!(l.shared_bytes as usize <= SHARED_BUDGET_BYTES);
        opts.schedule = ScheduleChoice::Split { parts: 3 };
        let s = plan(Kind::Causal, DType::F16, &p, &opts, &ptrs);
        assert_eq!(s.launches.len(), 3);
        let ws = workspace_len(Kind::Causal, &p, &opts);
        assert_eq!(ws, 2 * 3 * (32 * 48 + 32));
        let Launch::Walk(l) = s.launches[2] else {
            panic!()
        };
        assert_eq!(l.grid[1], 3);
        assert_eq!(l.params.work_z, 4096 + 2 * 3 * 32 * 48 * 4);
        let n = plan(Kind::NonCausal, DType::F32, &p, &opts, &ptrs);
        assert_eq!(n.launches.len(), 3);
        let Launch::Walk(l) = n.launches[2] else {
            panic!()
        };
        assert_eq!((l.params.causal, l.kernel), (0, "noncausal_forward_f32"));
        // One partition, no states: the combine is skipped.
        opts.schedule = ScheduleChoice::Walk;
        let bare = RawForward {
            final_s: 0,
            final_z: 0,
            ..ptrs
        };
        assert_eq!(
            plan(Kind::NonCausal, DType::F32, &p, &opts, &bare)
                .launches
                .len(),
            2
        );
    }

    #[test]
    fn validation_rejects_bad_calls() {
        let shape = AttentionShape::bnhd(2, 3, 10, 17, 5);
        let opts = AttentionOptions::default();
        let lens = lens_for(&shape);
        assert!(validate("t", DType::F32, &shape, None, &opts, &lens, &H200).is_ok());
        let err = |s: &AttentionShape, cu: Option<&[usize]>, o: &AttentionOptions, l: &Lens| {
            validate("t", DType::F32, s, cu, o, l, &H200)
                .unwrap_err()
                .to_string()
        };
        let e = err(
            &shape,
            None,
            &opts,
            &Lens {
                q: lens.q - 1,
                ..lens
            },
        );
        assert!(e.contains("`q`") && e.contains("need"), "{e}");
        let e = err(&AttentionShape { d: 257, ..shape }, None, &opts, &lens);
        assert!(e.contains("1..=256"), "{e}");
        let e = err(&AttentionShape { m: 0, ..shape }, None, &opts, &lens);
        assert!(e.contains("`m`"), "{e}");
        let mut bad_o = shape;
        bad_o.o.token = 2;
        let e = err(&bad_o, None, &opts, &lens);
        assert!(e.contains("overlap"), "{e}");
        let e = err(&shape, None, &AttentionOptions { eps: -1.0, ..opts }, &lens);
        assert!(e.contains("eps"), "{e}");
        let e = err(
            &shape,
            None,
            &opts,
            &Lens {
                initial: Some((2 * 3 * 17 * 5, 2 * 3 * 17 - 1)),
                ..lens
            },
        );
        assert!(e.contains("initial state"), "{e}");
        // Varlen: batch 1, offsets 0..=tokens, never decreasing.
        let packed = AttentionShape::packed(10, 3, 17, 5);
        let pl = lens_for(&packed);
        let p = validate(
            "t",
            DType::F32,
            &packed,
            Some(&[0, 4, 4, 10]),
            &opts,
            &pl,
            &H200,
        )
        .unwrap();
        assert_eq!((p.num_seqs, p.max_len, p.seq_heads()), (3, 6, 9));
        assert!(err(&packed, Some(&[0, 4, 3, 10]), &opts, &pl).contains("decrease"));
        assert!(err(&packed, Some(&[0, 4, 9]), &opts, &pl).contains("offsets"));
        assert!(err(&shape, Some(&[0, 10]), &opts, &lens).contains("batch must be 1"));
        // Index limits.
        let huge = AttentionShape {
            tokens: usize::MAX / 4,
            ..shape
        };
        let hl = Lens::unknown(false, false);
        assert!(err(&huge, None, &opts, &hl).contains("overflows"));
    }

    #[test]
    fn raw_checks_catch_overlaps_and_nulls() {
        let shape = AttentionShape::bhnd(1, 1, 4, 2, 2);
        let opts = AttentionOptions {
            schedule: ScheduleChoice::Walk,
            ..Default::default()
        };
        let p = validate(
            "t",
            DType::F32,
            &shape,
            None,
            &opts,
            &lens_for(&shape),
            &H200,
        )
        .unwrap();
        let ok = RawForward {
            q: 1000,
            k: 2000,
            v: 3000,
            o: 4000,
            ..Default::default()
        };
        assert!(check_raw("t", DType::F32, &ok, &p, 0).is_ok());
        let e = check_raw("t", DType::F32, &RawForward { o: 1004, ..ok }, &p, 0).unwrap_err();
        assert!(e.to_string().contains("overlaps `q`"), "{e}");
        let e = check_raw("t", DType::F32, &RawForward { k: 0, ..ok }, &p, 0).unwrap_err();
        assert!(e.to_string().contains("null"), "{e}");
        let e = check_raw(
            "t",
            DType::F32,
            &RawForward {
                final_s: 5000,
                ..ok
            },
            &p,
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("together"), "{e}");
        let e = check_raw("t", DType::F32, &ok, &p, 10).unwrap_err();
        assert!(e.to_string().contains("workspace"), "{e}");
        // A workspace one element short of the call's need.
        let ws = |n| RawForward {
            workspace: 9000,
            workspace_len: n,
            ..ok
        };
        assert!(check_raw("t", DType::F32, &ws(10), &p, 10).is_ok());
        let e = check_raw("t", DType::F32, &ws(9), &p, 10).unwrap_err();
        assert!(
            e.to_string()
                .contains("needs a workspace of 10 fp32 elements, 9 given"),
            "{e}"
        );
    }

    /// The executor's target reaches the schedule: on the emulator standing
    /// in for an H200 (264 resident f32 D = M = 64 walks) 120 sequence-heads
    /// split in two, standing in for an A100 (216) they walk; both match the
    /// f64 reference (NaN-poisoned output, every element checked).
    #[cfg(feature = "emulator")]
    #[test]
    fn the_executor_target_decides_the_schedule() {
        use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
        use std::sync::Arc;
        let (h, n, d) = (120, 256, 64);
        let shape = AttentionShape::bhnd(1, h, n, d, d);
        let opts = AttentionOptions::default();
        let mut rng = Rng::new(test_seed());
        let host: Vec<Vec<f32>> = (0..3)
            .map(|_| {
                rng.normal_vec(h * n * d)
                    .iter()
                    .map(|&x| x as f32)
                    .collect()
            })
            .collect();
        let lay = linattn_reference::Layout {
            batch: 1,
            heads: h,
            tokens: n,
            dim: d,
            batch_stride: h * n * d,
            token_stride: d,
            head_stride: n * d,
        };
        let f64s: Vec<Vec<f64>> = host
            .iter()
            .map(|x| x.iter().map(|&v| v as f64).collect())
            .collect();
        let view = |x| linattn_reference::View::new(x, lay).unwrap();
        let ropts = linattn_reference::LinearAttentionOptions {
            feature_map: linattn_reference::FeatureMap::EluPlusOne,
            normalize: true,
            eps: opts.eps as f64,
            scale: 1.0,
        };
        let (want, _) = linattn_reference::causal_linear_attention(
            view(&f64s[0]),
            view(&f64s[1]),
            view(&f64s[2]),
            &ropts,
            None,
        )
        .unwrap();
        for (target, parts) in [(Target::H200, 2), (Target::A100, 1)] {
            let p = validate(
                "t",
                DType::F32,
                &shape,
                None,
                &opts,
                &lens_for(&shape),
                &target,
            )
            .unwrap();
            let sched = schedule(opts.schedule, h, &p.tiling, n, p.resident_walks);
            assert_eq!(sched.parts, parts, "{}", target.arch());
            let emu = crate::Emulator::unchecked().unwrap().with_target(target);
            let dev = Device::Emulator(Arc::new(emu));
            let up = |x: &Vec<f32>| dev.upload(x).unwrap();
            let (q, k, v) = (up(&host[0]), up(&host[1]), up(&host[2]));
            let mut o = dev.upload(&vec![f32::NAN; h * n * d]).unwrap();
            causal_forward(
                &dev,
                Qkv {
                    q: &q,
                    k: &k,
                    v: &v,
                },
                &mut o,
                &shape,
                None,
                &opts,
                StateIo::none(),
            )
            .unwrap();
            let got: Vec<f64> = dev
                .download(&o)
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .collect();
            assert!(
                got.iter().all(|x| x.is_finite()),
                "{}: unwritten output",
                target.arch()
            );
            let err = rel_l2_error(&got, want.data());
            assert!(err < 1e-6, "{}: rel L2 error {err:e}", target.arch());
            // The raw path asks the executor: without a workspace the split
            // (H200) is refused, the walk (A100) runs.
            let emu = crate::Emulator::unchecked().unwrap().with_target(target);
            let mut o = vec![f32::NAN; h * n * d];
            let ptrs = RawForward {
                q: host[0].as_ptr() as u64,
                k: host[1].as_ptr() as u64,
                v: host[2].as_ptr() as u64,
                o: o.as_mut_ptr() as u64,
                ..RawForward::default()
            };
            // SAFETY: host buffers covering the shape; nothing else aliases o.
            let r = unsafe { causal_forward_raw(&emu, DType::F32, &ptrs, &shape, None, &opts) };
            match (parts, r) {
                (1, Ok(())) => assert!(o.iter().all(|x| x.is_finite())),
                (2, Err(e)) => assert!(e.to_string().contains("workspace"), "{e}"),
                (_, r) => panic!("{}: {r:?}", target.arch()),
            }
        }
    }
}
