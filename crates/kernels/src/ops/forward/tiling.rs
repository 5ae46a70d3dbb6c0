//! The forward's tiling and schedule policy, plain Rust so it is
//! unit-tested without a GPU: rows per chunk and value columns per block
//! ([`tiling`], fitted to [`SHARED_BUDGET_BYTES`] with [`walk_shared_bytes`]
//! mirroring the kernels' shared-memory carve), and walk or split
//! ([`schedule`]) from the target GPU's resident blocks.

use crate::dtype::DType;
use crate::ops::attention::{ScheduleChoice, MAX_DIM};
use crate::ops::checks::MAX_GRID_Y;
use crate::target::{KernelFootprint, MIN_SHARED_PER_BLOCK_OPTIN};

/// Threads per block of the walk and the state scan (as in the `.cu` files).
pub const THREADS: u32 = 256;
/// Dynamic shared memory one walk block may use: 99 KiB, the largest
/// opt-in every default architecture grants (sm_86/sm_89 allow 99 KiB per
/// block, sm_80 163 KiB, sm_90 227 KiB;
/// [`MIN_SHARED_PER_BLOCK_OPTIN`]). The tiling is deliberately
/// arch-independent: one tiling serves every GPU and the emulator (which
/// refuses anything larger) tests exactly the blocks every GPU runs. Only
/// the schedule depends on the GPU ([`schedule`], [`Target`](crate::Target)). How many
/// such blocks an SM holds does depend on it: at bf16 D = M = 128 (98,176
/// B) two on sm_90 (228 KiB per SM), one on sm_80 (164 KiB) and sm_86/89
/// (100 KiB); see [`Target::blocks_per_sm`](crate::Target::blocks_per_sm).
pub const SHARED_BUDGET_BYTES: usize = MIN_SHARED_PER_BLOCK_OPTIN as usize;
/// Threads of a walk block and the minimum blocks per SM in its
/// `__launch_bounds__(256, 2)` (every `forward_*` kernel of
/// `cuda/forward.cu`): ptxas keeps it within 128 registers, so an SM's
/// 64K registers hold at most two, whatever its shared memory.
pub const WALK_LAUNCH_BOUNDS: (u32, u32) = (THREADS, 2);

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
pub(crate) const WARPS: usize = THREADS as usize / 32;
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
/// for [`Target::resident_blocks`](crate::Target::resident_blocks).
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
/// [`Target::resident_blocks`](crate::Target::resident_blocks) of [`walk_footprint`]). Counting time in
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
