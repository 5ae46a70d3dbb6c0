// Tensor-core bodies of the four backward walks (linattn/backward_walk.cuh
// has the math, the shared helpers and the fp32 FMA bodies), for 16-bit
// inputs (f16, bf16), on nvcuda::wmma 16x16x16 fragments with fp32
// accumulation. Every chunk product runs on tensor cores:
//
//   prep: A = qh kh^T, num = qh S + A v, S += kh^T v
//   dq:   B = dnum v^T, dqh = dnum S^T + B kh, S += kh^T v (G exact in
//         T, the 1 / den of dnum = G / den applied to the fp32 products)
//   dk:   B = dnum v^T, dkh = v dS^T + B^T qh, dS += qh^T dnum
//   dv:   A = qh kh^T, dv = kh dS + A^T dnum, dS += qh^T dnum
//   dkv:  dk and dv in one reverse walk over the whole dS (small heads),
//         on qn = qh / den and G: B' = G v^T - (G . o), dkh = v dS^T +
//         B'^T qn, dv = kh dS + (qn kh^T)^T G, dS += qn^T G
//   prepdq: prep and dq in one forward walk over the whole S, with S and
//         B' split into hi + lo 16-bit halves (docs/kernels.md, "16-bit
//         roundings: backward")
//
// Global tensors are of the input type In and shared tiles of the tile type
// T (the same but for f16 inputs on bf16 tiles, see `prep` below).
// Operands are staged in shared memory as T, zero-padded to multiples of 16
// (D, M, the chunk C and the state tile, so any D, M in 1..=256 works); row
// strides are padded by 8 elements (16-bit) or 4 (fp32) against bank
// conflicts, which keeps every wmma pointer 32-byte aligned and every ldm a
// multiple of 8 / 4. The state slice stays fp32 in shared memory and is
// updated by accumulator fragments loaded from and stored back to it; where
// it (or dnum, A, B) feeds a product it is rounded to T. For __half each
// 16x16 tile of such a rounded operand carries its own power-of-two scale
// (largest magnitude brought into [2^14, 2^15)), undone on the fp32 partial
// product of that tile with element-wise fragment ops: a state that grows
// with N, or a dnum = G / den that shrinks with it, neither overflows nor
// falls into f16 subnormals. bf16 has fp32's range and is never scaled.
//
// Fixed tile order everywhere (one warp per output tile, k-tiles in
// increasing order), no atomics: bit-identical run to run.
//
// Shared memory: each buffer starts on a 128-byte boundary, in the order
// listed at each body (mirrors `carve` and the *_mma_bytes functions in
// crates/kernels/src/ops/backward/tiling.rs).
#pragma once
#include <mma.h>
#include <type_traits>
#include "linattn/backward_walk.cuh"
#include "linattn/mma_tile.cuh"

namespace linattn {
namespace bwd {

__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// dst[r][c] (row stride ld) = value(r, c) rounded to T for r < rows and
// c < cols, zero elsewhere in R16 x C16.
template <typename T, typename F>
__device__ __forceinline__ void stage(T* dst, int ld, int R16, int C16, int rows, int cols, F value) {
    for (int i = threadIdx.x; i < R16 * C16; i += blockDim.x) {
        const int r = i / C16, c = i - r * C16;
        dst[r * ld + c] = from_float<T>(r < rows && c < cols ? value(r, c) : 0.0f);
    }
}

// One chunk's rows of an input: rows t0 .. t0 + rows, `cols` wide, row
// stride `stride` from `base`.
template <typename In>
struct ChunkRows {
    const In* base;
    int64_t stride, t0;
    int rows, cols;
};

// The chunk's rows into a C16 x W16 tile (row stride ld): their high halves
// in T, or with `lo` their low halves x - hi(x). For f16 inputs on bf16
// tiles the two are exact: f16's 11 significant bits in two bf16 halves
// (hi 8, lo <= 4; f16's smallest subnormal is a bf16 normal).
template <typename T, typename In>
__device__ __forceinline__ void stage_halves(T* dst, int ld, int C16, int W16, const ChunkRows<In>& r, bool lo) {
    stage<T>(dst, ld, C16, W16, r.rows, r.cols, [&](int j, int e) {
        const float x = to_float(r.base[(r.t0 + j) * r.stride + e]);
        // inf - inf would put NaN where the input holds inf: lo is 0 there
        // (x - x is 0 exactly for every finite x; no fast-math here).
        return lo ? (x - x == 0.0f ? x - to_float(from_float<T>(x)) : 0.0f) : x;
    });
}


// The power of two that brings a warp's largest magnitude mx (its lanes'
// maxima) into [2^14, 2^15) (pow2_shift, linattn/scaled_round.cuh); inv =
// its inverse. Every mx > 0 is scaled, an overflowed one (inf, > 3e38) by
// the clamp's 2^-100 (the forward's publish_tile leaves those unscaled:
// see there).
__device__ __forceinline__ float tile_pow2(float mx, float& inv) {
    mx = warp_max(mx);
    const int e = mx > 0.0f ? pow2_shift(mx, kTileTop) : 0;
    inv = pow2(e);
    return pow2(-e);
}

// One warp rounds the 16 x 16 fp32 tile value(r, c) (r, c < 16) to T at dst
// (row stride ld). For __half the tile is multiplied by 2^k (largest
// magnitude into [2^14, 2^15)) and lane 0 writes *inv = 2^-k; for bf16 the
// values are rounded as they are and inv is unused.
template <typename T, typename F>
__device__ __forceinline__ void round_tile(T* dst, int ld, float* inv, F value) {
    const int lane = threadIdx.x & 31;
    float v[8];
    float mx = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int idx = lane + 32 * i;
        v[i] = value(idx >> 4, idx & 15);
        mx = fmaxf(mx, fabsf(v[i]));
    }
    float s = 1.0f;
    if constexpr (Mma<T>::scaled) {
        float si;
        s = tile_pow2(mx, si);
        if (lane == 0) *inv = si;
    } else {
        (void)inv;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int idx = lane + 32 * i;
        dst[(idx >> 4) * ld + (idx & 15)] = from_float<T>(v[i] * s);
    }
}

// Rounds the R16 x C16 fp32 matrix value(r, c) to T into dst (row stride
// ld), one warp per 16 x 16 tile (round_tile); the inverse scale of tile
// t = tr * (C16 / 16) + tc goes to inv[t] (f16 only).
template <typename T, typename F>
__device__ __forceinline__ void round_tiles(T* dst, int ld, int R16, int C16, float* inv, F value) {
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int tc = C16 >> 4, tiles = (R16 >> 4) * tc;
    for (int t = warp; t < tiles; t += nwarps) {
        const int r0 = (t / tc) * 16, c0 = (t - (t / tc) * tc) * 16;
        round_tile<T>(dst + r0 * ld + c0, ld, inv + t, [&](int r, int c) { return value(r0 + r, c0 + c); });
    }
}

// round_tile's low half: x - hi(x) (exact in fp32), hi(x) being what
// round_tile stores for the same tile, rounded to T with its own tile
// scale (lane 0 writes its inverse to *inv, f16 only). hi + lo carries x to
// ~2^-17 (bf16) relative where hi alone carries 2^-9.
template <typename T, typename F>
__device__ __forceinline__ void round_tile_lo(T* dst, int ld, float* inv, F value) {
    // value is recomputed where it is used rather than held (registers).
    const int lane = threadIdx.x & 31;
    float mx = 0.0f;
#pragma unroll 1
    for (int i = 0; i < 8; ++i) {
        const int idx = lane + 32 * i;
        mx = fmaxf(mx, fabsf(value(idx >> 4, idx & 15)));
    }
    float s = 1.0f, si = 1.0f;
    if constexpr (Mma<T>::scaled) s = tile_pow2(mx, si);
    const float shi = s, sihi = si;
    const auto lo = [&](int idx) {
        const float x = value(idx >> 4, idx & 15);
        return x - to_float(from_float<T>(x * shi)) * sihi;
    };
    mx = 0.0f;
#pragma unroll 1
    for (int i = 0; i < 8; ++i) mx = fmaxf(mx, fabsf(lo(lane + 32 * i)));
    s = 1.0f;
    if constexpr (Mma<T>::scaled) {
        s = tile_pow2(mx, si);
        if (lane == 0) *inv = si;
    } else {
        (void)inv;
    }
#pragma unroll 1
    for (int i = 0; i < 8; ++i) {
        const int idx = lane + 32 * i;
        dst[(idx >> 4) * ld + (idx & 15)] = from_float<T>(lo(idx) * s);
    }
}

// round_tiles with round_tile_lo: the low halves of the same tiles.
template <typename T, typename F>
__device__ __forceinline__ void round_tiles_lo(T* dst, int ld, int R16, int C16, float* inv, F value) {
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int tc = C16 >> 4, tiles = (R16 >> 4) * tc;
    for (int t = warp; t < tiles; t += nwarps) {
        const int r0 = (t / tc) * 16, c0 = (t - (t / tc) * tc) * 16;
        round_tile_lo<T>(dst + r0 * ld + c0, ld, inv + t, [&](int r, int c) { return value(r0 + r, c0 + c); });
    }
}

// Which k-tiles an output row-tile r sums over.
enum class KRange { All, UpToRow, FromRow };

// A scale table for one operand of gemm: the inverse scale of tile (i, j)
// of the operand as stored is at inv[i * si + j * sj] (nullptr: unscaled).
// mul: a power of two on every tile (1 in every pass now: the passes that
// staged s phi(q) with a factor 2^k pulled out stage phi(q) and apply s in
// fp32).
struct Scales {
    const float* inv;
    int si;
    int sj;
    float mul;
};

// out (fp32, row stride ldo), tiles (r, c) in RT x CT:
//   out = [out +] sum_k opA(r, k) opB(k, c)
// ARow: A is stored row-major with tile (r, k) at A + r*16*lda + k*16;
// otherwise A^T is stored (tile (k, r) row-major, read as col_major).
// BRow: B row-major, tile (k, c) at B + k*16*ldb + c*16; otherwise B^T is
// stored (tile (c, k) row-major, read as col_major). sa / sb are indexed by
// the stored tile's (row, column). lower_only skips tiles with c > r.
// One warp per output tile in the order t = r * CT + c, so two calls with
// the same RT x CT give each tile to the same warp (callers accumulating
// into a tile written by the previous call only need __syncwarp).
template <typename T, bool ARow, bool BRow>
__device__ __forceinline__ void gemm(float* out, int ldo, int RT, int CT, int KT, bool accumulate, bool lower_only,
                                     KRange kr, const T* A, int lda, Scales sa, const T* B, int ldb, Scales sb) {
    using namespace nvcuda;
    using LA = typename std::conditional<ARow, wmma::row_major, wmma::col_major>::type;
    using LB = typename std::conditional<BRow, wmma::row_major, wmma::col_major>::type;
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int t = warp; t < RT * CT; t += nwarps) {
        const int r = t / CT, c = t - r * CT;
        if (lower_only && c > r) continue;
        float* o = out + r * 16 * ldo + c * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        if (accumulate) {
            wmma::load_matrix_sync(acc, o, ldo, wmma::mem_row_major);
        } else {
            wmma::fill_fragment(acc, 0.0f);
        }
        const int k0 = kr == KRange::FromRow ? r : 0;
        const int k1 = kr == KRange::UpToRow ? imin(r + 1, KT) : KT;
        // Not unrolled: keeps the fragments of one k-step live, not several.
#pragma unroll 1
        for (int k = k0; k < k1; ++k) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
            wmma::load_matrix_sync(a, ARow ? A + r * 16 * lda + k * 16 : A + k * 16 * lda + r * 16, lda);
            wmma::load_matrix_sync(b, BRow ? B + k * 16 * ldb + c * 16 : B + c * 16 * ldb + k * 16, ldb);
            float f = sa.mul * sb.mul;
            if constexpr (Mma<T>::scaled) {
                if (sa.inv != nullptr) f *= ARow ? sa.inv[r * sa.si + k * sa.sj] : sa.inv[k * sa.si + r * sa.sj];
                if (sb.inv != nullptr) f *= BRow ? sb.inv[k * sb.si + c * sb.sj] : sb.inv[c * sb.si + k * sb.sj];
            }
            mma_scaled<T>(acc, a, b, f);
        }
        wmma::store_matrix_sync(o, acc, ldo, wmma::mem_row_major);
    }
}

// den_j (1 without normalisation) and d den_j (0 without; skipped when dd is
// null) for the C rows of a chunk; rows >= `rows` get 1 and 0.
__device__ __forceinline__ void load_norm(const LinattnBackwardParams& p, const Coords& c, int64_t t0, int rows,
                                          int C, float* den, float* dd) {
    const float* wden = ptr<const float>(p.work_den);
    const float* wdden = ptr<const float>(p.work_dden);
    const int64_t nrows = work_rows(p);
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        float dn = 1.0f, d2 = 0.0f;
        if (j < rows && p.normalize != 0) {
            const int64_t row = work_row(p, c, t0 + j);
            float go = 0.0f;
            // Not unrolled: the merged walk holds dS in registers around this.
#pragma unroll 1
            for (int t = 0; t < p.prep_tiles; ++t) go += wdden[t * nrows + row];
            dn = wden[row];
            d2 = -__fdividef(__fdividef(go, dn), dn);
        }
        den[j] = dn;
        if (dd != nullptr) dd[j] = d2;
    }
}

// f16, relu, normalised (the eps rows of dkv_mma, dqk_mma<T, true> and
// dv_mma): dead[x] = 1 for the features x < D of the rows at kb where no
// token in [t0, t0 + len) has k_x > 0 (relu: phi(k_x) = phi'(k_x) = 0
// there), else 0. A dS row x with dead[x] = 1 meets only zeros in those
// tokens' dk and dv, so its 16-bit copy for them may be zero exactly; and
// every feature an eps row's qn = qh / eps touches is dead for every token
// up to that row (causal) or in the sequence (non-causal). A thread per
// feature, stopping at its first positive key. Sync before use.
template <typename T>
__device__ __forceinline__ void dead_features(float* dead, const T* kb, int64_t stride, int64_t t0, int64_t len,
                                              int D) {
    for (int x = threadIdx.x; x < D; x += blockDim.x) {
        const T* k = kb + t0 * stride + x;
        float d = 1.0f;
#pragma unroll 1
        for (int64_t j = 0; j < len; ++j, k += stride) {
            if (to_float(*k) > 0.0f) {
                d = 0.0f;
                break;
            }
        }
        dead[x] = d;
    }
}

// No scale table (an operand staged straight from the inputs).
__device__ __forceinline__ Scales no_scales() { return Scales{nullptr, 0, 0, 1.0f}; }

// out (fp32, C x C, lower block triangle, row stride ldo) += G_hi v_lo^T +
// G_lo v_hi^T: the cross terms of G v^T with G and v as hi + lo halves
// (G_lo v_lo^T, below 2^-16 of the product, is dropped). G16 holds G_hi
// and V16 v_hi on entry (C x M16, row stride L16); on return G16 holds
// G_lo and V16 v_hi. Starts with a barrier (every warp's earlier reads of
// G16 and V16 are complete before they are restaged); ends after its last
// product with none: the caller orders what follows.
template <typename T, typename In>
__device__ __forceinline__ void add_gv_cross_terms(float* out, int ldo, int CT, int MTT, T* G16, T* V16, int L16,
                                                   const ChunkRows<In>& g, const ChunkRows<In>& v) {
    const int C = CT * 16, M16 = MTT * 16;
    __syncthreads();
    stage_halves<T>(V16, L16, C, M16, v, true);
    __syncthreads();
    gemm<T, true, false>(out, ldo, CT, CT, MTT, true, true, KRange::All, G16, L16, no_scales(), V16, L16, no_scales());
    __syncthreads();
    stage_halves<T>(G16, L16, C, M16, g, true);
    stage_halves<T>(V16, L16, C, M16, v, false);
    __syncthreads();
    gemm<T, true, false>(out, ldo, CT, CT, MTT, true, true, KRange::All, G16, L16, no_scales(), V16, L16, no_scales());
}

// What dv_chunk works on: one chunk's staged operands in shared memory,
// their tile scales, and where its dv rows go (the style of the params
// structs: named fields, set at the call).
template <typename T, typename Out = T>
struct DvChunk {
    float* F;         // fp32 work tile, C x (>= max(C, MT)) with row stride LF
    int LF;
    int CT, MTT, DTT;  // 16-tiles of the chunk C, the value tile MT and D16
    bool causal;
    int rows, cols;   // valid rows (tokens) and columns written
    const T* Q16;     // qh (C x D16, row stride LD) and its scales
    Scales sq;
    const T* K16;     // kh (C x D16, row stride LD)
    int LD;
    T* A16;           // A = qh kh^T rounded here (C x C, row stride LC)
    int LC;
    float* sA;        // A16's tile scales (written here, f16)
    const T* S16;     // dS rounded (D16 x MT, row stride L16) and its scales
    int L16;
    const float* sS;
    const T* G16;     // dnum rounded (C x MT, row stride L16) and its scales
    const float* sG;
    Out* out;         // the chunk's first dv row, row stride `stride`
    int64_t stride;
    const T* G16lo = nullptr;  // G16's low half (unscaled), or none
    // S16's low half (unscaled, D16 = 16 rows of stride L16) in the tile
    // after K16 (the next 128-byte boundary past C x LD: dkv's V16), or none.
    // Rematerialised from K16 rather than held (registers).
    bool s_lo_after_k = false;
};

// One chunk's dv, shared by dv_mma and dkv_mma: F = kh dS (+ A^T dnum over
// i >= j when causal, with A = qh kh^T, lower block triangle, rounded into
// A16), then rows x cols of it written to `out`. Ends with F read out.
template <typename T, typename Out = T>
__device__ __forceinline__ void dv_chunk(const DvChunk<T, Out>& a) {
    float* F = a.F;
    const int LF = a.LF, CT = a.CT, MTT = a.MTT, DTT = a.DTT, rows = a.rows, cols = a.cols;
    const bool causal = a.causal;
    const T *Q16 = a.Q16, *K16 = a.K16, *S16 = a.S16, *G16 = a.G16;
    const int LD = a.LD, LC = a.LC, L16 = a.L16;
    const Scales sq = a.sq;
    T* A16 = a.A16;
    float* sA = a.sA;
    const float *sS = a.sS, *sG = a.sG;
    Out* out = a.out;
    const int64_t stride = a.stride;
    const int C = CT * 16;
    if (causal) {
        gemm<T, true, false>(F, LF, CT, CT, DTT, false, true, KRange::All, Q16, LD, sq, K16, LD, no_scales());
        __syncthreads();
        round_tiles<T>(A16, LC, C, C, sA, [&](int i, int j) { return j <= i && i < rows ? F[i * LF + j] : 0.0f; });
        __syncthreads();
    }
    // dv = kh dS + A^T dnum (i >= j)
    gemm<T, true, true>(F, LF, CT, MTT, DTT, false, false, KRange::All, K16, LD, no_scales(), S16, L16,
                        Scales{sS, MTT, 1, 1.0f});
    if (causal) {
        __syncwarp();
        gemm<T, false, true>(F, LF, CT, MTT, CT, true, false, KRange::FromRow, A16, LC, Scales{sA, CT, 1, 1.0f}, G16, L16,
                             Scales{sG, MTT, 1, 1.0f});
        if (a.G16lo != nullptr)
            gemm<T, false, true>(F, LF, CT, MTT, CT, true, false, KRange::FromRow, A16, LC, Scales{sA, CT, 1, 1.0f},
                                 a.G16lo, L16, no_scales());
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
        const int j = i / cols, e = i - j * cols;
        float acc = F[j * LF + e];
        // + kh dS_lo in fp32 (one-tile heads: D16 FMAs per element).
        if (a.s_lo_after_k) {
            const T* lo = reinterpret_cast<const T*>(
                (reinterpret_cast<uintptr_t>(K16 + C * LD) + 127u) & ~static_cast<uintptr_t>(127u));
#pragma unroll 1
            for (int x = 0; x < 16; ++x) acc = fmaf(to_float(K16[j * LD + x]), to_float(lo[x * L16 + e]), acc);
        }
        out[j * stride + e] = from_float<Out>(acc);
    }
}

// ---------------------------------------------------------------------------
// prep on tensor cores; blocks tile M (tile MT, a multiple of 16). Each
// block writes its M tile's part of G . num (summed over tiles by
// load_norm) and, on tile 0, den. num is never formed (prepdq's
// formulation, prep_dq_mma): with A = qh kh^T and E = G v^T in fp32 and
// H = G S^T (C x D16, all of D; S split into S_hi + S_lo) over the tile,
//   G . num = qh . H + rowsum(A o E),   den = qh . z + rowsum(A) + eps,
// qh staged as phi(q) and s applied to the fp32 sums. A 16-bit copy of S
// or A in num cost ~mu 2^-9 of dq through d den (bf16 dq 9.3e-2 at q, k ~
// N(40, 1), D = M = 256).
// Shared: S (D16 x MT+4, fp32) | z (D16) | S16 (D16 x MT+8: S_hi, S_lo in
//         turn) | qh, kh (C x D16+8 each) | v, G (C x MT+8 each) | F (C x
//         max(C,D16)+4, fp32: A, then H) | E (C x C+4, fp32) | qh . z,
//         rowsum(A), rowsum(A o E) (C each) | scales of S16
//         ((D16/16)(MT/16)) and G ((C/16)(MT/16)).
template <typename In, typename T = In>
__device__ __forceinline__ void prep_mma(const LinattnBackwardParams& p, float* smem) {
    const Coords c = coords(p);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
    const int D = (int)p.d, M = (int)p.m, C = p.chunk, D16 = pad16(D);
    const int MT = p.tile, m0 = c.tile * MT, mt = imin(M - m0, MT);
    const int LS = MT + 4, L16 = MT + 8, LD = D16 + 8, LF = imax(C, D16) + 4, LE = C + 4;
    const int CT = C / 16, MTT = MT / 16, DTT = D16 / 16;
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    Carve cv{reinterpret_cast<char*>(smem), 0u};
    float* Ss = cv.take<float>(D16 * LS);
    float* zs = cv.take<float>(D16);
    T* S16 = cv.take<T>(D16 * L16);
    T* Q16 = cv.take<T>(C * LD);
    T* K16 = cv.take<T>(C * LD);
    T* V16 = cv.take<T>(C * L16);
    T* G16 = cv.take<T>(C * L16);
    float* F = cv.take<float>(C * LF);
    float* E = cv.take<float>(C * LE);
    float* qz = cv.take<float>(C);
    float* asum = cv.take<float>(C);
    float* ag = cv.take<float>(C);
    float* sS = cv.take<float>(DTT * MTT);
    float* sG = cv.take<float>(CT * MTT);
    const float* s_in = ptr<const float>(p.state_in_s);
    for (int i = tid; i < D16 * MT; i += nthreads) {
        const int x = i / MT, e = i - x * MT;
        Ss[x * LS + e] = s_in != nullptr && x < D && e < mt ? s_in[(c.sh * D + x) * M + m0 + e] : 0.0f;
    }
    for (int x = tid; x < D16; x += nthreads)
        zs[x] = p.state_in_z != 0 && x < D ? ptr<const float>(p.state_in_z)[c.sh * D + x] : 0.0f;
    const In* qb = rows_of<In>(p.q, c, p.q_batch_stride, p.q_head_stride);
    const In* kb = rows_of<In>(p.k, c, p.k_batch_stride, p.k_head_stride);
    const In* vb = rows_of<In>(p.v, c, p.v_batch_stride, p.v_head_stride) + m0;
    const In* gb = rows_of<In>(p.d_o, c, p.o_batch_stride, p.o_head_stride) + m0;
    float* wden = ptr<float>(p.work_den);
    float* wgo = ptr<float>(p.work_dden) + (int64_t)c.tile * work_rows(p);
    __syncthreads();

    for (int sweep = causal ? 1 : 0; sweep < 2; ++sweep) {
        const bool absorb = causal || sweep == 0;
        const bool emit = sweep == 1;
        for (int64_t c0 = 0; c0 < c.r.len; c0 += C) {
            const int rows = (int)(c.r.len - c0 < C ? c.r.len - c0 : C);
            const int64_t t0 = c.r.start + c0;
            if (emit) {
                // phi(q) without the scale (s multiplies the fp32 sums) and
                // G itself (exact in T); S_hi every chunk (S16 ends the
                // chunk holding S_lo).
                stage<T>(Q16, LD, C, D16, rows, D,
                         [&](int j, int x) { return phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm); });
                round_tiles<T>(G16, L16, C, MT, sG, [&](int j, int e) {
                    return j < rows && e < mt ? to_float(gb[(t0 + j) * p.o_token_stride + e]) : 0.0f;
                });
                round_tiles<T>(S16, L16, D16, MT, sS, [&](int x, int e) { return Ss[x * LS + e]; });
            }
            if (absorb) {
                stage<T>(K16, LD, C, D16, rows, D,
                         [&](int j, int x) { return phi(to_float(kb[(t0 + j) * p.k_token_stride + x]), fm); });
                stage<T>(V16, L16, C, MT, rows, mt,
                         [&](int j, int e) { return to_float(vb[(t0 + j) * p.v_token_stride + e]); });
            }
            __syncthreads();
            if (emit) {
                for (int i = tid; i < C; i += nthreads) {
                    const T* q = Q16 + i * LD;
                    float a = 0.0f;
                    for (int x = 0; x < D; ++x) a = fmaf(to_float(q[x]), zs[x], a);
                    qz[i] = a * p.scale;
                    asum[i] = 0.0f;
                    ag[i] = 0.0f;
                }
                if (causal) {
                    // A = qh kh^T, E = G v^T (lower block triangle, fp32).
                    gemm<T, true, false>(F, LF, CT, CT, DTT, false, true, KRange::All, Q16, LD, no_scales(), K16, LD,
                                         no_scales());
                    gemm<T, true, false>(E, LE, CT, CT, MTT, false, true, KRange::All, G16, L16,
                                         Scales{sG, MTT, 1, 1.0f}, V16, L16, no_scales());
                    __syncthreads();
                    for (int i = tid; i < rows; i += nthreads) {
                        float s = 0.0f, g = 0.0f;
                        for (int j = 0; j <= i; ++j) {
                            s += F[i * LF + j];
                            g = fmaf(F[i * LF + j], E[i * LE + j], g);
                        }
                        asum[i] = s * p.scale;
                        ag[i] = g * p.scale;
                    }
                    __syncthreads();
                }
                // H = G S_hi^T + G S_lo^T (C x D16; S_hi alone with
                // LINATTN_DQ_SINGLE)
                gemm<T, true, false>(F, LF, CT, DTT, MTT, false, false, KRange::All, G16, L16, Scales{sG, MTT, 1, 1.0f},
                                     S16, L16, Scales{sS, MTT, 1, 1.0f});
                __syncthreads();
                if (p.dq_precision == LINATTN_DQ_SPLIT) {
                    round_tiles_lo<T>(S16, L16, D16, MT, sS, [&](int x, int e) { return Ss[x * LS + e]; });
                    __syncthreads();
                    gemm<T, true, false>(F, LF, CT, DTT, MTT, true, false, KRange::All, G16, L16,
                                         Scales{sG, MTT, 1, 1.0f}, S16, L16, Scales{sS, MTT, 1, 1.0f});
                    __syncthreads();
                }
                for (int i = warp; i < rows; i += nwarps) {
                    const T* q = Q16 + i * LD;
                    float go = 0.0f;
                    for (int x = lane; x < D; x += 32) go = fmaf(to_float(q[x]), F[i * LF + x], go);
                    go = warp_sum(go) * p.scale;
                    if (lane == 0) {
                        const int64_t row = work_row(p, c, t0 + i);
                        wgo[row] = go + ag[i];
                        if (c.tile == 0) wden[row] = qz[i] + asum[i] + p.eps;
                    }
                }
            }
            if (absorb) {
                // F, qz and the row sums are not touched here; S16 is a
                // copy of S.
                gemm<T, false, true>(Ss, LS, DTT, MTT, CT, true, false, KRange::All, K16, LD, no_scales(), V16, L16,
                                     no_scales());
                for (int x = tid; x < D; x += nthreads) {
                    float acc = zs[x];
                    for (int j = 0; j < rows; ++j) acc += to_float(K16[j * LD + x]);
                    zs[x] = acc;
                }
            }
            __syncthreads();
        }
    }
}

// ---------------------------------------------------------------------------
// dq (forward walk) and dk (reverse walk) on tensor cores; blocks tile D
// (tile DT, a multiple of 16). kDk selects dk. Both stage G itself and
// round B' = G v^T + d den den = den B; dq divides its fp32 rows by den,
// dk stages qn = qh / den (the dkv walk's formulation, dkv_mma). dq splits
// S and B' into hi + lo 16-bit halves where they feed it, as prepdq does
// (G S_hi^T + G S_lo^T, B'_hi kh + B'_lo kh): its two parts cancel to ~1/mu
// of their size at q, k ~ N(mu, 1) (docs/kernels.md, "dq accuracy").
// Shared: S or dS rows (DT x M16+4, fp32) | z or dz (DT) | S16 (DT x M16+8;
//         dq: S_hi, S_lo in turn) | X16 (C x DT+8: kh for dq, qn for dk) |
//         v (C x M16+8) | G (C x M16+8) | B16 (C x C+8) | F (C x
//         max(C,DT)+4, fp32: B, then the gradient rows) | den (C) | d den
//         (C) | scales of S16 ((DT/16)(M16/16)), G ((C/16)(M16/16)), B16
//         ((C/16)^2) and qn ((C/16)(DT/16), dk) | B'_lo (C x C+8, dq) and
//         its scales ((C/16)^2).
template <typename In, typename T, bool kDk>
__device__ __forceinline__ void dqk_mma(const LinattnBackwardParams& p, float* smem) {
    const Coords c = coords(p);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int D = (int)p.d, M = (int)p.m, C = p.chunk, M16 = pad16(M);
    const int DT = p.tile, d0 = c.tile * DT, dt = imin(D - d0, DT);
    const int LS = M16 + 4, L16 = M16 + 8, LX = DT + 8, LC = C + 8, LF = imax(C, DT) + 4;
    const int CT = C / 16, MTT = M16 / 16, DTT = DT / 16;
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    const bool split = p.dq_precision == LINATTN_DQ_SPLIT;  // dq: S and B' as hi + lo
    // dk, f16, relu, normalised: rows whose den is eps alone, as in dkv_mma
    // (qn staged as zero for the chunk's products and absorbed alone; dS16
    // rows of features dead for the chunk's keys copied as zeros, F holding
    // the flags while dS16 is rounded).
    const bool eps_rows = kDk && Mma<T>::scaled && fm == LINATTN_FEATURE_MAP_RELU && p.normalize != 0;
    Carve cv{reinterpret_cast<char*>(smem), 0u};
    float* Ss = cv.take<float>(DT * LS);
    float* zs = cv.take<float>(DT);
    T* S16 = cv.take<T>(DT * L16);
    T* X16 = cv.take<T>(C * LX);
    T* V16 = cv.take<T>(C * L16);
    T* G16 = cv.take<T>(C * L16);
    T* B16 = cv.take<T>(C * LC);
    float* F = cv.take<float>(C * LF);
    float* den = cv.take<float>(C);
    float* dd = cv.take<float>(C);
    float* sS = cv.take<float>(DTT * MTT);
    float* sG = cv.take<float>(CT * MTT);
    float* sB = cv.take<float>(CT * CT);
    float* sX = cv.take<float>(CT * DTT);  // dk: qn's tile scales
    T* B16lo = cv.take<T>(C * LC);         // dq: B'_lo
    float* sBl = cv.take<float>(CT * CT);
    const float* s_in = ptr<const float>(kDk ? p.d_final_s : p.state_in_s);
    const float* z_in = ptr<const float>(kDk ? p.d_final_z : p.state_in_z);
    for (int i = tid; i < DT * M16; i += nthreads) {
        const int x = i / M16, e = i - x * M16;
        Ss[x * LS + e] = s_in != nullptr && x < dt && e < M ? s_in[(c.sh * D + d0 + x) * M + e] : 0.0f;
    }
    for (int x = tid; x < DT; x += nthreads) zs[x] = z_in != nullptr && x < dt ? z_in[c.sh * D + d0 + x] : 0.0f;
    const In* qb = rows_of<In>(p.q, c, p.q_batch_stride, p.q_head_stride) + d0;
    const In* kb = rows_of<In>(p.k, c, p.k_batch_stride, p.k_head_stride) + d0;
    const In* vb = rows_of<In>(p.v, c, p.v_batch_stride, p.v_head_stride);
    const In* gb = rows_of<In>(p.d_o, c, p.o_batch_stride, p.o_head_stride);
    In* outb = kDk ? rows_of_mut<In>(p.dk, c, p.k_batch_stride, p.k_head_stride) + d0
                  : rows_of_mut<In>(p.dq, c, p.q_batch_stride, p.q_head_stride) + d0;
    const int64_t xstride = kDk ? p.q_token_stride : p.k_token_stride;  // rows of X16's source
    const In* xb = kDk ? qb : kb;
    __syncthreads();

    const int64_t last = last_chunk(c.r.len, C);
    for (int sweep = causal ? 1 : 0; sweep < 2; ++sweep) {
        const bool absorb = causal || sweep == 0;
        const bool emit = sweep == 1;
        // dq needs dnum to emit, dk to absorb; v the other way round.
        const bool need_g = kDk ? absorb : emit;
        const bool need_v = kDk ? emit : absorb;
        for (int64_t c0 = kDk ? last : 0; kDk ? c0 >= 0 : c0 < c.r.len; c0 += kDk ? -C : C) {
            const int rows = (int)(c.r.len - c0 < C ? c.r.len - c0 : C);
            const int64_t t0 = c.r.start + c0;
            if (!kDk && absorb) {
                stage<T>(X16, LX, C, DT, rows, dt,
                         [&](int j, int x) { return phi(to_float(xb[(t0 + j) * xstride + x]), fm); });
            }
            if (need_v || (emit && causal)) {
                stage<T>(V16, L16, C, M16, rows, M,
                         [&](int j, int e) { return to_float(vb[(t0 + j) * p.v_token_stride + e]); });
            }
            if (need_g || (emit && causal)) load_norm(p, c, t0, rows, C, den, dd);
            // dq: S_hi every chunk (S16 ends a split emit holding S_lo).
            if (emit && (causal || !kDk || c0 == last)) {
                if (eps_rows) {
                    dead_features<In>(F, kb, p.k_token_stride, causal ? t0 : c.r.start, causal ? rows : c.r.len, dt);
                    __syncthreads();
                }
                round_tiles<T>(S16, L16, DT, M16, sS,
                               [&](int x, int e) { return eps_rows && F[x] != 0.0f ? 0.0f : Ss[x * LS + e]; });
            }
            __syncthreads();
            if (need_g || (emit && causal)) {
                // G itself, exact in T. dq: every product it feeds has the
                // token on its rows, so 1 / den is applied to the fp32
                // results. dk: the 1 / den goes with the query, qn = qh /
                // den (per-tile scaled, bounded for every row): a dnum
                // staged instead puts 1 / eps into its f16 tile where a row
                // has den ~ eps (relu, qh = 0) and flushes the other rows.
                round_tiles<T>(G16, L16, C, M16, sG, [&](int j, int e) {
                    return j < rows && e < M ? to_float(gb[(t0 + j) * p.o_token_stride + e]) : 0.0f;
                });
                if (kDk && absorb) {
                    round_tiles<T>(X16, LX, C, DT, sX, [&](int j, int x) {
                        return j < rows && x < dt && !(eps_rows && den[j] == p.eps)
                                   ? __fdividef(phi(to_float(xb[(t0 + j) * xstride + x]), fm) * p.scale, den[j])
                                   : 0.0f;
                    });
                }
                __syncthreads();
            }
            if (emit) {
                if (causal) {
                    // B' = G v^T + d den den = G . (v_j - o_i) (den times the
                    // B of the formulas), lower block triangle.
                    gemm<T, true, false>(F, LF, CT, CT, MTT, false, true, KRange::All, G16, L16, Scales{sG, MTT, 1, 1.0f},
                                         V16, L16, no_scales());
                    __syncthreads();
                    const auto bval = [&](int i, int j) {
                        return j > i || i >= rows ? 0.0f : fmaf(dd[i], den[i], F[i * LF + j]);
                    };
                    round_tiles<T>(B16, LC, C, C, sB, bval);
                    if (!kDk && split) round_tiles_lo<T>(B16lo, LC, C, C, sBl, bval);
                    __syncthreads();
                }
                if constexpr (kDk) {
                    // dkh = v dS^T + B'^T qn (i >= j)
                    gemm<T, true, false>(F, LF, CT, DTT, MTT, false, false, KRange::All, V16, L16, no_scales(), S16, L16,
                                         Scales{sS, MTT, 1, 1.0f});
                    if (causal) {
                        __syncwarp();
                        gemm<T, false, true>(F, LF, CT, DTT, CT, true, false, KRange::FromRow, B16, LC,
                                             Scales{sB, CT, 1, 1.0f}, X16, LX, Scales{sX, DTT, 1, 1.0f});
                    }
                } else {
                    // dqh = (G S_hi^T + G S_lo^T + B'_hi kh + B'_lo kh) / den
                    // (j <= i)
                    gemm<T, true, false>(F, LF, CT, DTT, MTT, false, false, KRange::All, G16, L16, Scales{sG, MTT, 1, 1.0f},
                                         S16, L16, Scales{sS, MTT, 1, 1.0f});
                    if (split) {
                        __syncthreads();
                        round_tiles_lo<T>(S16, L16, DT, M16, sS, [&](int x, int e) { return Ss[x * LS + e]; });
                        __syncthreads();
                        gemm<T, true, false>(F, LF, CT, DTT, MTT, true, false, KRange::All, G16, L16,
                                             Scales{sG, MTT, 1, 1.0f}, S16, L16, Scales{sS, MTT, 1, 1.0f});
                    }
                    if (causal) {
                        __syncwarp();
                        gemm<T, true, true>(F, LF, CT, DTT, CT, true, false, KRange::UpToRow, B16, LC,
                                            Scales{sB, CT, 1, 1.0f}, X16, LX, no_scales());
                        if (split) {
                            __syncwarp();
                            gemm<T, true, true>(F, LF, CT, DTT, CT, true, false, KRange::UpToRow, B16lo, LC,
                                                Scales{sBl, CT, 1, 1.0f}, X16, LX, no_scales());
                        }
                    }
                    __syncthreads();
                    for (int i = tid; i < C * DT; i += nthreads) {
                        const int j = i / DT, x = i - j * DT;
                        F[j * LF + x] = __fdividef(F[j * LF + x], den[j]);
                    }
                }
                __syncthreads();
                for (int i = tid; i < rows * dt; i += nthreads) {
                    const int j = i / dt, x = i - j * dt;
                    if constexpr (kDk) {
                        const int64_t off = (t0 + j) * p.k_token_stride + x;
                        outb[off] = from_float<In>(phi_prime(to_float(kb[off]), fm) * (F[j * LF + x] + zs[x]));
                    } else {
                        const int64_t off = (t0 + j) * p.q_token_stride + x;
                        const float acc = fmaf(dd[j], zs[x], F[j * LF + x]);
                        outb[off] = from_float<In>(p.scale * phi_prime(to_float(qb[off]), fm) * acc);
                    }
                }
                if (causal) __syncthreads();  // z is read above, updated below
            }
            if (absorb) {
                if constexpr (kDk) {
                    // dS += qn^T G, dz += qh^T d den (qh in fp32, from the
                    // input)
                    gemm<T, false, true>(Ss, LS, DTT, MTT, CT, true, false, KRange::All, X16, LX,
                                         Scales{sX, DTT, 1, 1.0f}, G16, L16, Scales{sG, MTT, 1, 1.0f});
                    if (eps_rows) {
                        // The eps rows' qn^T G, from a staging of them alone.
                        int any = 0;
                        for (int j = tid; j < rows; j += nthreads) any |= den[j] == p.eps ? 1 : 0;
                        if (__syncthreads_or(any)) {
                            round_tiles<T>(X16, LX, C, DT, sX, [&](int j, int x) {
                                return j < rows && x < dt && den[j] == p.eps
                                           ? __fdividef(phi(to_float(xb[(t0 + j) * xstride + x]), fm) * p.scale, den[j])
                                           : 0.0f;
                            });
                            __syncthreads();
                            gemm<T, false, true>(Ss, LS, DTT, MTT, CT, true, false, KRange::All, X16, LX,
                                                 Scales{sX, DTT, 1, 1.0f}, G16, L16, Scales{sG, MTT, 1, 1.0f});
                        }
                    }
                    for (int x = tid; x < dt; x += nthreads) {
                        float acc = zs[x];
#pragma unroll 1
                        for (int j = 0; j < rows; ++j)
                            acc = fmaf(dd[j], phi(to_float(xb[(t0 + j) * xstride + x]), fm) * p.scale, acc);
                        zs[x] = acc;
                    }
                } else {
                    // S += kh^T v, z += kh^T 1
                    gemm<T, false, true>(Ss, LS, DTT, MTT, CT, true, false, KRange::All, X16, LX, no_scales(), V16, L16,
                                         no_scales());
                    for (int x = tid; x < dt; x += nthreads) {
                        float acc = zs[x];
                        for (int j = 0; j < rows; ++j) acc += to_float(X16[j * LX + x]);
                        zs[x] = acc;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (kDk) store_d_initial(p, c, d0, dt, Ss, LS, zs);
}

// ---------------------------------------------------------------------------
// dv on tensor cores (reverse walk); blocks tile M (tile MT, a multiple of 16).
// Stages qn = qh / den and G, as dkv_mma: A' = qn kh^T, dv = kh dS + A'^T G,
// dS += qn^T G.
// Shared: dS (D16 x MT+4, fp32) | S16 (D16 x MT+8) | qn, kh (C x D16+8
//         each) | G (C x MT+8) | A16 (C x C+8) | F (C x max(C,MT)+4,
//         fp32: A, then dv) | den (C) | scales of S16 ((D16/16)(MT/16)),
//         G ((C/16)(MT/16)), A16 ((C/16)^2) and qn ((C/16)(D16/16)).
template <typename In, typename T = In>
__device__ __forceinline__ void dv_mma(const LinattnBackwardParams& p, float* smem) {
    const Coords c = coords(p);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int D = (int)p.d, M = (int)p.m, C = p.chunk, D16 = pad16(D);
    const int MT = p.tile, m0 = c.tile * MT, mt = imin(M - m0, MT);
    const int LS = MT + 4, L16 = MT + 8, LD = D16 + 8, LC = C + 8, LF = imax(C, MT) + 4;
    const int CT = C / 16, MTT = MT / 16, DTT = D16 / 16;
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    Carve cv{reinterpret_cast<char*>(smem), 0u};
    float* Ss = cv.take<float>(D16 * LS);
    T* S16 = cv.take<T>(D16 * L16);
    T* Q16 = cv.take<T>(C * LD);
    T* K16 = cv.take<T>(C * LD);
    T* G16 = cv.take<T>(C * L16);
    T* A16 = cv.take<T>(C * LC);
    float* F = cv.take<float>(C * LF);
    float* den = cv.take<float>(C);
    float* sS = cv.take<float>(DTT * MTT);
    float* sG = cv.take<float>(CT * MTT);
    float* sA = cv.take<float>(CT * CT);
    float* sQ = cv.take<float>(CT * DTT);
    // f16, relu, normalised: eps rows as in dkv_mma (F holds the dead
    // flags while dS16 is rounded).
    const bool eps_rows = Mma<T>::scaled && fm == LINATTN_FEATURE_MAP_RELU && p.normalize != 0;
    const float* s_in = ptr<const float>(p.d_final_s);
    for (int i = tid; i < D16 * MT; i += nthreads) {
        const int x = i / MT, e = i - x * MT;
        Ss[x * LS + e] = s_in != nullptr && x < D && e < mt ? s_in[(c.sh * D + x) * M + m0 + e] : 0.0f;
    }
    const In* qb = rows_of<In>(p.q, c, p.q_batch_stride, p.q_head_stride);
    const In* kb = rows_of<In>(p.k, c, p.k_batch_stride, p.k_head_stride);
    const In* gb = rows_of<In>(p.d_o, c, p.o_batch_stride, p.o_head_stride) + m0;
    In* dvb = rows_of_mut<In>(p.dv, c, p.v_batch_stride, p.v_head_stride) + m0;
    __syncthreads();

    const int64_t last = last_chunk(c.r.len, C);
    for (int sweep = causal ? 1 : 0; sweep < 2; ++sweep) {
        const bool absorb = causal || sweep == 0;
        const bool emit = sweep == 1;
        for (int64_t c0 = last; c0 >= 0; c0 -= C) {
            const int rows = (int)(c.r.len - c0 < C ? c.r.len - c0 : C);
            const int64_t t0 = c.r.start + c0;
            if (absorb) load_norm(p, c, t0, rows, C, den, nullptr);
            if (emit) {
                stage<T>(K16, LD, C, D16, rows, D,
                         [&](int j, int x) { return phi(to_float(kb[(t0 + j) * p.k_token_stride + x]), fm); });
                if (causal || c0 == last) {
                    if (eps_rows) {
                        dead_features<In>(F, kb, p.k_token_stride, causal ? t0 : c.r.start, causal ? rows : c.r.len, D);
                        __syncthreads();
                    }
                    round_tiles<T>(S16, L16, D16, MT, sS,
                                   [&](int x, int e) { return eps_rows && F[x] != 0.0f ? 0.0f : Ss[x * LS + e]; });
                }
            }
            __syncthreads();
            if (absorb) {
                // G itself and qn = qh / den (dkv_mma's formulation: no
                // 1 / eps in an f16 tile where a row has den ~ eps).
                round_tiles<T>(G16, L16, C, MT, sG, [&](int j, int e) {
                    return j < rows && e < mt ? to_float(gb[(t0 + j) * p.o_token_stride + e]) : 0.0f;
                });
                round_tiles<T>(Q16, LD, C, D16, sQ, [&](int j, int x) {
                    return j < rows && x < D && !(eps_rows && den[j] == p.eps)
                               ? __fdividef(phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm) * p.scale, den[j])
                               : 0.0f;
                });
                __syncthreads();
            }
            if (emit) {
                DvChunk<T, In> a;
                a.F = F; a.LF = LF; a.CT = CT; a.MTT = MTT; a.DTT = DTT; a.causal = causal;
                a.rows = rows; a.cols = mt;
                a.Q16 = Q16; a.sq = Scales{sQ, DTT, 1, 1.0f}; a.K16 = K16; a.LD = LD;
                a.A16 = A16; a.LC = LC; a.sA = sA;
                a.S16 = S16; a.L16 = L16; a.sS = sS; a.G16 = G16; a.sG = sG;
                a.out = dvb + t0 * p.v_token_stride; a.stride = p.v_token_stride;
                dv_chunk<T, In>(a);
            }
            if (absorb) {
                // dS += qn^T G (F is not touched; S16 is a copy of dS), then
                // the eps rows' part from a staging of them alone.
                gemm<T, false, true>(Ss, LS, DTT, MTT, CT, true, false, KRange::All, Q16, LD, Scales{sQ, DTT, 1, 1.0f},
                                     G16, L16, Scales{sG, MTT, 1, 1.0f});
                if (eps_rows) {
                    int any = 0;
                    for (int j = tid; j < rows; j += nthreads) any |= den[j] == p.eps ? 1 : 0;
                    if (__syncthreads_or(any)) {
                        round_tiles<T>(Q16, LD, C, D16, sQ, [&](int j, int x) {
                            return j < rows && x < D && den[j] == p.eps
                                       ? __fdividef(phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm) * p.scale,
                                                    den[j])
                                       : 0.0f;
                        });
                        __syncthreads();
                        gemm<T, false, true>(Ss, LS, DTT, MTT, CT, true, false, KRange::All, Q16, LD,
                                             Scales{sQ, DTT, 1, 1.0f}, G16, L16, Scales{sG, MTT, 1, 1.0f});
                    }
                }
            }
            __syncthreads();
        }
    }
}

// ---------------------------------------------------------------------------
// A whole sequence-head state (D16 x M16, fp32) held in registers, for the
// walks where one block owns it (prep_dq_mma, dkv_mma): warp w keeps tiles
// t = w + k * nwarps (k < kDkvFrags) as accumulator fragments for the whole
// walk, updated in place; after each update the warps publish it as the
// 16-bit copy the next chunk's products read, each tile through a 16 x 16
// fp32 scratch of its warp's own. The plan's `dkv_threads` gives the block
// enough warps (256 or 512 threads for up to 32 or 64 tiles).
constexpr int kDkvFrags = 4;
using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

struct FragTiles {
    int tiles;  // (D16 / 16) * MTT
    int MTT;    // M16 / 16
    int warp;
    int nwarps;
    float* scratch;
    // Tile k of this warp: false past the state; (x0, e0) is its corner.
    __device__ __forceinline__ bool at(int k, int& t, int& x0, int& e0) const {
        t = warp + k * nwarps;
        if (t >= tiles) return false;
        x0 = (t / MTT) * 16;
        e0 = (t - (t / MTT) * MTT) * 16;
        return true;
    }
};

// The fragments from the fp32 D x M state at src (row-major; nullptr: zero).
__device__ __forceinline__ void frags_load(Acc (&st)[kDkvFrags], const FragTiles& ft, const float* src, int D, int M) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < kDkvFrags; ++k) {
        int t, x0, e0;
        nvcuda::wmma::fill_fragment(st[k], 0.0f);
        if (!ft.at(k, t, x0, e0) || src == nullptr) continue;
        for (int i = lane; i < 256; i += 32) {
            const int x = x0 + (i >> 4), e = e0 + (i & 15);
            ft.scratch[i] = x < D && e < M ? src[(int64_t)x * M + e] : 0.0f;
        }
        __syncwarp();
        nvcuda::wmma::load_matrix_sync(st[k], ft.scratch, 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
    }
}

// The 16-bit copy S16 (row stride L16) with tile scales sS (round_tiles'
// rounding and indexing); rows x with dead[x] != 0 are copied as zeros
// (dead: nullptr for none). The scratch and S16 must be free: sync first.
template <typename T>
__device__ __forceinline__ void frags_publish(const Acc (&st)[kDkvFrags], const FragTiles& ft, T* S16, int L16,
                                              float* sS, const float* dead = nullptr) {
#pragma unroll
    for (int k = 0; k < kDkvFrags; ++k) {
        int t, x0, e0;
        if (!ft.at(k, t, x0, e0)) continue;
        nvcuda::wmma::store_matrix_sync(ft.scratch, st[k], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
        round_tile<T>(S16 + x0 * L16 + e0, L16, sS + t, [&](int r, int col) {
            return dead != nullptr && dead[x0 + r] != 0.0f ? 0.0f : ft.scratch[r * 16 + col];
        });
        __syncwarp();
    }
}

// Each of this warp's state tiles through its scratch: f(x, e, value) for
// the tile's 256 elements (x, e: the state's row and column).
template <typename F>
__device__ __forceinline__ void frags_each(const Acc (&st)[kDkvFrags], const FragTiles& ft, F f) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < kDkvFrags; ++k) {
        int t, x0, e0;
        if (!ft.at(k, t, x0, e0)) continue;
        nvcuda::wmma::store_matrix_sync(ft.scratch, st[k], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
        for (int i = lane; i < 256; i += 32) f(x0 + (i >> 4), e0 + (i & 15), ft.scratch[i]);
        __syncwarp();
    }
}

// The fragments' low half, S - hi(S) (exact in fp32; hi as frags_publish
// rounds it on unscaled tiles), rounded to T into dst (row stride L16),
// through the warps' scratch. bf16 only: no tile scales.
template <typename T>
__device__ __forceinline__ void frags_publish_lo_rows(const Acc (&st)[kDkvFrags], const FragTiles& ft, T* dst,
                                                      int L16) {
    static_assert(!Mma<T>::scaled, "frags_publish_lo_rows: unscaled tiles only");
    frags_each(st, ft, [&](int x, int e, float v) {
        // hi - v is not finite where hi overflowed: lo is 0 there, so an
        // infinite dS gives inf in dv, not NaN.
        const float lo = v - to_float(from_float<T>(v));
        dst[x * L16 + e] = from_float<T>(lo - lo == 0.0f ? lo : 0.0f);
    });
}

// The fragments' D x M part to state `sh` of dst (D x M row-major each).
__device__ __forceinline__ void frags_store(const Acc (&st)[kDkvFrags], const FragTiles& ft, float* dst, int64_t sh,
                                            int D, int M) {
    frags_each(st, ft, [&](int x, int e, float v) {
        if (x < D && e < M) dst[(sh * D + x) * M + e] = v;
    });
}

// A split walk's partition sum (LINATTN_BWD_PARTIALS) to its work slot: S
// (or dS) from the fragments, z (or dz) from shared memory.
__device__ __forceinline__ void store_slot(const Acc (&st)[kDkvFrags], const FragTiles& ft,
                                           const LinattnBackwardParams& p, int64_t index, const float* zs, int D,
                                           int M) {
    frags_store(st, ft, ptr<float>(p.work_s), index, D, M);
    float* wz = ptr<float>(p.work_z);
    for (int x = threadIdx.x; x < D; x += blockDim.x) wz[index * D + x] = zs[x];
}

// st += X^T Y over the chunk's CT row-tiles (k-steps in increasing order,
// gemm's order): X16 is C x D16 (row stride lx, inverse tile scales sX
// with sxs tiles a row, or nullptr), Y16 C x M16 (row stride ly, inverse
// tile scales sY, or nullptr).
template <typename T>
__device__ __forceinline__ void frags_absorb(Acc (&st)[kDkvFrags], const FragTiles& ft, int CT, const T* X16, int lx,
                                             const float* sX, int sxs, const T* Y16, int ly, const float* sY) {
    using namespace nvcuda;
#pragma unroll 1
    for (int kt = 0; kt < CT; ++kt) {
#pragma unroll
        for (int k = 0; k < kDkvFrags; ++k) {
            int t, x0, e0;
            if (!ft.at(k, t, x0, e0)) continue;
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
            wmma::load_matrix_sync(a, X16 + kt * 16 * lx + x0, lx);
            wmma::load_matrix_sync(b, Y16 + kt * 16 * ly + e0, ly);
            float f = 1.0f;
            if constexpr (Mma<T>::scaled) {
                if (sX != nullptr) f *= sX[kt * sxs + x0 / 16];
                if (sY != nullptr) f *= sY[kt * ft.MTT + e0 / 16];
            }
            mma_scaled<T>(st[k], a, b, f);
        }
    }
}

// ---------------------------------------------------------------------------
// The low half of the 16-bit split of the fragments' state (S = hi + lo,
// hi = frags_publish's copy): lo = S - hi exactly in fp32, rounded to T
// into S16 (row stride L16) with its own tile scales in sS (f16), so
// G hi^T + G lo^T carries S to ~2^-17 relative instead of 2^-9 (bf16) or
// 2^-11 (f16). No scratch: each element goes straight from the fragment to
// its place, found through idx, a 16 x 16 fp32 table of r * 16 + c loaded
// as an accumulator fragment (fragments of one type share their element
// mapping). S16 must be free: sync first.
template <typename T>
__device__ __forceinline__ void frags_publish_lo(const Acc (&st)[kDkvFrags], const FragTiles& ft, const float* idx,
                                                 T* S16, int L16, float* sS) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < kDkvFrags; ++k) {
        int t, x0, e0;
        if (!ft.at(k, t, x0, e0)) continue;
        // lo is recomputed where it is used rather than held (registers).
        float mx = 0.0f;
#pragma unroll
        for (int i = 0; i < Acc::num_elements; ++i) mx = fmaxf(mx, fabsf(st[k].x[i]));
        // hi exactly as round_tile rounded it (same tile, same maximum).
        float s = 1.0f, inv = 1.0f;
        if constexpr (Mma<T>::scaled) s = tile_pow2(mx, inv);
        const float shi = s;
        const auto lo = [&](float x) { return x - to_float(from_float<T>(x * shi)) * inv; };
        mx = 0.0f;
#pragma unroll
        for (int i = 0; i < Acc::num_elements; ++i) mx = fmaxf(mx, fabsf(lo(st[k].x[i])));
        s = 1.0f;
        if constexpr (Mma<T>::scaled) {
            float si;
            s = tile_pow2(mx, si);
            if (lane == 0) sS[t] = si;
        } else {
            (void)sS;
            (void)lane;
        }
        Acc id;
        nvcuda::wmma::load_matrix_sync(id, idx, 16, nvcuda::wmma::mem_row_major);
        T* dst = S16 + x0 * L16 + e0;
#pragma unroll
        for (int i = 0; i < Acc::num_elements; ++i) {
            const int rc = (int)id.x[i];
            dst[(rc >> 4) * L16 + (rc & 15)] = from_float<T>(lo(st[k].x[i]) * s);
        }
    }
}

// ---------------------------------------------------------------------------
// prep and dq in one forward walk: one block per sequence-head owns the whole
// state S (D16 x M16, in the warps' registers: FragTiles above) and z, so it
// has den and d den of its tokens, and with them dq, in one pass over q, k,
// v, dL/do (prep_mma and dqk_mma<T, false> take two, with the state split
// over blocks). It writes den and dL/do . num to the workspace (slot 0) for
// the dkv walk. Chosen by `ops::backward::fused_prep_dq` where dS fits the
// fragments (the dkv walk runs then too) and this body fits the shared
// budget.
//   A = qh kh^T, E = G v^T (lower block triangle, fp32; qh staged as
//       phi(q), s applied to every fp32 sum of it: no 16-bit s phi(q)),
//   H = G S^T = G S_hi^T + G S_lo^T (S split into two 16-bit copies),
//   den = qh . z + rowsum(A) + eps,
//   G . num = qh . H + rowsum(A o E)      (num = qh S + A v never formed),
//   d den = -(G . num) / den^2,
//   B' = E + d den den (j <= i),           dqh = (H + B' kh) / den,
//   S += kh^T v, z += colsum(kh).
// Why: with q, k ~ N(mu, 1) every score of a row is nearly equal and dqh's
// two parts, H / den and d den z, cancel to ~1/mu of their size; a 16-bit
// copy of S in H (or in num, through d den) then costs ~mu 2^-9 of dq (bf16
// dq 1e-1 at mu = 40). With S and B' split and G . num from fp32 A and E,
// the 16-bit roundings that reach dq are the low halves' (~2^-17). B' is
// den times the unfused walk's B, so a row with den ~ eps puts no 1 / eps
// into the f16 tile scales. Tensor-core MACs per token-head are the
// unfused walk's (61,440 at D = M = 128): `qh S` and `A v` (num) dropped,
// `G S_lo^T` and `B'_lo kh` added (docs/benchmarks.md).
// Shared: z (D16) | S16 (D16 x M16+8: S_hi, S_lo in turn) | qh, kh (C x
//         D16+8 each) | v, G (C x M16+8 each) | P16 (C x C+8: B') | F (fp32,
//         C x max(C,D16,M16)+4 and at least 16 x 16 per warp: A, H and dqh,
//         and the warps' publish scratch) | E (fp32, C x C+4) | idx (16 x
//         16 fp32) | qh . z, rowsum(A), den, d den (C each) | scales of S16
//         ((D16/16)(M16/16)), G ((C/16)(M16/16)) and P16 ((C/16)^2).
template <typename In, typename T = In>
__device__ __forceinline__ void prep_dq_mma(const LinattnBackwardParams& p, float* smem) {
    const Coords c = coords(p);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
    const int D = (int)p.d, M = (int)p.m, C = p.chunk, D16 = pad16(D), M16 = pad16(M);
    const int L16 = M16 + 8, LD = D16 + 8, LC = C + 8, LF = imax(C, imax(D16, M16)) + 4, LE = C + 4;
    const int CT = C / 16, MTT = M16 / 16, DTT = D16 / 16;
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    const bool norm = p.normalize != 0;
    const bool split = p.dq_precision == LINATTN_DQ_SPLIT;  // S and B' as hi + lo
    Carve cv{reinterpret_cast<char*>(smem), 0u};
    float* zs = cv.take<float>(D16);
    T* S16 = cv.take<T>(D16 * L16);
    T* Q16 = cv.take<T>(C * LD);
    T* K16 = cv.take<T>(C * LD);
    T* V16 = cv.take<T>(C * L16);
    T* G16 = cv.take<T>(C * L16);
    T* P16 = cv.take<T>(C * LC);
    float* F = cv.take<float>(imax(C * LF, nwarps * 256));
    float* E = cv.take<float>(C * LE);
    float* idx = cv.take<float>(256);
    float* qz = cv.take<float>(C);
    float* asum = cv.take<float>(C);
    float* den = cv.take<float>(C);
    float* dd = cv.take<float>(C);
    float* sS = cv.take<float>(DTT * MTT);
    float* sG = cv.take<float>(CT * MTT);
    float* sP = cv.take<float>(CT * CT);
    // Chunks whose keys are all positive (elu+1) stage k itself, exact in
    // T, for phi(k) = k + 1, whose 16-bit rounding loses k's last bit where
    // k + 1 crosses a binade (bf16 dq 1.6e-2 at mu 10, D = 2: the ~mu
    // cancellation of dq amplifies it). The + 1 goes on in fp32: S is held
    // as the fragments plus 1_D vsum^T (vsum: colsum(v) of such chunks),
    // A and B' kh get row sums, z gets + 1 per key. vsum[M16]: the chunk's
    // flag (shared, not a register); the per-row sums go in E's padding
    // columns C, C + 1. bf16 only: f16 keeps 11 bits of k + 1 (8x bf16's),
    // and prepdq_f16 spills on sm_90 with this code. Not for f16 inputs on
    // bf16 tiles either: there k is not exact in T.
    constexpr bool kShiftK = !Mma<T>::scaled && std::is_same<In, T>::value;
    // Heads one tile wide (D <= 16) on bf16 tiles, elu+1, Split: the other
    // chunks split phi(k) as S and B' are, kh = hi + lo (lo = phi(k) -
    // hi(phi(k)), exact in fp32, rounded to T), and every product kh feeds
    // takes the low half too (`qh kh_lo^T`, `B'_hi kh_lo`, `kh_lo^T v`, z).
    // Wide keys amplify kh's 2^-9 like mu does: D = M = 2, q, k ~ N(0, 10)
    // gave bf16 dq 1.85e-2, and the f64 reference on the rounded keys moves
    // by 1.80e-2. kh_lo lives in P16 (stride LD, D16 <= C) for A and in Q16
    // after d den is formed (emit) or from staging (absorb only).
    // The chunk's flag vsum[M16] is 1 for a shifted chunk, 2 for a split
    // one, 0 otherwise.
    constexpr bool kSplitK = !Mma<T>::scaled;
    const bool ksplit = kSplitK && split && DTT == 1 && fm == LINATTN_FEATURE_MAP_ELU_PLUS_ONE;
    // f16 inputs on bf16 tiles: v and G are f16, exact as bf16 hi + lo
    // (stage_halves), and every product they feed takes both (the low
    // halves' products with each other are below 2^-16 and dropped):
    // E = G_hi v_hi^T + G_hi v_lo^T + G_lo v_hi^T, H adds G_lo S_hi^T,
    // S += kh^T v_lo. The halves take turns in G16 and V16, so no buffer is
    // added. (kShiftK, which reads V16 for colsum(v), excludes it.)
    constexpr bool kSplitVG = !std::is_same<In, T>::value;
    static_assert(!kSplitVG || !Mma<T>::scaled, "prepdq: v and G halves on unscaled (bf16) tiles only");
    (void)cv.take<float>(M16 + 1);
    // Rematerialised from sP (the carve's next 128-byte boundary), not a
    // live register.
#define LINATTN_VSUM \
    (reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sP + CT * CT) + 127u) & ~(uintptr_t)127u))
#define LINATTN_SHIFTED (kShiftK && LINATTN_VSUM[M16] == 1.0f)
#define LINATTN_KLO (kSplitK && LINATTN_VSUM[M16] == 2.0f)

    // S from the initial state (zero without) or the partition's work slot,
    // and its copy S16.
    Acc st[kDkvFrags];
    const FragTiles ft{DTT * MTT, MTT, warp, nwarps, F + warp * 256};
    const StateSlot sl = state_slot(p, c, p.state_in_s, p.state_in_z);
    frags_load(st, ft, sl.s == nullptr ? nullptr : sl.s + sl.index * D * M, D, M);
    if (!sl.partials) frags_publish<T>(st, ft, S16, L16, sS);
    for (int x = tid; x < D16; x += nthreads) zs[x] = sl.z != nullptr && x < D ? sl.z[sl.index * D + x] : 0.0f;
    for (int i = tid; i < 256; i += nthreads) idx[i] = (float)i;
    for (int e = tid; e <= M16; e += nthreads) LINATTN_VSUM[e] = 0.0f;
    const In* qb = rows_of<In>(p.q, c, p.q_batch_stride, p.q_head_stride);
    const In* kb = rows_of<In>(p.k, c, p.k_batch_stride, p.k_head_stride);
    const In* vb = rows_of<In>(p.v, c, p.v_batch_stride, p.v_head_stride);
    const In* gb = rows_of<In>(p.d_o, c, p.o_batch_stride, p.o_head_stride);
    In* dqb = rows_of_mut<In>(p.dq, c, p.q_batch_stride, p.q_head_stride);
    const auto g_rows = [&](int64_t t0, int rows) { return ChunkRows<In>{gb, p.o_token_stride, t0, rows, M}; };
    const auto v_rows = [&](int64_t t0, int rows) { return ChunkRows<In>{vb, p.v_token_stride, t0, rows, M}; };
    // phi(k)'s low half (ksplit): stage_k_lo(dst, t0, rows) into C x LD.
    const auto stage_k_lo = [&](T* dst, int64_t t0, int rows) {
        stage<T>(dst, LD, C, D16, rows, D, [&](int j, int x) {
            const float f = phi(to_float(kb[(t0 + j) * p.k_token_stride + x]), fm);
            return f - to_float(from_float<T>(f));
        });
    };
    float* wden = ptr<float>(p.work_den);
    float* wgo = ptr<float>(p.work_dden);
    __syncthreads();

    // Causal: one sweep that absorbs and emits. Non-causal: absorb every
    // chunk, then emit; a split walk runs only the first sweep (partition
    // sums) or only the second (from the total in its slot).
    for (int sweep = causal ? 1 : 0; sweep < 2; ++sweep) {
        if (!causal && (sl.partials ? sweep == 1 : sweep == 0 && p.state_mode == LINATTN_BWD_FROM_WORK)) continue;
        const bool absorb = causal || sweep == 0;
        const bool emit = sweep == 1 && !sl.partials;
        for (int64_t c0 = 0; c0 < c.r.len; c0 += C) {
            const int rows = (int)(c.r.len - c0 < C ? c.r.len - c0 : C);
            const int64_t t0 = c.r.start + c0;
            if (emit) {
                // phi(q) without the scale (bounded by the input, and exact
                // for relu and identity): s multiplies the fp32 sums below,
                // so den and G . num see no rounding of s phi(q).
                stage<T>(Q16, LD, C, D16, rows, D,
                         [&](int j, int x) { return phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm); });
                // G itself, exact in T: every product it feeds has the token
                // on its rows, so 1 / den is applied to the fp32 results.
                round_tiles<T>(G16, L16, C, M16, sG, [&](int j, int e) {
                    return j < rows && e < M ? to_float(gb[(t0 + j) * p.o_token_stride + e]) : 0.0f;
                });
            }
            // Every key of the chunk positive (elu+1): K16 holds k (exact).
            // Otherwise, ksplit: K16 holds hi(phi(k)), and P16 (emit) or Q16
            // its low half.
            if ((kShiftK || kSplitK) && absorb && fm == LINATTN_FEATURE_MAP_ELU_PLUS_ONE) {
                int all_pos = 0;
                if constexpr (kShiftK) {
                    int nonpos = 0;
                    #pragma unroll 1
                    for (int i = tid; i < rows * D; i += nthreads) {
                        const int j = i / D, x = i - j * D;
                        if (!(to_float(kb[(t0 + j) * p.k_token_stride + x]) > 0.0f)) nonpos = 1;
                    }
                    all_pos = !__syncthreads_or(nonpos);
                }
                if (tid == 0) LINATTN_VSUM[M16] = all_pos ? 1.0f : ksplit ? 2.0f : 0.0f;
                __syncthreads();
            }
            if (absorb) {
                stage<T>(K16, LD, C, D16, rows, D, [&](int j, int x) {
                    const float k = to_float(kb[(t0 + j) * p.k_token_stride + x]);
                    return LINATTN_SHIFTED ? k : phi(k, fm);
                });
                // (P16's copy feeds A alone, which needs normalisation.)
                if (LINATTN_KLO && (!emit || norm)) stage_k_lo(emit ? P16 : Q16, t0, rows);
                stage<T>(V16, L16, C, M16, rows, M,
                         [&](int j, int e) { return to_float(vb[(t0 + j) * p.v_token_stride + e]); });
            }
            __syncthreads();
            if (emit) {
                // ---- A, E and their row sums -----------------------------
                for (int i = tid; i < C; i += nthreads) {
                    const T* q = Q16 + i * LD;
                    float a = 0.0f;
                    if (norm)
                        for (int x = 0; x < D; ++x) a = fmaf(to_float(q[x]), zs[x], a);
                    qz[i] = a * p.scale;
                    asum[i] = 0.0f;
                    den[i] = 0.0f;  // rowsum(A o E) until d den is formed
                }
                if (causal) {
                    if (norm) {
                        gemm<T, true, false>(F, LF, CT, CT, DTT, false, true, KRange::All, Q16, LD, no_scales(), K16,
                                             LD, no_scales());
                        // + qh kh_lo^T (each warp accumulates its own tiles).
                        if (LINATTN_KLO)
                            gemm<T, true, false>(F, LF, CT, CT, DTT, true, true, KRange::All, Q16, LD, no_scales(),
                                                 P16, LD, no_scales());
                    }
                    gemm<T, true, false>(E, LE, CT, CT, MTT, false, true, KRange::All, G16, L16,
                                         Scales{sG, MTT, 1, 1.0f}, V16, L16, no_scales());
                    if constexpr (kSplitVG)  // G16 then holds G_lo
                        add_gv_cross_terms<T, In>(E, LE, CT, MTT, G16, V16, L16, g_rows(t0, rows), v_rows(t0, rows));
                    __syncthreads();
                    if (norm) {
                        for (int i = tid; i < rows; i += nthreads) {
                            // shift: A = qh k^T + rowsum(qh) (qh . 1).
                            float qs = 0.0f;
                            if (LINATTN_SHIFTED)
                                #pragma unroll 1
                                for (int x = 0; x < D; ++x) qs += to_float(Q16[i * LD + x]);
                            float s = 0.0f, g = 0.0f;
                            for (int j = 0; j <= i; ++j) {
                                const float a = F[i * LF + j] + qs;
                                s += a;
                                g = fmaf(a, E[i * LE + j], g);
                            }
                            asum[i] = s * p.scale;
                            den[i] = g * p.scale;
                        }
                    }
                    __syncthreads();
                }
                // ---- H = G S_hi^T + G S_lo^T (S_hi alone: SINGLE) --------
                if constexpr (kSplitVG) {
                    // H = G_lo S_hi^T first (G_lo is in G16 after E; the
                    // non-causal read-out stages it), then G_hi back.
                    if (!causal) {
                        stage_halves<T>(G16, L16, C, M16, g_rows(t0, rows), true);
                        __syncthreads();
                    }
                    gemm<T, true, false>(F, LF, CT, DTT, MTT, false, false, KRange::All, G16, L16, no_scales(), S16,
                                         L16, no_scales());
                    __syncthreads();
                    stage_halves<T>(G16, L16, C, M16, g_rows(t0, rows), false);
                    __syncthreads();
                }
                gemm<T, true, false>(F, LF, CT, DTT, MTT, kSplitVG, false, KRange::All, G16, L16,
                                     Scales{sG, MTT, 1, 1.0f}, S16, L16, Scales{sS, MTT, 1, 1.0f});
                __syncthreads();
                if (split) {
                    frags_publish_lo<T>(st, ft, idx, S16, L16, sS);
                    __syncthreads();
                    gemm<T, true, false>(F, LF, CT, DTT, MTT, true, false, KRange::All, G16, L16,
                                         Scales{sG, MTT, 1, 1.0f}, S16, L16, Scales{sS, MTT, 1, 1.0f});
                    __syncthreads();
                }
                // H += (G . vsum) 1_D^T: S's shifted chunks' + 1 (G16 is G).
                if constexpr (kShiftK) {
                    for (int i = tid; i < C; i += nthreads) {
                        float a = 0.0f;
                        if (i < rows)
#pragma unroll 1
                            for (int e = 0; e < M; ++e) a = fmaf(to_float(G16[i * L16 + e]), LINATTN_VSUM[e], a);
                        E[i * LE + C] = a;
                    }
                    __syncthreads();
#pragma unroll 1
                    for (int i = tid; i < rows * D; i += nthreads) {
                        const int j = i / D, x = i - j * D;
                        F[j * LF + x] += E[j * LE + C];
                    }
                    __syncthreads();
                }
                // ---- den, d den: G . num = qh . H + rowsum(A o E) --------
                for (int i = warp; i < C; i += nwarps) {
                    float go = 0.0f;
                    if (norm && i < rows) {
                        const T* q = Q16 + i * LD;
                        for (int x = lane; x < D; x += 32) go = fmaf(to_float(q[x]), F[i * LF + x], go);
                        go = warp_sum(go) * p.scale;
                    }
                    if (lane == 0) {
                        float dn = 1.0f, d2 = 0.0f;
                        if (norm && i < rows) {
                            const int64_t row = work_row(p, c, t0 + i);
                            go += den[i];
                            dn = qz[i] + asum[i] + p.eps;
                            wgo[row] = go;
                            wden[row] = dn;
                            // load_norm's arithmetic (one prep slot).
                            d2 = -__fdividef(__fdividef(0.0f + go, dn), dn);
                        }
                        den[i] = dn;
                        dd[i] = d2;
                    }
                }
                __syncthreads();
                // ---- dq: B' = E + d den den = G . (v_j - o_i) (j <= i),
                // dqh = (H + B' kh) / den (+ d den z below). B' is den B:
                // the 1 / den goes on the fp32 rows, as for H, so a row
                // with den ~ eps (relu) does not put 1 / eps into B's f16
                // tile. B' is split as S is: B' kh is ~mu times dq too (its
                // common part cancels against H's), so B'_hi kh + B'_lo kh.
                if (causal) {
                    const auto bval = [&](int i, int j) {
                        return j > i || i >= rows ? 0.0f : fmaf(dd[i], den[i], E[i * LE + j]);
                    };
                    round_tiles<T>(P16, LC, C, C, sP, bval);
                    if (LINATTN_KLO) stage_k_lo(Q16, t0, rows);  // Q16 is read out (d den formed)
                    __syncthreads();
                    gemm<T, true, true>(F, LF, CT, DTT, CT, true, false, KRange::UpToRow, P16, LC,
                                        Scales{sP, CT, 1, 1.0f}, K16, LD, no_scales());
                    // + B'_hi kh_lo (each warp accumulates its own tiles).
                    if (LINATTN_KLO)
                        gemm<T, true, true>(F, LF, CT, DTT, CT, true, false, KRange::UpToRow, P16, LC,
                                            Scales{sP, CT, 1, 1.0f}, Q16, LD, no_scales());
                    __syncthreads();
                    if (split) {
                        round_tiles_lo<T>(P16, LC, C, C, sP, bval);
                        __syncthreads();
                        gemm<T, true, true>(F, LF, CT, DTT, CT, true, false, KRange::UpToRow, P16, LC,
                                            Scales{sP, CT, 1, 1.0f}, K16, LD, no_scales());
                        __syncthreads();
                    }
                    if (LINATTN_SHIFTED) {
                        // B' kh = B' k + rowsum(B') 1_D^T (fp32 B').
                        for (int i = tid; i < rows; i += nthreads) {
                            float a = 0.0f;
                            #pragma unroll 1
                            for (int j = 0; j <= i; ++j) a += bval(i, j);
                            E[i * LE + C + 1] = a;
                        }
                        __syncthreads();
                        #pragma unroll 1
                        for (int i = tid; i < rows * D; i += nthreads) {
                            const int j = i / D, x = i - j * D;
                            F[j * LF + x] += E[j * LE + C + 1];
                        }
                        __syncthreads();
                    }
                }
                for (int i = tid; i < C * D16; i += nthreads) {
                    const int j = i / D16, x = i - j * D16;
                    F[j * LF + x] = __fdividef(F[j * LF + x], den[j]);
                }
                __syncthreads();
                for (int i = tid; i < rows * D; i += nthreads) {
                    const int j = i / D, x = i - j * D;
                    const int64_t off = (t0 + j) * p.q_token_stride + x;
                    const float acc = fmaf(dd[j], zs[x], F[j * LF + x]);
                    dqb[off] = from_float<In>(p.scale * phi_prime(to_float(qb[off]), fm) * acc);
                }
                __syncthreads();  // z and F (the publish scratch) read out
                // S16 holds S_lo (split): the non-causal walk (no absorb)
                // puts S_hi back for its next chunk.
                if (!causal && split) frags_publish<T>(st, ft, S16, L16, sS);
            }
            if (absorb) {
                // S += kh^T v, z += kh^T 1; then the next chunk's S16 (the
                // non-causal walk publishes once, after every chunk).
                frags_absorb<T>(st, ft, CT, K16, LD, nullptr, 0, V16, L16, nullptr);
                // + kh_lo^T v (Q16 holds kh_lo: staged, or after d den).
                const bool lo = LINATTN_KLO;
                if (lo) frags_absorb<T>(st, ft, CT, Q16, LD, nullptr, 0, V16, L16, nullptr);
                if constexpr (kSplitVG) {
                    // + kh_hi^T v_lo (kh_lo^T v_lo is below 2^-16).
                    __syncthreads();
                    stage_halves<T>(V16, L16, C, M16, v_rows(t0, rows), true);
                    __syncthreads();
                    frags_absorb<T>(st, ft, CT, K16, LD, nullptr, 0, V16, L16, nullptr);
                }
                const float one = LINATTN_SHIFTED ? 1.0f : 0.0f;  // 1: phi(k) = k + 1, exact in fp32
                for (int x = tid; x < D; x += nthreads) {
                    float acc = zs[x];
                    for (int j = 0; j < rows; ++j)
                        acc += to_float(K16[j * LD + x]) + (lo ? to_float(Q16[j * LD + x]) : one);
                    zs[x] = acc;
                }
                if (one != 0.0f)
                    for (int e = tid; e < M; e += nthreads) {
                        float acc = LINATTN_VSUM[e];
                        #pragma unroll 1
                        for (int j = 0; j < rows; ++j) acc += to_float(V16[j * L16 + e]);
                        LINATTN_VSUM[e] = acc;
                    }
                if (!sl.partials && (causal || c0 + C >= c.r.len)) frags_publish<T>(st, ft, S16, L16, sS);
            }
            __syncthreads();
        }
    }
    if (sl.partials) {
        store_slot(st, ft, p, sl.index, zs, D, M);
        if constexpr (kShiftK) {
            __syncthreads();  // S = fragments + 1_D vsum^T
            float* ws = ptr<float>(p.work_s) + sl.index * D * M;
            for (int i = tid; i < D * M; i += nthreads) ws[i] += LINATTN_VSUM[i % M];
        }
    }
#undef LINATTN_KLO
#undef LINATTN_SHIFTED
#undef LINATTN_VSUM
}

// ---------------------------------------------------------------------------
// dk and dv in one reverse walk: one block per sequence-head owns the whole
// suffix state dS (D16 x M16) and dz, so it writes every dk and dv element
// of its sequence-head (still exactly one writer each) and reads q, k, v,
// dL/do once instead of twice (dk_walk and dv_walk). Chosen by
// `ops::backward::merged_dkv` for f16/bf16 heads whose dS fits the warps'
// fragments (D16 x M16 <= 64 tiles) and whose body fits the shared budget.
// The 1 / den of dnum = G / den goes with the query, not with G: the walk
// stages qn = qh / den (per-tile scaled for f16) and G itself (exact), so
//   B' = G v^T - (G . o) (per row; = den B, centred), dkh = v dS^T + B'^T qn,
//   A' = qn kh^T,                                  dv  = kh dS + A'^T G,
//   dS += qn^T G, dz += qn^T (-(G . o)).
// A row whose qh is zero (relu) or tiny has den ~ eps and a huge dnum that
// every product multiplies by its qh; with dnum staged, its f16 tile scale
// flushed the other rows of the tile to zero (dk 0.65 at scale 4096, relu,
// sigma 10). qn_i = qh_i / den_i <= 1 / |z|-ish is bounded for every row.
// dS lives in the warps' registers (FragTiles above), never in shared memory
// in fp32.
// Shared: dz (D16) | dS16 (D16 x M16+8) | qn, kh (C x D16+8 each) | v, G
//         (C x M16+8 each) | P16 (C x C+8: B', then A') | F (fp32, C x
//         max(C,D16,M16)+4 and at least 16 x 16 per warp: B', dkh, A', dv,
//         and the warps' publish scratch) | scales of qn ((C/16)(D16/16)) |
//         den, d den (C each) | scales of dS16 ((D16/16)(M16/16)), (unused:
//         (C/16)(M16/16)) and P16 ((C/16)^2).
template <typename In, typename T = In>
__device__ __forceinline__ void dkv_mma(const LinattnBackwardParams& p, float* smem) {
    using namespace nvcuda;
    const Coords c = coords(p);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int warp = tid >> 5, nwarps = nthreads >> 5;
    const int D = (int)p.d, M = (int)p.m, C = p.chunk, D16 = pad16(D), M16 = pad16(M);
    const int L16 = M16 + 8, LD = D16 + 8, LC = C + 8, LF = imax(C, imax(D16, M16)) + 4;
    const int CT = C / 16, MTT = M16 / 16, DTT = D16 / 16;
    const int tiles = DTT * MTT;  // <= kDkvFrags * nwarps (the plan's threads)
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    Carve cv{reinterpret_cast<char*>(smem), 0u};
    float* zs = cv.take<float>(D16);
    T* S16 = cv.take<T>(D16 * L16);
    T* Q16 = cv.take<T>(C * LD);
    // K16 then V16 back to back: dv_chunk finds dS_lo in V16 as the next
    // 128-byte boundary after K16 (DvChunk::s_lo_after_k).
    T* K16 = cv.take<T>(C * LD);
    T* V16 = cv.take<T>(C * L16);
    T* G16 = cv.take<T>(C * L16);
    T* P16 = cv.take<T>(C * LC);
    float* F = cv.take<float>(imax(C * LF, nwarps * 256));
    float* sQ = cv.take<float>(CT * DTT);
    float* den = cv.take<float>(C);
    float* dd = cv.take<float>(C);
    float* sS = cv.take<float>(DTT * MTT);
    (void)cv.take<float>(CT * MTT);  // the layout shared with prepdq
    float* sP = cv.take<float>(CT * CT);
    float* dead = cv.take<float>(D16);  // eps rows' features (f16 relu)
    // f16, relu, normalised: rows whose den is eps alone (den == eps: no key
    // j <= i shares a feature with q_i) have qn = qh / eps, and qn is
    // nonzero only on features x where every key j <= i has k_jx <= 0, so
    // phi(k_jx) and phi'(k_jx) vanish for every token still to come: such
    // a row meets only zeros in dk and dv and counts only in dS0. Staged,
    // its 1 / eps set its f16 tile scales (qn's, then dS16's) and flushed
    // the other rows of those tiles (dv 1.7e-2 in a D = M = 2 draw). So
    // its qn is staged as zero for the chunk's products, its qn^T G is
    // absorbed into dS from a second staging of qn that holds only such
    // rows (their own tile scales), and the dS rows it touched are copied
    // to dS16 as zeros (dead; a split walk starting from a work slot also
    // flags the features its partition's keys never make positive, which
    // covers the other partitions' eps rows the slot holds). bf16 is not
    // scaled and takes none of this.
    const bool eps_rows = Mma<T>::scaled && fm == LINATTN_FEATURE_MAP_RELU && p.normalize != 0;
    // f16 inputs on bf16 tiles: v and G as exact bf16 hi + lo halves
    // (stage_halves) in every product: B' = G_hi v_hi^T + G_hi v_lo^T +
    // G_lo v_hi^T, dkh adds v_lo dS^T, dv adds A'^T G_lo, dS adds qn^T G_lo.
    // The halves take turns in G16 and V16; for a causal chunk's dv and for
    // the state update G16 holds G_hi and V16 G_lo. In = f16 on T = bf16 is
    // the only pair with In != T (the halves are exact for it).
    constexpr bool kSplitVG = !std::is_same<In, T>::value;
    static_assert(!kSplitVG || !Mma<T>::scaled, "dkv: v and G halves on unscaled (bf16) tiles only");
    // bf16 heads one tile wide (D <= 16): dv = kh dS_hi + kh dS_lo. With
    // nearly equal features (q, k ~ N(mu, 1)) dv_j ~ kh_j (sum_x dS_x), and
    // dS's rows can nearly cancel (a d_final ~ N(0, 1) at D = 2 gave column
    // sums of 0.07 from terms of 2.0): dS16's 2^-9 then became dv 2.3e-2.
    // dS_lo goes to V16 (free once dk is out; D16 <= C rows).
    constexpr bool kSplitDS = !Mma<T>::scaled && !kSplitVG;

    // dS from d_final (zero without) or the partition's work slot, and its
    // copy dS16.
    Acc st[kDkvFrags];
    const FragTiles ft{tiles, MTT, warp, nwarps, F + warp * 256};
    const StateSlot sl = state_slot(p, c, p.d_final_s, p.d_final_z);
    frags_load(st, ft, sl.s == nullptr ? nullptr : sl.s + sl.index * D * M, D, M);
    if constexpr (Mma<T>::scaled) {
        // A split walk's slot holds other partitions' eps rows (causal:
        // later ones; non-causal: all), whose features are dead for every
        // token of this partition: flag them from its keys.
        for (int x = tid; x < D16; x += nthreads) dead[x] = 0.0f;
        if (eps_rows && p.state_mode == LINATTN_BWD_FROM_WORK)
            dead_features<In>(dead, rows_of<In>(p.k, c, p.k_batch_stride, p.k_head_stride), p.k_token_stride,
                             c.r.start, c.r.len, D);
        __syncthreads();
    }
    if (!sl.partials) frags_publish<T>(st, ft, S16, L16, sS, eps_rows ? dead : nullptr);
    for (int x = tid; x < D16; x += nthreads) zs[x] = sl.z != nullptr && x < D ? sl.z[sl.index * D + x] : 0.0f;
    const In* qb = rows_of<In>(p.q, c, p.q_batch_stride, p.q_head_stride);
    const In* kb = rows_of<In>(p.k, c, p.k_batch_stride, p.k_head_stride);
    const In* vb = rows_of<In>(p.v, c, p.v_batch_stride, p.v_head_stride);
    const In* gb = rows_of<In>(p.d_o, c, p.o_batch_stride, p.o_head_stride);
    In* dkb = rows_of_mut<In>(p.dk, c, p.k_batch_stride, p.k_head_stride);
    In* dvb = rows_of_mut<In>(p.dv, c, p.v_batch_stride, p.v_head_stride);
    const auto g_rows = [&](int64_t t0, int rows) { return ChunkRows<In>{gb, p.o_token_stride, t0, rows, M}; };
    const auto v_rows = [&](int64_t t0, int rows) { return ChunkRows<In>{vb, p.v_token_stride, t0, rows, M}; };
    __syncthreads();

    const int64_t last = last_chunk(c.r.len, C);
    // Causal: one sweep that absorbs and emits. Non-causal: absorb every
    // chunk, then emit; a split walk runs only the first sweep (partition
    // sums) or only the second (from the total in its slot).
    for (int sweep = causal ? 1 : 0; sweep < 2; ++sweep) {
        if (!causal && (sl.partials ? sweep == 1 : sweep == 0 && p.state_mode == LINATTN_BWD_FROM_WORK)) continue;
        const bool absorb = causal || sweep == 0;
        const bool emit = sweep == 1 && !sl.partials;
        for (int64_t c0 = last; c0 >= 0; c0 -= C) {
            const int rows = (int)(c.r.len - c0 < C ? c.r.len - c0 : C);
            const int64_t t0 = c.r.start + c0;
            // Causal walks absorb every chunk, so dnum and d den are loaded
            // whenever they are needed (absorb, and B when emitting).
            if (absorb) {
                stage<T>(G16, L16, C, M16, rows, M,
                         [&](int j, int e) { return to_float(gb[(t0 + j) * p.o_token_stride + e]); });
                load_norm(p, c, t0, rows, C, den, dd);
            }
            if (emit) {
                stage<T>(K16, LD, C, D16, rows, D,
                         [&](int j, int x) { return phi(to_float(kb[(t0 + j) * p.k_token_stride + x]), fm); });
                stage<T>(V16, L16, C, M16, rows, M,
                         [&](int j, int e) { return to_float(vb[(t0 + j) * p.v_token_stride + e]); });
            } else if (kSplitVG && absorb) {
                stage_halves<T>(V16, L16, C, M16, g_rows(t0, rows), true);
            }
            __syncthreads();
            if (absorb) {
                // qn = s phi(q) / den (zero in eps rows, above); d den
                // becomes d den * den = -(G . o).
                round_tiles<T>(Q16, LD, C, D16, sQ, [&](int j, int x) {
                    return j < rows && x < D && !(eps_rows && den[j] == p.eps)
                               ? __fdividef(phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm) * p.scale, den[j])
                               : 0.0f;
                });
                __syncthreads();
                for (int j = tid; j < C; j += nthreads) dd[j] *= den[j];
                __syncthreads();
            }
            if (emit) {
                if (causal) {
                    // B' = G v^T - (G . o) per row, lower block triangle.
                    gemm<T, true, false>(F, LF, CT, CT, MTT, false, true, KRange::All, G16, L16, no_scales(), V16, L16,
                                         no_scales());
                    if constexpr (kSplitVG)  // G16 then holds G_lo
                        add_gv_cross_terms<T, In>(F, LF, CT, MTT, G16, V16, L16, g_rows(t0, rows), v_rows(t0, rows));
                    __syncthreads();
                    round_tiles<T>(P16, LC, C, C, sP, [&](int i, int j) {
                        return j > i || i >= rows ? 0.0f : F[i * LF + j] + dd[i];
                    });
                    __syncthreads();
                }
                // dkh = v dS^T + B'^T qn (i >= j)
                gemm<T, true, false>(F, LF, CT, DTT, MTT, false, false, KRange::All, V16, L16, no_scales(), S16, L16,
                                     Scales{sS, MTT, 1, 1.0f});
                if (causal) {
                    __syncwarp();
                    gemm<T, false, true>(F, LF, CT, DTT, CT, true, false, KRange::FromRow, P16, LC,
                                         Scales{sP, CT, 1, 1.0f}, Q16, LD, Scales{sQ, DTT, 1, 1.0f});
                }
                if constexpr (kSplitVG) {
                    // + v_lo dS^T (each warp accumulates its own tiles).
                    __syncthreads();
                    stage_halves<T>(V16, L16, C, M16, v_rows(t0, rows), true);
                    __syncthreads();
                    gemm<T, true, false>(F, LF, CT, DTT, MTT, true, false, KRange::All, V16, L16, no_scales(), S16, L16,
                                         no_scales());
                }
                __syncthreads();
                for (int i = tid; i < rows * D; i += nthreads) {
                    const int j = i / D, x = i - j * D;
                    const int64_t off = (t0 + j) * p.k_token_stride + x;
                    dkb[off] = from_float<In>(phi_prime(to_float(kb[off]), fm) * (F[j * LF + x] + zs[x]));
                }
                __syncthreads();  // F, P16 and dz are reused below
                if constexpr (kSplitDS) {
                    if (DTT == 1) {
                        frags_publish_lo_rows<T>(st, ft, V16, L16);
                        __syncthreads();
                    }
                }
                if (kSplitVG && causal) {
                    // G_hi back into G16, G_lo into V16 (v is done with).
                    stage_halves<T>(G16, L16, C, M16, g_rows(t0, rows), false);
                    stage_halves<T>(V16, L16, C, M16, g_rows(t0, rows), true);
                    __syncthreads();
                }
                // A' = qn kh^T (causal), then dv = kh dS + A'^T G.
                DvChunk<T, In> a;
                a.F = F; a.LF = LF; a.CT = CT; a.MTT = MTT; a.DTT = DTT; a.causal = causal;
                a.rows = rows; a.cols = M;
                a.Q16 = Q16; a.sq = Scales{sQ, DTT, 1, 1.0f}; a.K16 = K16; a.LD = LD;
                a.A16 = P16; a.LC = LC; a.sA = sP;
                a.S16 = S16; a.L16 = L16; a.sS = sS; a.G16 = G16; a.sG = nullptr;
                a.out = dvb + t0 * p.v_token_stride; a.stride = p.v_token_stride;
                if (kSplitVG) a.G16lo = V16;
                a.s_lo_after_k = kSplitDS && DTT == 1;  // dS_lo in V16
                dv_chunk<T, In>(a);
            }
            if (absorb) {
                // dS += qn^T G; then, for f16 chunks with eps rows, once
                // more from qn of those rows alone (one call site: the
                // fragments' code is not duplicated).
#pragma unroll 1
                for (int pass = 0;; ++pass) {
                    frags_absorb<T>(st, ft, CT, Q16, LD, sQ, DTT, G16, L16, nullptr);
                    if constexpr (kSplitVG) frags_absorb<T>(st, ft, CT, Q16, LD, sQ, DTT, V16, L16, nullptr);
                    if constexpr (!Mma<T>::scaled) break;
                    if (pass == 1 || !eps_rows) break;
                    int any = 0;
                    for (int j = tid; j < rows; j += nthreads) any |= den[j] == p.eps ? 1 : 0;
                    // (a barrier: every warp has read Q16)
                    if (!__syncthreads_or(any)) break;
                    // qn of the eps rows alone, and their features.
                    round_tiles<T>(Q16, LD, C, D16, sQ, [&](int j, int x) {
                        return j < rows && x < D && den[j] == p.eps
                                   ? __fdividef(phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm) * p.scale, den[j])
                                   : 0.0f;
                    });
                    for (int x = tid; x < D; x += nthreads) {
#pragma unroll 1
                        for (int j = 0; j < rows; ++j)
                            if (den[j] == p.eps && phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm) != 0.0f)
                                dead[x] = 1.0f;
                    }
                    __syncthreads();
                }
                // dz += qn^T (-(G . o)) (dz was last read before the sync
                // above; qn in fp32 here, from the input).
                for (int x = tid; x < D; x += nthreads) {
                    float acc = zs[x];
#pragma unroll 1
                    for (int j = 0; j < rows; ++j) {
                        const float qh = phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm) * p.scale;
                        acc = fmaf(dd[j], __fdividef(qh, den[j]), acc);
                    }
                    zs[x] = acc;
                }
                // The next chunk's dS16 (causal); the non-causal walk
                // publishes once, after absorbing every chunk.
                if (!sl.partials && (causal || c0 == 0)) {
                    __syncthreads();  // F (the scratch) and dS16 read out
                    if constexpr (Mma<T>::scaled) {
                        frags_publish<T>(st, ft, S16, L16, sS, eps_rows ? dead : nullptr);
                    } else {
                        frags_publish<T>(st, ft, S16, L16, sS);
                    }
                }
            }
            __syncthreads();
        }
    }

    // The initial state's gradient (dS from the fragments, dz), by the
    // sequence's first partition; or the partition's sum to its work slot.
    if (sl.partials) {
        store_slot(st, ft, p, sl.index, zs, D, M);
    } else if (p.d_initial_s != 0 && blockIdx.y == 0) {
        frags_store(st, ft, ptr<float>(p.d_initial_s), c.sh, D, M);
        float* sz = ptr<float>(p.d_initial_z);
        for (int x = tid; x < D; x += nthreads) sz[c.sh * D + x] = zs[x];
    }
}

// ---------------------------------------------------------------------------
// The entry points' bodies: tensor cores for 16-bit inputs, FMA for fp32.
// In types the global tensors (q, k, v, dL/do, dq, dk, dv), T the shared
// 16-bit tiles and every Mma<T> decision; they differ only for f16 inputs
// on bf16 tiles (the `_f16_bf16tc` entry points of backward.cu).
template <typename In, typename T = In>
__device__ __forceinline__ void prep(const LinattnBackwardParams& p, float* smem) {
    static_assert(std::is_same<In, T>::value || Mma<T>::available, "prep: separate tiles need tensor cores");
    if constexpr (Mma<T>::available) prep_mma<In, T>(p, smem);
    else prep_fma<T>(p, smem);
}
template <typename In, typename T = In>
__device__ __forceinline__ void dq_walk(const LinattnBackwardParams& p, float* smem) {
    static_assert(std::is_same<In, T>::value || Mma<T>::available, "dq_walk: separate tiles need tensor cores");
    if constexpr (Mma<T>::available) dqk_mma<In, T, false>(p, smem);
    else dqk_fma<T, false>(p, smem);
}
template <typename In, typename T = In>
__device__ __forceinline__ void dk_walk(const LinattnBackwardParams& p, float* smem) {
    static_assert(std::is_same<In, T>::value || Mma<T>::available, "dk_walk: separate tiles need tensor cores");
    if constexpr (Mma<T>::available) dqk_mma<In, T, true>(p, smem);
    else dqk_fma<T, true>(p, smem);
}
template <typename In, typename T = In>
__device__ __forceinline__ void dv_walk(const LinattnBackwardParams& p, float* smem) {
    static_assert(std::is_same<In, T>::value || Mma<T>::available, "dv_walk: separate tiles need tensor cores");
    if constexpr (Mma<T>::available) dv_mma<In, T>(p, smem);
    else dv_fma<T>(p, smem);
}
// The fused prep + dq walk exists for 16-bit inputs only (fp32 runs prep
// and dq_walk).
template <typename In, typename T = In>
__device__ __forceinline__ void prep_dq_walk(const LinattnBackwardParams& p, float* smem) {
    static_assert(Mma<T>::available, "prep_dq_walk: f16 and bf16 only");
    prep_dq_mma<In, T>(p, smem);
}
// The merged dk + dv walk exists for 16-bit inputs only (fp32 runs dk_walk
// and dv_walk).
template <typename In, typename T = In>
__device__ __forceinline__ void dkv_walk(const LinattnBackwardParams& p, float* smem) {
    static_assert(Mma<T>::available, "dkv_walk: f16 and bf16 only");
    dkv_mma<In, T>(p, smem);
}

}  // namespace bwd
}  // namespace linattn
