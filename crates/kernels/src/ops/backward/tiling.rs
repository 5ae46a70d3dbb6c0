//! The backward's tiling and policies, plain Rust so they are unit-tested
//! without a GPU: the passes ([`Pass`]), each pass's chunk and state tile
//! fitted to [`SHARED_BUDGET_BYTES`] by `*_bytes` / `*_floats` functions
//! that mirror the kernels' shared-memory carve, the whole-head walks'
//! policies ([`merged_dkv`], [`fused_prep_dq`]) and their split schedule
//! ([`split_schedule`]).

use crate::dtype::DType;
use crate::ops::attention::ScheduleChoice;
use crate::ops::checks::{self, MAX_GRID_Y};
use crate::ops::forward::tiling::{Schedule, SHARED_BUDGET_BYTES, THREADS};
use crate::target::{KernelFootprint, Target};

const CHUNKS: [usize; 4] = [64, 32, 16, 8];

/// One backward kernel: the four tiled passes, the two whole-head walks and
/// the split walks' scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    /// den and the partial `dL/do . num` per token (normalised calls only); blocks tile M.
    Prep,
    /// dq; blocks tile D.
    Dq,
    /// dk and the initial state's gradient; blocks tile D.
    Dk,
    /// dv; blocks tile M.
    Dv,
    /// dk, dv and the initial state's gradient in one reverse walk, one
    /// block per sequence-head owning the whole dS (f16/bf16 heads up to 64
    /// tiles of dS, in place of [`Pass::Dk`] and [`Pass::Dv`]; see [`merged_dkv`]).
    Dkv,
    /// den, d den and dq in one forward walk, one block per sequence-head
    /// owning the whole S (the same heads, in place of [`Pass::Prep`] and
    /// [`Pass::Dq`]; see [`fused_prep_dq`]).
    PrepDq,
    /// The split whole-head walks' fixed-order combine of partition sums
    /// (see [`split_schedule`]).
    StateScan,
}

/// Rows per chunk and the state tile of one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PassTiling {
    /// Rows per chunk C.
    pub chunk: usize,
    /// Rows of D (dq, dk) or columns of M (dv) per block.
    pub tile: usize,
    /// Blocks per sequence-head: `ceil(dim / tile)`.
    pub tiles: usize,
}

/// The tiling of every pass for one (d, m).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackwardTiling {
    /// The prep kernel (tiles along M).
    pub prep: PassTiling,
    /// The dq and dk kernels (tiles along D).
    pub dqk: PassTiling,
    /// The dv kernel (tiles along M).
    pub dv: PassTiling,
    /// The merged dk + dv walk (one tile: the whole head) when the policy
    /// [`merged_dkv`] picks it; the dk and dv kernels are then not launched.
    pub dkv: Option<PassTiling>,
    /// The fused prep + dq walk (one tile: the whole head) when the policy
    /// [`fused_prep_dq`] picks it; the prep and dq kernels are then not
    /// launched.
    pub prep_dq: Option<PassTiling>,
}

/// Shared memory of the prep kernel in floats: the state columns
/// (`d x odd(tile)`), z, phi(q) and phi(k) (`chunk x odd(d)` each), v
/// (`chunk x odd(tile)`), A (`chunk x chunk`) and `phi(q) . z`.
pub fn prep_shared_floats(d: usize, chunk: usize, tile: usize) -> usize {
    let (dp, tp) = (d | 1, tile | 1);
    d * tp + d + 2 * chunk * dp + chunk * tp + chunk * chunk + chunk
}

/// Shared memory of the dq and dk kernels in floats: the state rows
/// (`tile x odd(m)`), z rows, the phi tile of the chunk (`chunk x tile`),
/// v and dnum (`chunk x odd(m)` each), B (`chunk x chunk`) and d den.
pub fn dqk_shared_floats(m: usize, chunk: usize, tile: usize) -> usize {
    let mp = m | 1;
    tile * mp + tile + chunk * tile + 2 * chunk * mp + chunk * chunk + chunk
}

/// Shared memory of the dv kernel in floats: the state columns
/// (`d x odd(tile)`), phi(q) and phi(k) (`chunk x odd(d)` each), dnum
/// (`chunk x odd(tile)`) and A (`chunk x chunk`).
pub fn dv_shared_floats(d: usize, chunk: usize, tile: usize) -> usize {
    let (dp, tp) = (d | 1, tile | 1);
    d * tp + 2 * chunk * dp + chunk * tp + chunk * chunk
}

/// Largest chunk for which a tile of at least `min(dim, 32)` fits the
/// budget (chunk 8 takes whatever fits), tiles balanced over `dim`.
fn pick(dim: usize, floats: impl Fn(usize, usize) -> usize) -> PassTiling {
    let budget = SHARED_BUDGET_BYTES / 4;
    for chunk in CHUNKS {
        let Some(max_tile) = (1..=dim).rev().find(|&t| floats(chunk, t) <= budget) else {
            continue;
        };
        if max_tile >= dim.min(32) || chunk == 8 {
            let tiles = dim.div_ceil(max_tile);
            return PassTiling {
                chunk,
                tile: dim.div_ceil(tiles),
                tiles,
            };
        }
    }
    // Unreachable for d, m <= 256 (chunk 8 with a tile of 1 fits).
    PassTiling {
        chunk: 8,
        tile: 1,
        tiles: dim,
    }
}

/// The fp32 (FMA) tiling for key size `d` and value size `m` (both in
/// 1..=256), every pass within [`SHARED_BUDGET_BYTES`].
pub fn tiling(d: usize, m: usize) -> BackwardTiling {
    if let Some(t) = nominal_tiling(d, m) {
        return t;
    }
    BackwardTiling {
        prep: pick(m, |c, t| prep_shared_floats(d, c, t)),
        dqk: pick(d, |c, t| dqk_shared_floats(m, c, t)),
        dv: pick(m, |c, t| dv_shared_floats(d, c, t)),
        dkv: None,
        prep_dq: None,
    }
}

/// Sizes outside 1..=256 (which validation rejects before any launch) get a
/// nominal tiling, so the public tiling helpers never panic or overflow.
fn nominal_tiling(d: usize, m: usize) -> Option<BackwardTiling> {
    let ok = |x: usize| (1..=crate::ops::attention::MAX_DIM).contains(&x);
    if ok(d) && ok(m) {
        return None;
    }
    let pass = PassTiling {
        chunk: 16,
        tile: 16,
        tiles: 1,
    };
    Some(BackwardTiling {
        prep: pass,
        dqk: pass,
        dv: pass,
        dkv: None,
        prep_dq: None,
    })
}

/// Whether a dtype's backward runs its chunk products on tensor cores
/// (`cuda/include/linattn/backward_mma.cuh`): f16 and bf16, any D and M
/// (padded to multiples of 16 inside the kernels). fp32 stays on FMA.
pub fn uses_mma(dtype: DType) -> bool {
    dtype != DType::F32
}

/// Chunk sizes the tensor-core walks try, largest first.
const MMA_CHUNKS: [usize; 3] = [64, 32, 16];

/// Bytes of shared memory buffers laid out in order, each starting on a
/// 128-byte boundary (mirrors `Carve` in `cuda/include/linattn/carve.cuh`).
pub(crate) fn carve(parts: &[usize]) -> usize {
    parts
        .iter()
        .fold(0, |off: usize, &n| off.next_multiple_of(128) + n)
}

pub(crate) fn pad16(n: usize) -> usize {
    n.next_multiple_of(16)
}

/// Shared memory of the tensor-core prep kernel in bytes (buffers in the
/// order of `prep_mma`): S (fp32, `D16 x (tile + 4)`), z, S rounded to 16
/// bits (`D16 x (tile + 8)`), phi(q) and phi(k) (`chunk x (D16 + 8)` each),
/// v and dL/do (`chunk x (tile + 8)` each), an fp32 scratch (`chunk x
/// (max(chunk, D16) + 4)`: A, then `G S^T`), `G v^T` (fp32, `chunk x
/// (chunk + 4)`), three per-row vectors and the tile scales (S16, dL/do).
/// `tile` and `chunk` are multiples of 16; D16 = D rounded up to 16.
pub fn prep_mma_bytes(d: usize, chunk: usize, tile: usize) -> usize {
    let d16 = pad16(d);
    carve(&[
        d16 * (tile + 4) * 4,
        d16 * 4,
        d16 * (tile + 8) * 2,
        chunk * (d16 + 8) * 2,
        chunk * (d16 + 8) * 2,
        chunk * (tile + 8) * 2,
        chunk * (tile + 8) * 2,
        chunk * (chunk.max(d16) + 4) * 4,
        chunk * (chunk + 4) * 4,
        chunk * 4,
        chunk * 4,
        chunk * 4,
        (d16 / 16) * (tile / 16) * 4,
        (chunk / 16) * (tile / 16) * 4,
    ])
}

/// Shared memory of the tensor-core dq and dk kernels in bytes (order of
/// `dqk_mma`): S rows (fp32, `tile x (M16 + 4)`), z, S rounded
/// (`tile x (M16 + 8)`), the phi tile (`chunk x (tile + 8)`), v and dnum
/// (`chunk x (M16 + 8)` each), B (`chunk x (chunk + 8)`), the fp32 scratch,
/// den, d den, the tile scales (S16, G, B, and the dk pass's qn), and the dq
/// pass's low half of B (`chunk x (chunk + 8)`) with its tile scales.
pub fn dqk_mma_bytes(m: usize, chunk: usize, tile: usize) -> usize {
    let m16 = pad16(m);
    carve(&[
        tile * (m16 + 4) * 4,
        tile * 4,
        tile * (m16 + 8) * 2,
        chunk * (tile + 8) * 2,
        chunk * (m16 + 8) * 2,
        chunk * (m16 + 8) * 2,
        chunk * (chunk + 8) * 2,
        chunk * (chunk.max(tile) + 4) * 4,
        chunk * 4,
        chunk * 4,
        (tile / 16) * (m16 / 16) * 4,
        (chunk / 16) * (m16 / 16) * 4,
        (chunk / 16) * (chunk / 16) * 4,
        (chunk / 16) * (tile / 16) * 4,
        chunk * (chunk + 8) * 2,
        (chunk / 16) * (chunk / 16) * 4,
    ])
}

/// Shared memory of the tensor-core dv kernel in bytes (order of
/// `dv_mma`): dS (fp32, `D16 x (tile + 4)`), dS rounded (`D16 x (tile +
/// 8)`), phi(q) / den and phi(k) (`chunk x (D16 + 8)` each), dL/do
/// (`chunk x (tile + 8)`), A (`chunk x (chunk + 8)`), the fp32 scratch, den
/// and the tile scales (dS16, G, A, qn).
pub fn dv_mma_bytes(d: usize, chunk: usize, tile: usize) -> usize {
    let d16 = pad16(d);
    carve(&[
        d16 * (tile + 4) * 4,
        d16 * (tile + 8) * 2,
        chunk * (d16 + 8) * 2,
        chunk * (d16 + 8) * 2,
        chunk * (tile + 8) * 2,
        chunk * (chunk + 8) * 2,
        chunk * (chunk.max(tile) + 4) * 4,
        chunk * 4,
        (d16 / 16) * (tile / 16) * 4,
        (chunk / 16) * (tile / 16) * 4,
        (chunk / 16) * (chunk / 16) * 4,
        (chunk / 16) * (d16 / 16) * 4,
    ])
}

/// Accumulator fragments (16 x 16 fp32 tiles of S or dS) each warp of the
/// whole-head walks (fused prep + dq, merged dk + dv) holds in registers
/// (mirrors `kDkvFrags` in `backward_mma.cuh`).
pub const DKV_STATE_FRAGS: usize = 4;

/// Threads per block of the whole-head walks for (d, m): 256 when the
/// whole state (`D16 x M16`, in 16 x 16 tiles) fits 8 warps' fragments, 512
/// when it fits 16 warps' (D = M = 128: 64 tiles), `None` beyond (the
/// kernel's `__launch_bounds__(512, 1)` leaves 128 registers a thread).
pub fn dkv_threads(d: usize, m: usize) -> Option<u32> {
    let tiles = (pad16(d) / 16) * (pad16(m) / 16);
    [256u32, 512]
        .into_iter()
        .find(|&t| tiles <= DKV_STATE_FRAGS * (t as usize / 32))
}

/// Shared memory of the walks that hold a whole state in registers (order
/// of `dkv_mma` and `prep_dq_mma`): z, the state rounded to 16 bits
/// (`D16 x (M16 + 8)`), phi(q) and phi(k) (`chunk x (D16 + 8)` each), v and
/// dL/do (`chunk x (M16 + 8)` each), one C x C operand (`chunk x (chunk +
/// 8)`), the fp32 scratch (`chunk x (max(chunk, D16, M16) + 4)`, at least
/// one 16 x 16 tile per warp), `extra` fp32 buffers, `vectors` per-row fp32
/// vectors and the tile scales.
fn whole_head_bytes(d: usize, m: usize, chunk: usize, extra: &[usize], vectors: usize) -> usize {
    let (d16, m16) = (pad16(d), pad16(m));
    let warps = dkv_threads(d, m).unwrap_or(512) as usize / 32;
    let mut parts = vec![
        d16 * 4,
        d16 * (m16 + 8) * 2,
        chunk * (d16 + 8) * 2,
        chunk * (d16 + 8) * 2,
        chunk * (m16 + 8) * 2,
        chunk * (m16 + 8) * 2,
        chunk * (chunk + 8) * 2,
        (chunk * (chunk.max(d16).max(m16) + 4)).max(warps * 256) * 4,
    ];
    parts.extend(extra.iter().map(|&floats| floats * 4));
    parts.extend(std::iter::repeat_n(chunk * 4, vectors));
    parts.extend([
        (d16 / 16) * (m16 / 16) * 4,
        (chunk / 16) * (m16 / 16) * 4,
        (chunk / 16) * (chunk / 16) * 4,
    ]);
    carve(&parts)
}

/// Shared memory of the merged tensor-core dk + dv kernel in bytes (dS
/// itself lives in the warps' registers): the layout of
/// [`prep_dq_mma_bytes`] with the tile scales of `phi(q) / den` after the
/// scratch, two per-row vectors (den, d den) and, last, one flag per
/// feature (`D16` floats: the features of rows whose den is eps).
pub fn dkv_mma_bytes(d: usize, m: usize, chunk: usize) -> usize {
    whole_head_bytes(d, m, chunk, &[(chunk / 16) * (pad16(d) / 16)], 2).next_multiple_of(128)
        + pad16(d) * 4
}

/// Shared memory of the fused tensor-core prep + dq kernel in bytes (S
/// lives in the warps' registers): z, S rounded to 16 bits, phi(q),
/// phi(k), v, dL/do, one C x C operand (B), the fp32 scratch, `G v^T`
/// (fp32, `chunk x (chunk + 4)`), a 16 x 16 fp32 index table, four per-row
/// vectors (`phi(q) . z`, row sums of A, den, d den), the tile scales and,
/// last, `colsum(v)` of the chunks staged as k and their flag (`M16 + 1`
/// floats; docs/kernels.md, "16-bit roundings: backward").
pub fn prep_dq_mma_bytes(d: usize, m: usize, chunk: usize) -> usize {
    carve(&[
        whole_head_bytes(d, m, chunk, &[chunk * (chunk + 4), 256], 4),
        (pad16(m) + 1) * 4,
    ])
}

/// Smallest chunk the whole-head walks are used with.
pub(crate) const MIN_MERGED_CHUNK: usize = 32;

/// The largest chunk (of at least 32) at which a whole-head walk fits
/// [`SHARED_BUDGET_BYTES`], for f16/bf16 heads whose state fits the block's
/// register fragments ([`dkv_threads`]).
fn whole_head(
    dtype: DType,
    d: usize,
    m: usize,
    bytes: fn(usize, usize, usize) -> usize,
) -> Option<PassTiling> {
    if !uses_mma(dtype) || dkv_threads(d, m).is_none() {
        return None;
    }
    MMA_CHUNKS
        .into_iter()
        .filter(|&c| c >= MIN_MERGED_CHUNK)
        .find(|&c| bytes(d, m, c) <= SHARED_BUDGET_BYTES)
        .map(|chunk| PassTiling {
            chunk,
            tile: pad16(d),
            tiles: 1,
        })
}

/// The policy for the merged dk + dv walk: `Some` (chunk, the whole head as
/// one tile) for f16/bf16 when the whole dS fits the block's register
/// fragments ([`dkv_threads`]) and the merged body fits
/// [`SHARED_BUDGET_BYTES`] with a chunk of at least 32 (the largest such
/// chunk); `None` otherwise (fp32, which has no merged body, and heads
/// past 64 tiles of dS or whose operands do not fit, e.g. D = M = 256).
/// Merged, a call reads q, k, v and dL/do once for dk and dv instead of
/// twice and absorbs `dS += qh^T dnum` once instead of twice, in one block
/// per sequence-head (`docs/benchmarks.md`, "Backward").
pub fn merged_dkv(dtype: DType, d: usize, m: usize) -> Option<PassTiling> {
    whole_head(dtype, d, m, dkv_mma_bytes)
}

/// The policy for the fused prep + dq walk: as [`merged_dkv`], with the
/// fused body's shared memory ([`prep_dq_mma_bytes`]). Fused, the
/// normaliser's pieces and dq come from one forward walk over q, k, v and
/// dL/do instead of two, and the workspace holds one `dL/do . num` slot.
pub fn fused_prep_dq(dtype: DType, d: usize, m: usize) -> Option<PassTiling> {
    whole_head(dtype, d, m, prep_dq_mma_bytes)
}

/// The tensor-core tiling of one pass over `dim`: tiles and chunks are
/// multiples of 16. Fewest tiles first (each tile re-reads the chunk's
/// inputs and recomputes its C x C product), then the largest chunk; the
/// tile is then the smallest multiple of 16 that keeps that tile count.
fn pick_mma(dim: usize, bytes: impl Fn(usize, usize) -> usize) -> PassTiling {
    let dim16 = pad16(dim);
    let mut best: Option<PassTiling> = None;
    for chunk in MMA_CHUNKS {
        let Some(max_tile) = (1..=dim16 / 16)
            .rev()
            .map(|t| t * 16)
            .find(|&t| bytes(chunk, t) <= SHARED_BUDGET_BYTES)
        else {
            continue;
        };
        let tiles = dim.div_ceil(max_tile);
        if best.is_none_or(|b| tiles < b.tiles) {
            best = Some(PassTiling {
                chunk,
                tile: pad16(dim.div_ceil(tiles)),
                tiles,
            });
        }
    }
    // Chunk 16 with a tile of 16 fits for every d, m <= 256.
    best.unwrap_or(PassTiling {
        chunk: 16,
        tile: 16,
        tiles: dim.div_ceil(16),
    })
}

/// The tiling of a call in `dtype`: [`tiling`] for fp32, the tensor-core
/// tiling (multiples of 16) for f16 and bf16.
pub fn tiling_for(dtype: DType, d: usize, m: usize) -> BackwardTiling {
    if let Some(t) = nominal_tiling(d, m) {
        return t;
    }
    if !uses_mma(dtype) {
        return tiling(d, m);
    }
    let dqk = pick_mma(d, |c, t| dqk_mma_bytes(m, c, t));
    let dv = pick_mma(m, |c, t| dv_mma_bytes(d, c, t));
    BackwardTiling {
        prep: pick_mma(m, |c, t| prep_mma_bytes(d, c, t)),
        dqk,
        dv,
        dkv: merged_dkv(dtype, d, m),
        prep_dq: fused_prep_dq(dtype, d, m),
    }
}

/// Dynamic shared memory of one pass in bytes for this dtype and tiling.
pub fn shared_bytes(dtype: DType, pass: Pass, d: usize, m: usize, pt: PassTiling) -> usize {
    let (c, t) = (pt.chunk, pt.tile);
    match (uses_mma(dtype), pass) {
        (false, Pass::Prep) => prep_shared_floats(d, c, t) * 4,
        (false, Pass::Dq | Pass::Dk) => dqk_shared_floats(m, c, t) * 4,
        (false, Pass::Dv) => dv_shared_floats(d, c, t) * 4,
        (true, Pass::Prep) => prep_mma_bytes(d, c, t),
        (true, Pass::Dq | Pass::Dk) => dqk_mma_bytes(m, c, t),
        (true, Pass::Dv) => dv_mma_bytes(d, c, t),
        (_, Pass::Dkv) => dkv_mma_bytes(d, m, c),
        (_, Pass::PrepDq) => prep_dq_mma_bytes(d, m, c),
        (_, Pass::StateScan) => 0,
    }
}

/// Blocks per state of the split walks' scan (one thread per element).
pub(crate) fn scan_blocks(d: usize, m: usize) -> usize {
    (d * m + d).div_ceil(THREADS as usize)
}

/// The launch bounds of the whole-head walks (`*_dkv_*`, `*_prepdq_*`):
/// `__launch_bounds__(512, 1)`, so ptxas gives a thread up to 128
/// registers and a 512-thread block takes the whole register file: one
/// block per SM on every architecture (two at 256 threads, if shared
/// memory allows).
pub const WHOLE_HEAD_LAUNCH_BOUNDS: (u32, u32) = (512, 1);

/// Blocks of the whole-head walks for (d, m) the target holds at once: the
/// smaller of the two walks' [`Target::resident_blocks`] (0 when the
/// tiling has no whole-head walks).
pub fn whole_head_resident(target: &Target, d: usize, m: usize, tiling: &BackwardTiling) -> usize {
    let Some(threads) = dkv_threads(d, m) else {
        return 0;
    };
    let (max_threads, min_blocks) = WHOLE_HEAD_LAUNCH_BOUNDS;
    [
        tiling.dkv.map(|t| dkv_mma_bytes(d, m, t.chunk)),
        tiling.prep_dq.map(|t| prep_dq_mma_bytes(d, m, t.chunk)),
    ]
    .into_iter()
    .flatten()
    .map(|bytes| {
        let fp =
            KernelFootprint::with_launch_bounds(max_threads, min_blocks, threads, bytes as u32);
        target.resident_blocks(&fp)
    })
    .min()
    .unwrap_or(0)
}

/// The split schedule of the whole-head walks (causal and non-causal),
/// plain Rust so it is unit-tested without a GPU.
///
/// A whole-head walk is one block per sequence-head walking its sequence
/// chunk by chunk; with few sequence-heads and long sequences most SMs
/// idle (B 2, H 16: 32 blocks, 512 chunks each at T = 16384). Split cuts
/// every sequence into `p = floor(resident / seq_heads)` partitions (of at
/// least four chunks), where `resident` is how many whole-head blocks the
/// GPU holds at once ([`whole_head_resident`]: one per SM at D = M = 128,
/// so 132 on an H200, 108 on an A100), so the split grid `seq_heads * p`
/// runs in one wave. Each walk then runs twice, once summing its
/// partition's state from zero, once from the state a fixed-order scan
/// gives it: ~1.5x the work in exchange for `p`-fold parallelism, a gain
/// from `p = 2` on (`1.5 / 2 = 0.75` of the walk). Rounding `p` up
/// instead would start a second wave that costs as much as the first (B 2,
/// H 16 on an A100: `ceil(108 / 32) = 4` gives 128 blocks on 108 SMs, two
/// waves of a quarter each, `1.5 * 2 / 4 = 0.75`; `floor` gives 3, one wave
/// of a third, `1.5 / 3 = 0.5`). `Walk`, heads without whole-head walks
/// (f32, or a state past 64 tiles) and shapes whose scan grid would pass
/// the x limit never split; `Split { parts }` forces it (capped by the
/// chunks).
#[allow(clippy::too_many_arguments)]
pub fn split_schedule(
    choice: ScheduleChoice,
    dtype: DType,
    tiling: &BackwardTiling,
    d: usize,
    m: usize,
    seq_heads: usize,
    max_len: usize,
    resident: usize,
) -> Schedule {
    let whole = match (tiling.prep_dq, tiling.dkv) {
        (Some(a), Some(b)) if uses_mma(dtype) && dkv_threads(d, m).is_some() => Some((a, b)),
        _ => None,
    };
    // Both walks' chunks are 16 * 2^k, so the larger is a multiple of both.
    let chunk = whole.map_or(1, |(a, b)| a.chunk.max(b.chunk));
    let chunks = max_len.div_ceil(chunk).max(1);
    let one = Schedule {
        parts: 1,
        part_len: chunks * chunk,
    };
    let scan_fits = checks::grid_x_fits(seq_heads, scan_blocks(d, m));
    if whole.is_none() || !scan_fits {
        return one;
    }
    let parts = match choice {
        ScheduleChoice::Walk => return one,
        ScheduleChoice::Split { parts } => parts.max(1),
        ScheduleChoice::Auto => {
            let parts = (resident / seq_heads.max(1)).min(chunks / 4);
            if parts < 2 {
                return one;
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
