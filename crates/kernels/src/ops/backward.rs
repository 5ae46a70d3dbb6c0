//! `causal_backward.cu` and `noncausal_backward.cu`: gradients of linear
//! attention with respect to q, k, v and the initial state, feature map and
//! normaliser differentiated inside the kernels.
//!
//! Same conventions as [`crate::ops::forward`]: the shape is an
//! [`AttentionShape`] (+ optional host `cu_seqlens` for packed varlen
//! batches), the options are the forward's [`AttentionOptions`] (its
//! `schedule` also picks walk or split for the whole-head walks,
//! [`split_schedule`]), states are fp32, one per (sequence, head).
//! Every gradient uses the strides of its primal: `dq` those of q, `dk` of
//! k, `dv` of v, and the incoming `d_o` (dL/do) those of o.
//!
//! What the forward must keep for the backward: only its inputs (q, k, v
//! and the initial state if any). No output, no N x N matrix, no per-token
//! or per-chunk state: the kernels recompute the prefix (dq) and suffix
//! (dk, dv) states chunk by chunk, and the normaliser's pieces.
//!
//! Launches (see `cuda/include/linattn/backward_walk.cuh`): `prep` (den and
//! the partial `dL/do . num` per token and M tile into an fp32 workspace,
//! normalised calls only), then `dq` and `dk` with blocks tiling D, and `dv`
//! with blocks tiling M, so each gradient element has exactly one writer
//! (for small f16/bf16 heads one merged `dkv` walk, one block per
//! sequence-head owning the whole dS, replaces dk and dv: [`merged_dkv`]);
//! the only cross-block sum (the prep partials) is added in tile order.
//!
//! Layers, as in every op module: validation ([`validate`]), a plain-Rust
//! [`plan`] (unit-tested), and entry points for [`Device`] buffers
//! ([`causal_backward`], [`noncausal_backward`]), cudarc memory
//! ([`causal_backward_cuda`], [`noncausal_backward_cuda`]) and raw device
//! addresses ([`causal_backward_raw`], [`noncausal_backward_raw`]).

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::temp;
use crate::device::PtrGuard;
use crate::dtype::{DType, Element};
use crate::ops::forward::{
    self, AttentionOptions, AttentionShape, Kind, Lens, Problem, Schedule, ScheduleChoice,
    StateMut, StateRef, Strides, SHARED_BUDGET_BYTES, THREADS,
};
use crate::params::{LinattnBackwardParams, LinattnBackwardState};
use crate::plan::{Executor, LaunchPlan};
use crate::target::{KernelFootprint, Target};
use crate::{Buffer, Device, Error, Gpu, Result};

const MAX_GRID_X: usize = i32::MAX as usize;
const MAX_GRID_Y: usize = 65_535;
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

fn module(kind: Kind) -> &'static str {
    match kind {
        Kind::Causal => "causal_backward",
        Kind::NonCausal => "noncausal_backward",
    }
}

/// The kernel symbol of a pass for a dtype (`None`: no such kernel, the
/// merged [`Pass::Dkv`] and [`Pass::PrepDq`] walks exist for f16 and bf16
/// only).
pub fn kernel_name(kind: Kind, pass: Pass, dtype: DType) -> Option<&'static str> {
    use DType::*;
    use Pass::*;
    macro_rules! names {
        ($($k:ident $p:ident $t:ident => $n:literal),* $(,)?) => {
            match (kind, pass, dtype) {
                $((Kind::$k, $p, $t) => Some($n),)*
                (_, Dkv | PrepDq, F32) => None,
                (Kind::Causal, StateScan, _) => Some("causal_backward_state_scan"),
                (Kind::NonCausal, StateScan, _) => Some("noncausal_backward_state_scan"),
            }
        };
    }
    names!(
        Causal Prep F32 => "causal_backward_prep_f32",
        Causal Prep F16 => "causal_backward_prep_f16",
        Causal Prep Bf16 => "causal_backward_prep_bf16",
        Causal Dq F32 => "causal_backward_dq_f32",
        Causal Dq F16 => "causal_backward_dq_f16",
        Causal Dq Bf16 => "causal_backward_dq_bf16",
        Causal Dk F32 => "causal_backward_dk_f32",
        Causal Dk F16 => "causal_backward_dk_f16",
        Causal Dk Bf16 => "causal_backward_dk_bf16",
        Causal Dv F32 => "causal_backward_dv_f32",
        Causal Dv F16 => "causal_backward_dv_f16",
        Causal Dv Bf16 => "causal_backward_dv_bf16",
        NonCausal Prep F32 => "noncausal_backward_prep_f32",
        NonCausal Prep F16 => "noncausal_backward_prep_f16",
        NonCausal Prep Bf16 => "noncausal_backward_prep_bf16",
        NonCausal Dq F32 => "noncausal_backward_dq_f32",
        NonCausal Dq F16 => "noncausal_backward_dq_f16",
        NonCausal Dq Bf16 => "noncausal_backward_dq_bf16",
        NonCausal Dk F32 => "noncausal_backward_dk_f32",
        NonCausal Dk F16 => "noncausal_backward_dk_f16",
        NonCausal Dk Bf16 => "noncausal_backward_dk_bf16",
        NonCausal Dv F32 => "noncausal_backward_dv_f32",
        NonCausal Dv F16 => "noncausal_backward_dv_f16",
        NonCausal Dv Bf16 => "noncausal_backward_dv_bf16",
        Causal Dkv F16 => "causal_backward_dkv_f16",
        Causal Dkv Bf16 => "causal_backward_dkv_bf16",
        NonCausal Dkv F16 => "noncausal_backward_dkv_f16",
        NonCausal Dkv Bf16 => "noncausal_backward_dkv_bf16",
        Causal PrepDq F16 => "causal_backward_prepdq_f16",
        Causal PrepDq Bf16 => "causal_backward_prepdq_bf16",
        NonCausal PrepDq F16 => "noncausal_backward_prepdq_f16",
        NonCausal PrepDq Bf16 => "noncausal_backward_prepdq_bf16",
    )
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
    let ok = |x: usize| (1..=forward::MAX_DIM).contains(&x);
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
/// 128-byte boundary (mirrors `Carve` in `backward_mma.cuh`).
fn carve(parts: &[usize]) -> usize {
    parts
        .iter()
        .fold(0, |off: usize, &n| off.next_multiple_of(128) + n)
}

fn pad16(n: usize) -> usize {
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
/// vectors (`phi(q) . z`, row sums of A, den, d den) and the tile scales.
pub fn prep_dq_mma_bytes(d: usize, m: usize, chunk: usize) -> usize {
    whole_head_bytes(d, m, chunk, &[chunk * (chunk + 4), 256], 4)
}

/// Smallest chunk the whole-head walks are used with.
const MIN_MERGED_CHUNK: usize = 32;

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

/// Elements a buffer needs for `s` over `dim` (None on overflow).
fn span(shape: &AttentionShape, s: &Strides, dim: usize) -> Option<usize> {
    if shape.tokens == 0 || shape.batch == 0 || shape.heads == 0 {
        return Some(0);
    }
    (shape.batch - 1)
        .checked_mul(s.batch)?
        .checked_add((shape.heads - 1).checked_mul(s.head)?)?
        .checked_add((shape.tokens - 1).checked_mul(s.token)?)?
        .checked_add(dim)
        .filter(|&n| n <= i64::MAX as usize)
}

/// Whether rows of `dim` elements at these strides never share an element
/// (sorted by stride, each stride clears the extent of the smaller axes).
fn rows_disjoint(shape: &AttentionShape, s: &Strides, dim: usize) -> bool {
    let mut axes: Vec<(usize, usize)> = [
        (shape.batch, s.batch),
        (shape.heads, s.head),
        (shape.tokens, s.token),
    ]
    .into_iter()
    .filter(|&(n, _)| n > 1)
    .collect();
    axes.sort_by_key(|&(_, st)| st);
    let mut reach = dim;
    for (n, st) in axes {
        if st < reach {
            return false;
        }
        reach = reach.saturating_add((n - 1).saturating_mul(st));
    }
    true
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
        let need = span(shape, s, dim).unwrap_or(usize::MAX);
        if len < need {
            return Err(Error::invalid(
                kernel,
                arg,
                format!("buffer holds {len} elements, the shape and strides need {need}"),
            ));
        }
    }
    for (arg, s, dim) in [
        ("dq", &shape.q, shape.d),
        ("dk", &shape.k, shape.d),
        ("dv", &shape.v, shape.m),
    ] {
        if !rows_disjoint(shape, s, dim) {
            return Err(Error::invalid(
                kernel,
                arg,
                format!("gradient strides {s:?} make rows of {dim} elements overlap"),
            ));
        }
    }
    let (s_need, z_need) = (problem.state_s_len(), problem.state_z_len());
    for (arg, st) in [("d_final", grads.d_final), ("d_initial", grads.d_initial)] {
        if let Some((s, z)) = st {
            if s < s_need || z < z_need {
                return Err(Error::invalid(
                    kernel,
                    arg,
                    format!(
                        "expected S of {s_need} and z of {z_need} fp32 elements ({} states of d = {}, m = {}), found {s} and {z}",
                        problem.seq_heads(),
                        shape.d,
                        shape.m
                    ),
                ));
            }
        }
    }
    let tiling = tiling_for(dtype, shape.d, shape.m);
    let sh = problem.seq_heads();
    let grid_ok = [tiling.prep.tiles, tiling.dqk.tiles, tiling.dv.tiles]
        .iter()
        .all(|&t| sh.checked_mul(t).is_some_and(|b| b <= MAX_GRID_X));
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

/// Blocks per state of the split walks' scan (one thread per element).
fn scan_blocks(d: usize, m: usize) -> usize {
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
    let scan_fits = seq_heads
        .checked_mul(scan_blocks(d, m))
        .is_some_and(|b| b <= MAX_GRID_X);
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

/// Builds the launches: prep (when normalising) and dq, or the fused prep +
/// dq walk; then dk and dv, or the merged dk + dv walk. A split schedule
/// (whole-head walks, `bp.schedule.parts > 1`) precedes each walk with its
/// partition sums and the scan: six launches.
pub fn plan(
    kind: Kind,
    dtype: DType,
    bp: &BackwardProblem,
    opts: &AttentionOptions,
    ptrs: &RawBackward,
) -> Vec<BackwardLaunch> {
    let problem = &bp.problem;
    let sp = &problem.shape;
    let (d, m) = (sp.d, sp.m);
    let sh = problem.seq_heads();
    let rows = bp.work_rows();
    let es = dtype.size();
    let t = bp.tiling;
    // A hand-built tiling may name a whole-head walk for a dtype without one
    // (f32) or a head whose state does not fit the fragments: the separate
    // walks run then.
    let whole = |pass: Pass, pt: Option<PassTiling>| {
        pt.filter(|_| kernel_name(kind, pass, dtype).is_some() && dkv_threads(d, m).is_some())
    };
    let fused = whole(Pass::PrepDq, t.prep_dq);
    let merged = whole(Pass::Dkv, t.dkv);
    // `dL/do . num` partials in the workspace: one per prep tile, or one
    // from the fused walk.
    let prep_slots = if fused.is_some() { 1 } else { t.prep.tiles };
    let (work_den, work_dden) = if bp.normalize && ptrs.workspace != 0 {
        (ptrs.workspace, ptrs.workspace + (rows * 4) as u64)
    } else {
        (0, 0)
    };
    // The split whole-head walks: partition states after the per-token
    // workspace.
    let parts = bp.schedule.parts;
    let split = fused.is_some() && merged.is_some() && parts > 1;
    let causal = kind == Kind::Causal;
    let (work_s, work_z) = if split {
        let s = ptrs.workspace + (norm_floats(bp) * 4) as u64;
        (s, s + (sh * parts * d * m * 4) as u64)
    } else {
        (0, 0)
    };
    let split_bytes = split_floats(bp) * 4;
    let base = LinattnBackwardParams {
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
        work_den,
        work_dden,
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
        chunk: 0,
        tile: 0,
        tiles: 0,
        feature_map: opts.feature_map.to_c(),
        normalize: bp.normalize as i32,
        causal: (kind == Kind::Causal) as i32,
        prep_tiles: prep_slots as i32,
        num_parts: if split { parts as i32 } else { 1 },
        part_len: bp.schedule.part_len as i64,
        state_mode: LinattnBackwardState::LINATTN_BWD_WHOLE as i32,
        _pad0: 0,
        eps: opts.eps,
        scale: opts.scale,
    };
    let bytes =
        |p: u64, s: &Strides, dim: usize| (p, span(sp, s, dim).unwrap_or(0).saturating_mul(es));
    // The whole-head walks are planned only where the state fits their
    // fragments (above).
    let threads = |pass: Pass| match pass {
        Pass::Dkv | Pass::PrepDq => dkv_threads(d, m).unwrap_or(THREADS),
        _ => THREADS,
    };
    let with_mode =
        |pass: Pass, pt: PassTiling, mode: LinattnBackwardState, writes: Vec<(u64, usize)>| {
            let scan = pass == Pass::StateScan;
            BackwardLaunch {
                pass,
                plan: LaunchPlan {
                    module: module(kind),
                    // Every pass but Dkv, PrepDq and StateScan exists for every
                    // dtype and kind, and those are planned only where they
                    // exist (above).
                    kernel: kernel_name(kind, pass, dtype).unwrap_or(""),
                    grid: [
                        (sh * pt.tiles) as u32,
                        if split && !scan { parts as u32 } else { 1 },
                        1,
                    ],
                    block: [threads(pass), 1, 1],
                    shared_bytes: shared_bytes(dtype, pass, d, m, pt) as u32,
                    params: LinattnBackwardParams {
                        chunk: pt.chunk as i32,
                        tile: pt.tile as i32,
                        tiles: pt.tiles as i32,
                        state_mode: mode as i32,
                        ..base
                    },
                },
                writes: writes
                    .into_iter()
                    .filter(|w| w.0 != 0 && w.1 != 0)
                    .collect(),
            }
        };
    let launch = |pass: Pass, pt: PassTiling, writes: Vec<(u64, usize)>| {
        let mode = if split {
            LinattnBackwardState::LINATTN_BWD_FROM_WORK
        } else {
            LinattnBackwardState::LINATTN_BWD_WHOLE
        };
        with_mode(pass, pt, mode, writes)
    };
    // The split walks' first two launches: partition sums, then the scan
    // that turns them into each partition's starting state.
    let sums_and_scan = |pass: Pass, pt: PassTiling, scan: LinattnBackwardState| {
        let scan_tiling = PassTiling {
            chunk: 0,
            tile: 0,
            tiles: scan_blocks(d, m),
        };
        let w = vec![(work_s, split_bytes)];
        [
            with_mode(
                pass,
                pt,
                LinattnBackwardState::LINATTN_BWD_PARTIALS,
                w.clone(),
            ),
            with_mode(Pass::StateScan, scan_tiling, scan, w),
        ]
    };
    let mut out = Vec::with_capacity(6);
    let work = vec![(work_den, rows * 4), (work_dden, prep_slots * rows * 4)];
    if let Some(pt) = fused {
        if split {
            let scan = if causal {
                LinattnBackwardState::LINATTN_BWD_SCAN_PREFIX
            } else {
                LinattnBackwardState::LINATTN_BWD_SCAN_TOTAL_IN
            };
            out.extend(sums_and_scan(Pass::PrepDq, pt, scan));
        }
        let mut writes = if bp.normalize { work } else { Vec::new() };
        writes.push(bytes(ptrs.dq, &sp.q, d));
        out.push(launch(Pass::PrepDq, pt, writes));
    } else {
        if bp.normalize {
            out.push(launch(Pass::Prep, t.prep, work));
        }
        out.push(launch(Pass::Dq, t.dqk, vec![bytes(ptrs.dq, &sp.q, d)]));
    }
    let (sn, zn) = (problem.state_s_len() * 4, problem.state_z_len() * 4);
    if let Some(pt) = merged {
        if split {
            let scan = if causal {
                LinattnBackwardState::LINATTN_BWD_SCAN_SUFFIX
            } else {
                LinattnBackwardState::LINATTN_BWD_SCAN_TOTAL_FINAL
            };
            out.extend(sums_and_scan(Pass::Dkv, pt, scan));
        }
        out.push(launch(
            Pass::Dkv,
            pt,
            vec![
                bytes(ptrs.dk, &sp.k, d),
                bytes(ptrs.dv, &sp.v, m),
                (ptrs.d_initial_s, sn),
                (ptrs.d_initial_z, zn),
            ],
        ));
        return out;
    }
    out.push(launch(
        Pass::Dk,
        t.dqk,
        vec![
            bytes(ptrs.dk, &sp.k, d),
            (ptrs.d_initial_s, sn),
            (ptrs.d_initial_z, zn),
        ],
    ));
    out.push(launch(Pass::Dv, t.dv, vec![bytes(ptrs.dv, &sp.v, m)]));
    out
}

/// Runs the launches in order, naming what each writes.
///
/// # Safety
/// The plan's addresses must be valid for `exec` (as validated).
unsafe fn run_plan<E: Executor>(exec: &E, launches: &[BackwardLaunch]) -> Result<()> {
    for l in launches {
        // SAFETY: forwarded; the write regions lie inside validated buffers.
        unsafe { exec.launch_writing(&l.plan, &l.writes)? };
    }
    Ok(())
}

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

impl<I, F> BackwardStates<'_, I, F> {
    /// No states at all.
    pub fn none() -> Self {
        BackwardStates {
            initial: None,
            d_final: None,
            d_initial: None,
        }
    }
}

fn lens_of<B>(x: &BackwardInputs<'_, B>, len: impl Fn(&B) -> usize) -> (Lens, usize) {
    (
        Lens {
            q: len(x.q),
            k: len(x.k),
            v: len(x.v),
            o: usize::MAX,
            initial: None,
            final_state: None,
        },
        len(x.d_o),
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_device<T: Element>(
    kind: Kind,
    dev: &Device,
    x: BackwardInputs<'_, Buffer<T>>,
    grads: Grads<'_, Buffer<T>>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: BackwardStates<'_, Buffer<f32>, Buffer<f32>>,
) -> Result<()> {
    let kernel = module(kind);
    let (mut lens, d_o_len) = lens_of(&x, |b| b.len());
    lens.initial = states.initial.as_ref().map(|s| (s.s.len(), s.z.len()));
    let glens = GradLens {
        d_o: d_o_len,
        dq: grads.dq.len(),
        dk: grads.dk.len(),
        dv: grads.dv.len(),
        d_final: states.d_final.as_ref().map(|s| (s.s.len(), s.z.len())),
        d_initial: states.d_initial.as_ref().map(|s| (s.s.len(), s.z.len())),
    };
    let bp = validate(
        kernel,
        T::DTYPE,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &glens,
        &dev.target(),
    )?;
    let (_tc, cu) = temp::offsets(dev, &bp.problem.cu_seqlens, kernel)?;
    let ws_floats = workspace_len(&bp);
    let (_tw, ws) = temp::workspace(dev, ws_floats, kernel)?;
    let mut guards: Vec<PtrGuard<'_>> = Vec::new();
    let (q, g) = x.q.read_ptr(dev, kernel, "q")?;
    guards.push(g);
    let (k, g) = x.k.read_ptr(dev, kernel, "k")?;
    guards.push(g);
    let (v, g) = x.v.read_ptr(dev, kernel, "v")?;
    guards.push(g);
    let (d_o, g) = x.d_o.read_ptr(dev, kernel, "d_o")?;
    guards.push(g);
    let (mut initial_s, mut initial_z, mut d_final_s, mut d_final_z) = (0, 0, 0, 0);
    if let Some(s) = &states.initial {
        let (ps, gs) = s.s.read_ptr(dev, kernel, "initial.s")?;
        let (pz, gz) = s.z.read_ptr(dev, kernel, "initial.z")?;
        (initial_s, initial_z) = (ps, pz);
        guards.push(gs);
        guards.push(gz);
    }
    if let Some(s) = &states.d_final {
        let (ps, gs) = s.s.read_ptr(dev, kernel, "d_final.s")?;
        let (pz, gz) = s.z.read_ptr(dev, kernel, "d_final.z")?;
        (d_final_s, d_final_z) = (ps, pz);
        guards.push(gs);
        guards.push(gz);
    }
    let Grads { dq, dk, dv } = grads;
    let (dq, _g1) = dq.write_ptr(dev, kernel, "dq")?;
    let (dk, _g2) = dk.write_ptr(dev, kernel, "dk")?;
    let (dv, _g3) = dv.write_ptr(dev, kernel, "dv")?;
    let mut di = states.d_initial;
    let (d_initial_s, d_initial_z, _g4) = match di.as_mut() {
        Some(s) => {
            let (ps, gs) = s.s.write_ptr(dev, kernel, "d_initial.s")?;
            let (pz, gz) = s.z.write_ptr(dev, kernel, "d_initial.z")?;
            (ps, pz, vec![gs, gz])
        }
        None => (0, 0, Vec::new()),
    };
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
    let launches = plan(kind, T::DTYPE, &bp, opts, &ptrs);
    // SAFETY: every buffer belongs to `dev` and was validated against the shape.
    unsafe { run_plan(dev, &launches) }
}

/// Gradients of [`causal_forward`](crate::ops::forward::causal_forward) on a
/// [`Device`]: writes dq, dk, dv (strides of q, k, v) and, when
/// `states.d_initial` is given, dL/dS0 and dL/dz0. `x.d_o` is dL/do; `x.o`
/// is the forward's output (required when `opts.normalize`); `states.initial`
/// must be the initial state the forward started from, and `states.d_final`
/// an optional gradient flowing into its final state. `cu_seqlens` (host
/// offsets) makes it a packed varlen call (`shape.batch == 1`).
pub fn causal_backward<T: Element>(
    dev: &Device,
    x: BackwardInputs<'_, Buffer<T>>,
    grads: Grads<'_, Buffer<T>>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: BackwardStates<'_, Buffer<f32>, Buffer<f32>>,
) -> Result<()> {
    backward_device(Kind::Causal, dev, x, grads, shape, cu_seqlens, opts, states)
}

/// Gradients of [`noncausal_forward`](crate::ops::forward::noncausal_forward)
/// on a [`Device`]; conventions as [`causal_backward`].
pub fn noncausal_backward<T: Element>(
    dev: &Device,
    x: BackwardInputs<'_, Buffer<T>>,
    grads: Grads<'_, Buffer<T>>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: BackwardStates<'_, Buffer<f32>, Buffer<f32>>,
) -> Result<()> {
    backward_device(
        Kind::NonCausal,
        dev,
        x,
        grads,
        shape,
        cu_seqlens,
        opts,
        states,
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_cuda<
    T: Element,
    B: DevicePtr<T>,
    G: DevicePtrMut<T>,
    I: DevicePtr<f32>,
    F: DevicePtrMut<f32>,
>(
    kind: Kind,
    gpu: &Gpu,
    x: BackwardInputs<'_, B>,
    grads: Grads<'_, G>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: BackwardStates<'_, I, F>,
) -> Result<()> {
    let kernel = module(kind);
    let (mut lens, d_o_len) = lens_of(&x, |b| b.len());
    lens.initial = states.initial.as_ref().map(|s| (s.s.len(), s.z.len()));
    let glens = GradLens {
        d_o: d_o_len,
        dq: grads.dq.len(),
        dk: grads.dk.len(),
        dv: grads.dv.len(),
        d_final: states.d_final.as_ref().map(|s| (s.s.len(), s.z.len())),
        d_initial: states.d_initial.as_ref().map(|s| (s.s.len(), s.z.len())),
    };
    let bp = validate(
        kernel,
        T::DTYPE,
        shape,
        cu_seqlens,
        opts,
        &lens,
        &glens,
        &gpu.target(),
    )?;
    let st = gpu.stream();
    let (_tc, cu) = temp::offsets_cuda(gpu, &bp.problem.cu_seqlens, kernel)?;
    let ws_floats = workspace_len(&bp);
    let (_tw, ws) = temp::workspace_cuda(gpu, ws_floats, kernel)?;
    let (q, _gq) = x.q.device_ptr(st);
    let (k, _gk) = x.k.device_ptr(st);
    let (v, _gv) = x.v.device_ptr(st);
    let (d_o, _gdo) = x.d_o.device_ptr(st);
    let mut fg = Vec::new();
    let (mut initial_s, mut initial_z, mut d_final_s, mut d_final_z) = (0, 0, 0, 0);
    if let Some(s) = states.initial.as_ref() {
        let (a, ga) = s.s.device_ptr(st);
        let (b, gb) = s.z.device_ptr(st);
        (initial_s, initial_z) = (a, b);
        fg.push(ga);
        fg.push(gb);
    }
    if let Some(s) = states.d_final.as_ref() {
        let (a, ga) = s.s.device_ptr(st);
        let (b, gb) = s.z.device_ptr(st);
        (d_final_s, d_final_z) = (a, b);
        fg.push(ga);
        fg.push(gb);
    }
    let Grads { dq, dk, dv } = grads;
    let (dq, _g1) = dq.device_ptr_mut(st);
    let (dk, _g2) = dk.device_ptr_mut(st);
    let (dv, _g3) = dv.device_ptr_mut(st);
    let mut di = states.d_initial;
    let mut wg = Vec::new();
    let (mut d_initial_s, mut d_initial_z) = (0, 0);
    if let Some(s) = di.as_mut() {
        let (a, ga) = s.s.device_ptr_mut(st);
        let (b, gb) = s.z.device_ptr_mut(st);
        (d_initial_s, d_initial_z) = (a, b);
        wg.push(ga);
        wg.push(gb);
    }
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
    let launches = plan(kind, T::DTYPE, &bp, opts, &ptrs);
    // SAFETY: cudarc memory of this context, validated lengths.
    unsafe { run_plan(gpu, &launches) }
}

/// [`causal_backward`] on cudarc memory (slices or views), on `gpu`'s stream.
pub fn causal_backward_cuda<
    T: Element,
    B: DevicePtr<T>,
    G: DevicePtrMut<T>,
    I: DevicePtr<f32>,
    F: DevicePtrMut<f32>,
>(
    gpu: &Gpu,
    x: BackwardInputs<'_, B>,
    grads: Grads<'_, G>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: BackwardStates<'_, I, F>,
) -> Result<()> {
    backward_cuda(Kind::Causal, gpu, x, grads, shape, cu_seqlens, opts, states)
}

/// [`noncausal_backward`] on cudarc memory (slices or views), on `gpu`'s stream.
pub fn noncausal_backward_cuda<
    T: Element,
    B: DevicePtr<T>,
    G: DevicePtrMut<T>,
    I: DevicePtr<f32>,
    F: DevicePtrMut<f32>,
>(
    gpu: &Gpu,
    x: BackwardInputs<'_, B>,
    grads: Grads<'_, G>,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
    states: BackwardStates<'_, I, F>,
) -> Result<()> {
    backward_cuda(
        Kind::NonCausal,
        gpu,
        x,
        grads,
        shape,
        cu_seqlens,
        opts,
        states,
    )
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

/// Validation of raw addresses: non-null where needed, pairs given together,
/// outputs (gradients, workspace) disjoint from inputs and from each other.
fn check_raw(
    kernel: &'static str,
    dtype: DType,
    p: &RawBackward,
    bp: &BackwardProblem,
) -> Result<()> {
    let sp = &bp.problem.shape;
    let need = [
        ("q", p.q),
        ("k", p.k),
        ("v", p.v),
        ("d_o", p.d_o),
        ("dq", p.dq),
        ("dk", p.dk),
        ("dv", p.dv),
    ];
    for (arg, v) in need {
        if v == 0 && sp.tokens > 0 {
            return Err(Error::invalid(kernel, arg, "null pointer"));
        }
    }
    for (arg, a, b) in [
        ("initial", p.initial_s, p.initial_z),
        ("d_final", p.d_final_s, p.d_final_z),
        ("d_initial", p.d_initial_s, p.d_initial_z),
    ] {
        if (a == 0) != (b == 0) {
            return Err(Error::invalid(
                kernel,
                arg,
                "S and z must be given together (both or neither)",
            ));
        }
    }
    let ws = workspace_len(bp);
    if ws > 0 && (p.workspace == 0 || p.workspace_len < ws) {
        return Err(Error::invalid(
            kernel,
            "workspace",
            format!(
                "this call needs a workspace of {ws} fp32 elements, {} given",
                if p.workspace == 0 { 0 } else { p.workspace_len }
            ),
        ));
    }
    if !bp.problem.cu_seqlens.is_empty() && p.cu_seqlens == 0 {
        return Err(Error::invalid(
            kernel,
            "cu_seqlens",
            "varlen call without device offsets",
        ));
    }
    let es = dtype.size();
    let sp_of = |s: &Strides, dim| span(sp, s, dim).unwrap_or(usize::MAX);
    let (sn, zn) = (bp.problem.state_s_len(), bp.problem.state_z_len());
    let inputs = [
        ("q", byte_range(p.q, sp_of(&sp.q, sp.d), es)),
        ("k", byte_range(p.k, sp_of(&sp.k, sp.d), es)),
        ("v", byte_range(p.v, sp_of(&sp.v, sp.m), es)),
        ("d_o", byte_range(p.d_o, sp_of(&sp.o, sp.m), es)),
        ("initial state", byte_range(p.initial_s, sn, 4)),
        ("initial state", byte_range(p.initial_z, zn, 4)),
        ("d_final", byte_range(p.d_final_s, sn, 4)),
        ("d_final", byte_range(p.d_final_z, zn, 4)),
    ];
    let outputs = [
        ("dq", byte_range(p.dq, sp_of(&sp.q, sp.d), es)),
        ("dk", byte_range(p.dk, sp_of(&sp.k, sp.d), es)),
        ("dv", byte_range(p.dv, sp_of(&sp.v, sp.m), es)),
        ("d_initial", byte_range(p.d_initial_s, sn, 4)),
        ("d_initial", byte_range(p.d_initial_z, zn, 4)),
        ("workspace", byte_range(p.workspace, ws, 4)),
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

unsafe fn backward_raw<E: Executor>(
    kind: Kind,
    exec: &E,
    dtype: DType,
    ptrs: &RawBackward,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<()> {
    let kernel = module(kind);
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
    let launches = plan(kind, dtype, &bp, opts, ptrs);
    // SAFETY: forwarded to the caller.
    unsafe { run_plan(exec, &launches) }
}

/// [`causal_backward`] on raw device addresses, for engines that manage
/// their own memory. Get the workspace size from [`workspace_len`] (with the
/// problem from [`validate`]).
///
/// # Safety
/// Every non-zero address must point to memory the executor can reach,
/// valid until the launches complete: q, k, v, o, d_o (`dtype`, read) and
/// dq, dk, dv (written) covering `shape` with the strides of their primals;
/// the initial state and d_final (read) and d_initial (written) as
/// `num_seqs * heads` fp32 states; the workspace of `ptrs.workspace_len`
/// fp32 elements (checked against [`workspace_len`] of this call, which
/// depends on the whole shape: recompute it per call, a smaller batch can
/// need more); for varlen, `cu_seqlens.len()` `int64` offsets on the device
/// equal to the host `cu_seqlens`. Outputs must not overlap any input
/// (checked by address range).
pub unsafe fn causal_backward_raw<E: Executor>(
    exec: &E,
    dtype: DType,
    ptrs: &RawBackward,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<()> {
    // SAFETY: forwarded.
    unsafe { backward_raw(Kind::Causal, exec, dtype, ptrs, shape, cu_seqlens, opts) }
}

/// [`noncausal_backward`] on raw device addresses.
///
/// # Safety
/// As for [`causal_backward_raw`].
pub unsafe fn noncausal_backward_raw<E: Executor>(
    exec: &E,
    dtype: DType,
    ptrs: &RawBackward,
    shape: &AttentionShape,
    cu_seqlens: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<()> {
    // SAFETY: forwarded.
    unsafe { backward_raw(Kind::NonCausal, exec, dtype, ptrs, shape, cu_seqlens, opts) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_lens(shape: &AttentionShape) -> (Lens, GradLens) {
        let qn = span(shape, &shape.q, shape.d).unwrap();
        let kn = span(shape, &shape.k, shape.d).unwrap();
        let vn = span(shape, &shape.v, shape.m).unwrap();
        let on = span(shape, &shape.o, shape.m).unwrap();
        (
            Lens {
                q: qn,
                k: kn,
                v: vn,
                o: on,
                initial: None,
                final_state: None,
            },
            GradLens {
                d_o: on,
                dq: qn,
                dk: kn,
                dv: vn,
                d_final: None,
                d_initial: None,
            },
        )
    }

    #[test]
    fn tiling_of_out_of_range_sizes_does_not_panic() {
        // Validation rejects these before any launch; the public tiling
        // helpers must still answer without panicking (or overflowing).
        for (d, m) in [(0, 0), (0, 7), (300, 5), (5, 1000), (usize::MAX / 4, 1)] {
            for dtype in [DType::F32, DType::F16, DType::Bf16] {
                let _ = tiling_for(dtype, d, m);
            }
        }
    }

    #[test]
    fn tiling_fits_shared_memory_for_every_size() {
        let budget = SHARED_BUDGET_BYTES;
        for d in 1..=forward::MAX_DIM {
            for m in [1, 2, 17, 31, 64, 100, 128, 255, 256] {
                let t = tiling(d, m);
                assert!(prep_shared_floats(d, t.prep.chunk, t.prep.tile) * 4 <= budget);
                assert!(dqk_shared_floats(m, t.dqk.chunk, t.dqk.tile) * 4 <= budget);
                assert!(dv_shared_floats(d, t.dv.chunk, t.dv.tile) * 4 <= budget);
                for (pt, dim) in [(t.prep, m), (t.dqk, d), (t.dv, m)] {
                    assert!(pt.tile >= 1 && pt.tile <= dim, "d {d} m {m} {pt:?}");
                    assert_eq!(pt.tiles, dim.div_ceil(pt.tile));
                    assert!((pt.tiles - 1) * pt.tile < dim);
                }
            }
        }
        // Small heads: one block per sequence-head and pass.
        let t = tiling(64, 64);
        assert_eq!((t.dqk.tiles, t.dv.tiles), (1, 1));
        assert_eq!(tiling(16, 16).dqk.chunk, 64);
    }

    #[test]
    fn mma_tiling_fits_shared_memory_for_every_size() {
        for dtype in [DType::F16, DType::Bf16] {
            for d in 1..=forward::MAX_DIM {
                for m in [1, 2, 15, 16, 17, 31, 64, 100, 128, 255, 256] {
                    let t = tiling_for(dtype, d, m);
                    for (pass, pt, dim) in [
                        (Pass::Prep, t.prep, m),
                        (Pass::Dq, t.dqk, d),
                        (Pass::Dv, t.dv, m),
                    ] {
                        assert!(shared_bytes(dtype, pass, d, m, pt) <= SHARED_BUDGET_BYTES);
                        assert_eq!(pt.chunk % 16, 0, "d {d} m {m} {pt:?}");
                        assert_eq!(pt.tile % 16, 0, "d {d} m {m} {pt:?}");
                        assert!(pt.tile >= 16 && pt.tile <= pad16(dim), "d {d} m {m} {pt:?}");
                        assert_eq!(pt.tiles, dim.div_ceil(pt.tile), "d {d} m {m} {pt:?}");
                        assert!((pt.tiles - 1) * pt.tile < dim);
                    }
                }
            }
        }
        // fp32 keeps the FMA tiling.
        assert_eq!(tiling_for(DType::F32, 100, 130), tiling(100, 130));
        assert!(!uses_mma(DType::F32) && uses_mma(DType::F16) && uses_mma(DType::Bf16));
        // Small heads: one block per sequence-head and pass, chunk 64.
        let t = tiling_for(DType::Bf16, 64, 64);
        assert_eq!((t.prep.tiles, t.dqk.tiles, t.dv.tiles), (1, 1, 1));
        assert_eq!((t.prep.chunk, t.dqk.chunk, t.dv.chunk), (64, 64, 64));
        // The first anchor shape (D = M = 128): two tiles per pass.
        let t = tiling_for(DType::Bf16, 128, 128);
        for pt in [t.prep, t.dqk, t.dv] {
            assert_eq!((pt.tile, pt.tiles), (64, 2), "{t:?}");
        }
        // No more tiles than the FMA tiling at D = M = 64, 128 (at 256 the
        // 16-bit copies and the scratch cost more: 6-8 tiles against 5).
        for dim in [64, 128] {
            let (a, b) = (tiling_for(DType::F16, dim, dim), tiling(dim, dim));
            assert!(
                a.dqk.tiles <= b.dqk.tiles && a.dv.tiles <= b.dv.tiles,
                "{a:?} {b:?}"
            );
        }
    }

    #[test]
    fn merged_dkv_policy() {
        for dtype in [DType::F16, DType::Bf16] {
            for d in 1..=forward::MAX_DIM {
                for m in [1, 2, 15, 16, 17, 31, 33, 64, 65, 80, 100, 128, 200, 256] {
                    let t = tiling_for(dtype, d, m);
                    let fits = |c: usize| dkv_mma_bytes(d, m, c) <= SHARED_BUDGET_BYTES;
                    let any_fits = [64, 32].into_iter().any(fits);
                    let want = dkv_threads(d, m).is_some() && any_fits;
                    assert_eq!(t.dkv.is_some(), want, "{dtype:?} d {d} m {m} {t:?}");
                    // The fused prep + dq walk: same rule, its own bytes
                    // (two more per-row vectors: never more than dkv's
                    // chunk, and only where dkv fits too).
                    let pfits = |c: usize| prep_dq_mma_bytes(d, m, c) <= SHARED_BUDGET_BYTES;
                    let pwant = dkv_threads(d, m).is_some() && [64, 32].into_iter().any(pfits);
                    assert_eq!(t.prep_dq.is_some(), pwant, "{dtype:?} d {d} m {m} {t:?}");
                    if let Some(pt) = t.prep_dq {
                        assert_eq!((pt.tiles, pt.tile), (1, pad16(d)));
                        assert!(pfits(pt.chunk) && (pt.chunk == 64 || !pfits(64)));
                        assert!(t.dkv.is_some_and(|k| k.chunk >= pt.chunk));
                        assert_eq!(
                            shared_bytes(dtype, Pass::PrepDq, d, m, pt),
                            prep_dq_mma_bytes(d, m, pt.chunk)
                        );
                        assert!(kernel_name(Kind::NonCausal, Pass::PrepDq, dtype).is_some());
                    }
                    if let Some(pt) = t.dkv {
                        assert_eq!((pt.tiles, pt.tile), (1, pad16(d)));
                        assert!(pt.chunk >= MIN_MERGED_CHUNK && pt.chunk % 16 == 0);
                        assert!(fits(pt.chunk), "d {d} m {m} {pt:?}");
                        // The largest chunk that fits.
                        assert!(pt.chunk == 64 || !fits(64), "d {d} m {m} {pt:?}");
                        assert_eq!(
                            shared_bytes(dtype, Pass::Dkv, d, m, pt),
                            dkv_mma_bytes(d, m, pt.chunk)
                        );
                        assert!(kernel_name(Kind::Causal, Pass::Dkv, dtype).is_some());
                    }
                }
            }
        }
        // Small heads merge, at chunk 64 up to D = M = 64.
        for dim in [1, 16, 17, 40, 64] {
            let t = tiling_for(DType::Bf16, dim, dim).dkv.expect("merged");
            assert_eq!(t.chunk, 64, "{dim}");
        }
        assert!(tiling_for(DType::F16, 40, 24).dkv.is_some());
        // The first anchor shape (D = M = 128): dS is 64 tiles, held by 16
        // warps (512 threads), chunk 32 (chunk 64 would need 132 KB).
        let t = tiling_for(DType::Bf16, 128, 128).dkv.expect("merged");
        assert_eq!((t.chunk, t.tiles), (32, 1));
        let t = tiling_for(DType::Bf16, 128, 128).prep_dq.expect("fused");
        assert_eq!((t.chunk, t.tiles), (32, 1));
        assert_eq!(dkv_threads(128, 128), Some(512));
        assert!(dkv_mma_bytes(128, 128, 64) > SHARED_BUDGET_BYTES);
        // 256 threads up to 32 tiles, 512 up to 64, none past.
        assert_eq!(dkv_threads(64, 64), Some(256));
        assert_eq!(dkv_threads(128, 64), Some(256));
        assert_eq!(dkv_threads(129, 64), Some(512));
        assert_eq!(dkv_threads(256, 64), Some(512));
        assert_eq!(dkv_threads(129, 128), None);
        assert!(tiling_for(DType::Bf16, 200, 250).dkv.is_none());
        assert!(tiling_for(DType::Bf16, 256, 256).dkv.is_none());
        // fp32 never merges (no FMA body), and has no such kernel.
        for (d, m) in [(1, 1), (16, 16), (64, 64)] {
            assert!(tiling_for(DType::F32, d, m).dkv.is_none());
            assert!(tiling_for(DType::F32, d, m).prep_dq.is_none());
            assert!(tiling(d, m).dkv.is_none() && tiling(d, m).prep_dq.is_none());
        }
        assert_eq!(kernel_name(Kind::NonCausal, Pass::Dkv, DType::F32), None);
        assert_eq!(kernel_name(Kind::Causal, Pass::PrepDq, DType::F32), None);
        assert_eq!(
            kernel_name(Kind::NonCausal, Pass::Dkv, DType::F16),
            Some("noncausal_backward_dkv_f16")
        );
    }

    #[test]
    fn carve_aligns_every_buffer_to_128_bytes() {
        assert_eq!(carve(&[]), 0);
        assert_eq!(carve(&[1]), 1);
        assert_eq!(carve(&[1, 1]), 129);
        assert_eq!(carve(&[128, 4, 256]), 512);
        // Every tile offset the kernels form is 32-byte aligned when the
        // row strides are multiples of 8 halves / 4 floats.
        assert_eq!((16 * (64 + 8) * 2) % 32, 0);
        assert_eq!((16 * (64 + 4) * 4) % 32, 0);
    }

    #[test]
    fn split_schedule_policy() {
        let t = tiling_for(DType::Bf16, 128, 128);
        let chunk = t.dkv.unwrap().chunk.max(t.prep_dq.unwrap().chunk);
        let auto = ScheduleChoice::Auto;
        let h200 = whole_head_resident(&Target::H200, 128, 128, &t);
        assert_eq!(h200, 132);
        let s = |choice, dtype, sh, len| {
            let t = tiling_for(dtype, 128, 128);
            split_schedule(choice, dtype, &t, 128, 128, sh, len, h200)
        };
        // B 2, H 16, T 16384: 32 blocks become 4 x 32 = 128 (<= 132 SMs).
        let a = s(auto, DType::Bf16, 32, 16384);
        assert_eq!(a.parts, 4);
        assert_eq!(a.part_len, 4096);
        assert_eq!(a.part_len % chunk, 0);
        // 64 sequence-heads: 2 partitions; 96 fill the GPU: no split.
        assert_eq!(s(auto, DType::Bf16, 64, 2048).parts, 2);
        assert_eq!(s(auto, DType::Bf16, 96, 8192).parts, 1);
        // Partitions of at least four chunks.
        assert_eq!(s(auto, DType::Bf16, 1, 7 * chunk).parts, 1);
        assert_eq!(s(auto, DType::Bf16, 1, 8 * chunk).parts, 2);
        // f32 has no whole-head walks; Walk never splits; Split forces,
        // capped by the chunks, and the last partition may be short.
        assert_eq!(s(auto, DType::F32, 1, 16384).parts, 1);
        assert_eq!(s(ScheduleChoice::Walk, DType::Bf16, 1, 16384).parts, 1);
        assert_eq!(
            s(
                ScheduleChoice::Split { parts: 3 },
                DType::F16,
                200,
                2 * chunk
            )
            .parts,
            2
        );
        let f = s(
            ScheduleChoice::Split { parts: 3 },
            DType::Bf16,
            2,
            5 * chunk + 7,
        );
        assert_eq!((f.parts, f.part_len), (3, 2 * chunk));
        // D = M = 256 keeps the tiled passes: nothing resident, no split.
        let t256 = tiling_for(DType::Bf16, 256, 256);
        assert_eq!(whole_head_resident(&Target::H200, 256, 256, &t256), 0);
        assert_eq!(
            split_schedule(auto, DType::Bf16, &t256, 256, 256, 1, 1 << 16, 132).parts,
            1
        );
        // A scan grid past the x limit: no split.
        assert_eq!(
            s(
                ScheduleChoice::Split { parts: 2 },
                DType::Bf16,
                MAX_GRID_X,
                16384
            )
            .parts,
            1
        );
    }

    /// The split per architecture at bf16 D = M = 128 (512-thread
    /// whole-head walks: one block per SM everywhere).
    #[test]
    fn split_schedule_per_architecture() {
        let t = tiling_for(DType::Bf16, 128, 128);
        let a100 = Target::A100;
        let sm86 = Target::sm86(84);
        for (g, want) in [(Target::H200, 132), (a100, 108), (sm86, 84)] {
            assert_eq!(whole_head_resident(&g, 128, 128, &t), want, "{}", g.arch());
        }
        let parts = |g: &Target, sh: usize, len: usize| {
            let r = whole_head_resident(g, 128, 128, &t);
            split_schedule(ScheduleChoice::Auto, DType::Bf16, &t, 128, 128, sh, len, r).parts
        };
        // B 2, H 16, T 16384 (32 sequence-heads): 4 on the H200 (128 of
        // 132 SMs), 3 on the A100 (96 of 108: one wave, not 128 in two),
        // 2 on an 84-SM sm_86.
        assert_eq!(parts(&Target::H200, 32, 16384), 4);
        assert_eq!(parts(&a100, 32, 16384), 3);
        assert_eq!(parts(&sm86, 32, 16384), 2);
        // 60 sequence-heads: two on the H200, none on the A100 or sm_86.
        assert_eq!(parts(&Target::H200, 60, 16384), 2);
        assert_eq!(parts(&a100, 60, 16384), 1);
        assert_eq!(parts(&sm86, 60, 16384), 1);
        // At 256 threads (D = M = 64) two blocks fit an SM where shared
        // memory allows: the H200 holds two, the 100 KiB parts one.
        let t64 = tiling_for(DType::Bf16, 64, 64);
        assert_eq!(dkv_threads(64, 64), Some(256));
        assert_eq!(whole_head_resident(&Target::H200, 64, 64, &t64), 264);
        assert_eq!(whole_head_resident(&sm86, 64, 64, &t64), 84);
        // Every split grid stays within one wave.
        for g in [Target::H200, a100, sm86, Target::sm89(142)] {
            let r = whole_head_resident(&g, 128, 128, &t);
            for sh in 1..300 {
                let p = parts(&g, sh, 1 << 16);
                assert!(p == 1 || sh * p <= r, "{} {sh}: {p}", g.arch());
            }
        }
    }

    /// The footprint the policy assumes is the one the `.cu` files declare.
    #[test]
    fn whole_head_launch_bounds_match_the_sources() {
        let (threads, min_blocks) = WHOLE_HEAD_LAUNCH_BOUNDS;
        let bounds = format!("__launch_bounds__({threads}, {min_blocks})");
        for (src, kind) in [
            (
                include_str!("../../../../cuda/causal_backward.cu"),
                Kind::Causal,
            ),
            (
                include_str!("../../../../cuda/noncausal_backward.cu"),
                Kind::NonCausal,
            ),
        ] {
            for dtype in [DType::F16, DType::Bf16] {
                for pass in [Pass::Dkv, Pass::PrepDq] {
                    let name = kernel_name(kind, pass, dtype).unwrap();
                    let decl = format!("{bounds} {name}(");
                    assert!(src.contains(&decl), "missing `{decl}`");
                }
            }
        }
    }

    #[test]
    fn split_plans_sum_scan_and_walk() {
        let (h, n, d, m) = (2, 1000, 40, 24);
        let shape = AttentionShape::bhnd(1, h, n, d, m);
        let (lens, glens) = full_lens(&shape);
        let opts = AttentionOptions {
            schedule: ScheduleChoice::Split { parts: 3 },
            ..Default::default()
        };
        let bp = validate(
            "t",
            DType::F16,
            &shape,
            None,
            &opts,
            &lens,
            &glens,
            &Target::H200,
        )
        .unwrap();
        assert_eq!(bp.schedule.parts, 3);
        let rows = n * h;
        let norm = (1 + bp.tiling.prep.tiles) * rows;
        assert_eq!(workspace_len(&bp), norm + h * 3 * (d * m + d));
        let ws = 11u64 << 20;
        let ptrs = RawBackward {
            q: 1 << 20,
            k: 2 << 20,
            v: 3 << 20,
            d_o: 5 << 20,
            dq: 6 << 20,
            dk: 7 << 20,
            dv: 8 << 20,
            workspace: ws,
            ..Default::default()
        };
        use LinattnBackwardState::*;
        // (pass, state mode) of each launch, and the six a split plans with
        // the given scans.
        let modes = |l: &[BackwardLaunch]| -> Vec<(Pass, i32)> {
            l.iter()
                .map(|l| (l.pass, l.plan.params.state_mode))
                .collect()
        };
        let six = |into_dq: LinattnBackwardState, into_dkv: LinattnBackwardState| {
            [
                (Pass::PrepDq, LINATTN_BWD_PARTIALS),
                (Pass::StateScan, into_dq),
                (Pass::PrepDq, LINATTN_BWD_FROM_WORK),
                (Pass::Dkv, LINATTN_BWD_PARTIALS),
                (Pass::StateScan, into_dkv),
                (Pass::Dkv, LINATTN_BWD_FROM_WORK),
            ]
            .map(|(p, s)| (p, s as i32))
        };
        let l = plan(Kind::Causal, DType::F16, &bp, &opts, &ptrs);
        assert_eq!(
            modes(&l),
            six(LINATTN_BWD_SCAN_PREFIX, LINATTN_BWD_SCAN_SUFFIX)
        );
        let work_s = ws + (norm * 4) as u64;
        for x in &l {
            let p = &x.plan.params;
            assert_eq!(
                (p.work_s, p.work_z),
                (work_s, work_s + (h * 3 * d * m * 4) as u64)
            );
            assert_eq!((p.num_parts, p.part_len), (3, bp.schedule.part_len as i64));
            if x.pass == Pass::StateScan {
                assert_eq!(x.plan.kernel, "causal_backward_state_scan");
                assert_eq!(x.plan.grid, [(h * scan_blocks(d, m)) as u32, 1, 1]);
                assert_eq!(x.plan.shared_bytes, 0);
            } else {
                assert_eq!(x.plan.grid, [h as u32, 3, 1]);
            }
        }
        // Partition sums and scans write the partition states only.
        for i in [0, 1, 3, 4] {
            assert_eq!(l[i].writes, [(work_s, h * 3 * (d * m + d) * 4)]);
        }
        // Non-causal: the scans put the total in every slot.
        let nc = plan(Kind::NonCausal, DType::F16, &bp, &opts, &ptrs);
        assert_eq!(
            modes(&nc),
            six(LINATTN_BWD_SCAN_TOTAL_IN, LINATTN_BWD_SCAN_TOTAL_FINAL)
        );
        assert_eq!(nc[1].plan.kernel, "noncausal_backward_state_scan");
    }

    #[test]
    fn plans_have_the_expected_launches() {
        let shape = AttentionShape::bhnd(2, 3, 100, 40, 24);
        let (lens, glens) = full_lens(&shape);
        let opts = AttentionOptions::default();
        let bp = validate(
            "t",
            DType::Bf16,
            &shape,
            None,
            &opts,
            &lens,
            &glens,
            &Target::H200,
        )
        .unwrap();
        assert_eq!(bp.tiling, tiling_for(DType::Bf16, 40, 24));
        let pt = bp.tiling.prep.tiles;
        assert_eq!(workspace_len(&bp), (1 + pt) * 2 * 100 * 3);
        let ptrs = RawBackward {
            q: 1 << 20,
            k: 2 << 20,
            v: 3 << 20,
            d_o: 5 << 20,
            dq: 6 << 20,
            dk: 7 << 20,
            dv: 8 << 20,
            d_initial_s: 9 << 20,
            d_initial_z: 10 << 20,
            workspace: 11 << 20,
            ..Default::default()
        };
        // A small head: prep + dq fused, dk + dv merged, one workspace slot.
        let t = bp.tiling;
        let dkv = t.dkv.expect("40 x 24 takes the merged walk");
        let pdq = t.prep_dq.expect("40 x 24 takes the fused walk");
        let l = plan(Kind::Causal, DType::Bf16, &bp, &opts, &ptrs);
        let passes: Vec<Pass> = l.iter().map(|l| l.pass).collect();
        assert_eq!(passes, [Pass::PrepDq, Pass::Dkv]);
        assert_eq!(l[0].plan.kernel, "causal_backward_prepdq_bf16");
        assert_eq!(l[1].plan.kernel, "causal_backward_dkv_bf16");
        assert!(l.iter().all(|x| x.plan.grid == [6, 1, 1]
            && x.plan.block == [256, 1, 1]
            && x.plan.params.tiles == 1
            && x.plan.params.prep_tiles == 1));
        assert_eq!(l[0].plan.params.chunk as usize, pdq.chunk);
        assert_eq!(
            l[0].plan.shared_bytes as usize,
            prep_dq_mma_bytes(40, 24, pdq.chunk)
        );
        assert_eq!(
            l[0].writes,
            [
                (11 << 20, 2 * 100 * 3 * 4),
                ((11 << 20) + 2 * 100 * 3 * 4, 2 * 100 * 3 * 4),
                (6 << 20, 2 * 3 * 100 * 40 * 2)
            ]
        );
        assert_eq!(l[1].plan.params.chunk as usize, dkv.chunk);
        assert_eq!(
            l[1].plan.shared_bytes as usize,
            dkv_mma_bytes(40, 24, dkv.chunk)
        );
        assert_eq!(
            l[1].writes,
            [
                (7 << 20, 2 * 3 * 100 * 40 * 2),
                (8 << 20, 2 * 3 * 100 * 24 * 2),
                (9 << 20, 6 * 40 * 24 * 4),
                (10 << 20, 6 * 40 * 4)
            ]
        );
        for x in &l {
            assert!(x.plan.shared_bytes as usize <= SHARED_BUDGET_BYTES);
        }
        // The same shape in fp32: separate dk and dv walks.
        let bp32 = validate(
            "t",
            DType::F32,
            &shape,
            None,
            &opts,
            &lens,
            &glens,
            &Target::H200,
        )
        .unwrap();
        assert!(bp32.tiling.dkv.is_none());
        let l = plan(Kind::Causal, DType::F32, &bp32, &opts, &ptrs);
        let passes: Vec<Pass> = l.iter().map(|l| l.pass).collect();
        assert_eq!(passes, [Pass::Prep, Pass::Dq, Pass::Dk, Pass::Dv]);
        // A hand-built fp32 problem naming the merged walk (which fp32 does
        // not have) still plans the separate walks, with real kernel names.
        let mut forced = bp32.clone();
        forced.tiling.dkv = Some(dkv);
        forced.tiling.prep_dq = Some(pdq);
        let lf = plan(Kind::Causal, DType::F32, &forced, &opts, &ptrs);
        let passes: Vec<Pass> = lf.iter().map(|l| l.pass).collect();
        assert_eq!(passes, [Pass::Prep, Pass::Dq, Pass::Dk, Pass::Dv]);
        assert!(lf.iter().all(|l| !l.plan.kernel.is_empty()));
        assert_eq!(l[0].plan.kernel, "causal_backward_prep_f32");
        let pt = bp32.tiling.prep.tiles;
        assert_eq!(l[0].plan.grid, [(6 * pt) as u32, 1, 1]);
        assert_eq!(l[0].plan.params.work_dden, (11 << 20) + 2 * 100 * 3 * 4);
        assert_eq!(
            l[0].writes,
            [(11 << 20, 2400), ((11 << 20) + 2400, pt * 2400)]
        );
        assert!(l.iter().all(|x| x.plan.params.prep_tiles as usize == pt));
        let t = bp32.tiling;
        assert_eq!(l[1].plan.grid, [(6 * t.dqk.tiles) as u32, 1, 1]);
        assert_eq!(l[3].plan.grid, [(6 * t.dv.tiles) as u32, 1, 1]);
        assert_eq!(l[3].plan.params.tile as usize, t.dv.tile);
        // dk writes dk and the initial state's gradient.
        assert_eq!(
            l[2].writes,
            [
                (7 << 20, 2 * 3 * 100 * 40 * 4),
                (9 << 20, 6 * 40 * 24 * 4),
                (10 << 20, 6 * 40 * 4)
            ]
        );
        for x in &l {
            assert!(x.plan.shared_bytes as usize <= SHARED_BUDGET_BYTES);
            assert_eq!(x.plan.params.causal, 1);
        }
        // D = M = 128 (the first anchor shape): the merged walk with 512
        // threads; a hand-built D = M = 256 tiling naming it (its dS does
        // not fit the fragments) plans the separate walks.
        for (dim, merged) in [(128, true), (256, false)] {
            let shape = AttentionShape::bhnd(1, 2, 50, dim, dim);
            let (lens, glens) = full_lens(&shape);
            let mut bp = validate(
                "t",
                DType::F16,
                &shape,
                None,
                &opts,
                &lens,
                &glens,
                &Target::H200,
            )
            .unwrap();
            let whole = Some(PassTiling {
                chunk: 32,
                tile: dim,
                tiles: 1,
            });
            (bp.tiling.dkv, bp.tiling.prep_dq) = (whole, whole);
            let l = plan(Kind::Causal, DType::F16, &bp, &opts, &ptrs);
            let passes: Vec<Pass> = l.iter().map(|l| l.pass).collect();
            if merged {
                assert_eq!(passes, [Pass::PrepDq, Pass::Dkv]);
            } else {
                assert_eq!(passes, [Pass::Prep, Pass::Dq, Pass::Dk, Pass::Dv]);
            }
            let block = if merged { 512 } else { THREADS };
            assert!(l.iter().all(|x| x.plan.block == [block, 1, 1]), "{dim}");
        }
        // Without normalisation: no prep, no workspace, o not needed.
        let plain = AttentionOptions {
            normalize: false,
            ..opts
        };
        let bp2 = validate(
            "t",
            DType::F32,
            &shape,
            None,
            &plain,
            &lens,
            &glens,
            &Target::H200,
        )
        .unwrap();
        assert_eq!(workspace_len(&bp2), 0);
        let l = plan(Kind::NonCausal, DType::F32, &bp2, &plain, &ptrs);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].plan.kernel, "noncausal_backward_dq_f32");
        assert_eq!(l[0].plan.params.causal, 0);
        assert_eq!(l[0].plan.params.work_den, 0);
        // ... and in bf16 the fused walk writes dq alone.
        let bp3 = validate(
            "t",
            DType::Bf16,
            &shape,
            None,
            &plain,
            &lens,
            &glens,
            &Target::H200,
        )
        .unwrap();
        let l = plan(Kind::NonCausal, DType::Bf16, &bp3, &plain, &ptrs);
        assert_eq!(l[0].plan.kernel, "noncausal_backward_prepdq_bf16");
        assert_eq!(l[0].writes, [(6 << 20, 2 * 3 * 100 * 40 * 2)]);
        assert_eq!(
            (l[0].plan.params.work_den, l[0].plan.params.normalize),
            (0, 0)
        );
    }

    #[test]
    fn validation_rejects_bad_calls() {
        let shape = AttentionShape::bnhd(2, 3, 10, 17, 5);
        let opts = AttentionOptions::default();
        let (lens, glens) = full_lens(&shape);
        assert!(validate(
            "t",
            DType::F32,
            &shape,
            None,
            &opts,
            &lens,
            &glens,
            &Target::H200
        )
        .is_ok());
        let err = |s: &AttentionShape, o: &AttentionOptions, l: &Lens, g: &GradLens| {
            validate("t", DType::F32, s, None, o, l, g, &Target::H200)
                .unwrap_err()
                .to_string()
        };
        let e = err(
            &shape,
            &opts,
            &lens,
            &GradLens {
                d_o: glens.d_o - 1,
                ..glens
            },
        );
        assert!(e.contains("`d_o`") && e.contains("need"), "{e}");
        let e = err(&shape, &opts, &lens, &GradLens { dv: 3, ..glens });
        assert!(e.contains("`dv`"), "{e}");
        let e = err(
            &shape,
            &opts,
            &lens,
            &GradLens {
                d_initial: Some((2 * 3 * 17 * 5, 1)),
                ..glens
            },
        );
        assert!(e.contains("d_initial"), "{e}");
        // Gradient rows of q's strides must not overlap.
        let mut bad = shape;
        bad.q.token = 1;
        let e = err(&bad, &opts, &lens, &glens);
        assert!(e.contains("`dq`") && e.contains("overlap"), "{e}");
        // The forward's checks apply too.
        let e = err(&AttentionShape { d: 0, ..shape }, &opts, &lens, &glens);
        assert!(e.contains("1..=256"), "{e}");
        let e = err(
            &shape,
            &AttentionOptions {
                eps: f32::NAN,
                ..opts
            },
            &lens,
            &glens,
        );
        assert!(e.contains("eps"), "{e}");
    }

    #[test]
    fn raw_checks_catch_overlaps_and_nulls() {
        let shape = AttentionShape::bhnd(1, 1, 4, 2, 2);
        let opts = AttentionOptions::default();
        let (lens, glens) = full_lens(&shape);
        let bp = validate(
            "t",
            DType::F32,
            &shape,
            None,
            &opts,
            &lens,
            &glens,
            &Target::H200,
        )
        .unwrap();
        let ok = RawBackward {
            q: 1000,
            k: 2000,
            v: 3000,
            d_o: 5000,
            dq: 6000,
            dk: 7000,
            dv: 8000,
            workspace: 9000,
            workspace_len: workspace_len(&bp),
            ..Default::default()
        };
        assert!(check_raw("t", DType::F32, &ok, &bp).is_ok());
        // One element short of what this call needs.
        let short = RawBackward {
            workspace_len: workspace_len(&bp) - 1,
            ..ok
        };
        let e = check_raw("t", DType::F32, &short, &bp).unwrap_err();
        assert!(e.to_string().contains("needs a workspace of"), "{e}");
        let e = check_raw("t", DType::F32, &RawBackward { dq: 5004, ..ok }, &bp).unwrap_err();
        assert!(e.to_string().contains("overlaps `d_o`"), "{e}");
        let e = check_raw("t", DType::F32, &RawBackward { dk: 0, ..ok }, &bp).unwrap_err();
        assert!(e.to_string().contains("null"), "{e}");
        let e = check_raw("t", DType::F32, &RawBackward { workspace: 0, ..ok }, &bp).unwrap_err();
        assert!(e.to_string().contains("workspace"), "{e}");
        let e = check_raw(
            "t",
            DType::F32,
            &RawBackward {
                d_final_s: 20000,
                ..ok
            },
            &bp,
        )
        .unwrap_err();
        assert!(e.to_string().contains("together"), "{e}");
        let e = check_raw(
            "t",
            DType::F32,
            &RawBackward {
                workspace: 8010,
                ..ok
            },
            &bp,
        )
        .unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }
}
