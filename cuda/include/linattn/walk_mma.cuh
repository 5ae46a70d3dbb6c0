// The tensor-core chunk walk for 16-bit inputs (f16, bf16), the counterpart
// of the fp32 FMA walk in linattn/chunk_walk.cuh with the same flags and the
// same block coordinates (one block per sequence-head x value tile x
// partition). Every product of a chunk runs on nvcuda::wmma 16x16x16
// fragments with fp32 accumulation:
//
//   A   = (s phi(Q_c)) phi(K_c)^T, lower block triangle      (C x C, fp32)
//   O   = (s phi(Q_c)) S16 + mask(A)16 V_c                     (C x MT, fp32)
//   den = (s phi(Q_c)) . z + rowsum(mask(A))                   (fp32 FMA)
//   S  += phi(K_c)^T V_c ;  z += colsum(phi(K_c))               (fp32)
//
// D is padded to a multiple of 16 (DP) and the value tile MT is a multiple
// of 16, with zeros past D, past the tile's valid columns and past the
// sequence end, so any D and M from 1 to 256 take this path.
//
// The fp32 state S[:, tile] never lives in shared memory: each warp keeps
// its 16 x 16 tiles of it as accumulator fragments in registers for the
// whole walk (at most kStateFrags per warp) and adds phi(K_c)^T V_c to them
// in place. After each update a warp publishes its tiles as a 16-bit copy
// S16 (through a 16 x 16 fp32 scratch of its own) for the next chunk's
// phi(Q) S16 product; that rounding of S to the tile type T is the only one
// beyond rounding s phi(q), phi(k) and A to T (f16 inputs on bf16 tiles,
// In = __half, T = __nv_bfloat16, take v as two exact bf16 halves in step
// 4 rather than round it). f16 covers too little
// range for a state that grows with the sequence, so each f16 tile is scaled
// by a power of two that maps its largest entry into [2^14, 2^15), and its
// partial product is scaled back in fp32 (fragments of one type share their
// element mapping, so the element-wise fix-up is exact). bf16 has fp32's
// exponent range and is published unscaled.
//
// f16 also keeps s phi(q) and the masked scores in range (issue 17; the
// list of roundings is in docs/kernels.md): a row of s phi(q) whose largest
// magnitude leaves [2^-6, 2^15) is restaged scaled by a power of two, and a
// row of scores reaching 2^15 is rounded scaled, its Q16 row rescaled by the
// same factor; each row's numerator then carries a unit 2^-u that its
// denominator (with eps 2^-u) shares, or that the unnormalised output undoes.
// Powers of two are exact: in-window rows round exactly as without scaling.
//
// Per chunk: (1) write the previous chunk's outputs, load the chunk;
// (2) scores, phi(Q) . z, and for bf16 phi(Q) S16 into the output fragments;
// (3) mask and round A, row sums (f16: row units), z update; (4) f16:
// phi(Q) S16 into the output fragments; A V into them, outputs to shared
// memory, state update, S16 publish. Four barriers (f16: five, the fifth
// before the publish, as step 4 reads S16 there; f16 on bf16 tiles: six in
// causal chunks, two around v's low half); tiles and sums in a fixed order,
// so results are bit-identical run to run.
//
// Shared memory, in this order (the plan's `walk_shared_bytes` mirrors it;
// 16-bit row strides padded by 8 elements and fp32 ones by 4 against bank
// conflicts, every wmma tile 32-byte aligned):
//   Q16 C x (DP+8), K16 C x (DP+8), V16 C x (MT+8), S16 DP x (MT+8),
//   A16 C x (C+8)                                                   [T]
//   F   C x (max(C, MT)+4): the fp32 scores, then the chunk's outputs;
//   scratch 8 warps x 16 x 16 (f16: warp 0's holds the rows' s phi(q)
//   exponents from (1) to (3)); z DP; den C; tile scales DP/16 x MT/16 [fp32]
#pragma once
#include <cstdint>
#include <mma.h>
#include <type_traits>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "linattn/params.h"
#include "linattn/carve.cuh"
#include "linattn/dtype.cuh"
#include "linattn/feature_map.cuh"
#include "linattn/walk_common.cuh"
#include "linattn/scaled_round.cuh"
#include "linattn/mma_tile.cuh"

namespace linattn {

// Accumulator fragments per warp for the state (8 warps: DP * MT <= 8192)
// and for the chunk's outputs (C * MT <= 4096). The plan's tiling keeps
// within both (`MMA_STATE_FRAGS`, `MMA_OUT_FRAGS` in crates/kernels/src/ops/forward/tiling.rs).
constexpr int kStateFrags = 4;
constexpr int kOutFrags = 2;
constexpr int kScratch = 16 * 16;

// Rounds one 16 x 16 fp32 state tile (in the warp's scratch) to T at `dst`
// (ldm `ld`), scaled for f16; returns the factor that undoes the scaling.
template <typename T>
__device__ __forceinline__ float publish_tile(const float* scratch, T* dst, int ld) {
    const int lane = threadIdx.x & 31;
    float inv = 1.0f, back = 1.0f;
    if constexpr (Mma<T>::scaled) {
        float mx = 0.0f;
        for (int i = lane; i < kScratch; i += 32) mx = fmaxf(mx, fabsf(scratch[i]));
        mx = warp_max(mx);
        // Unlike the backward's tile_pow2, an overflowed state tile (mx
        // past 3e38 or inf) stays unscaled: 2^-100 could not bring it into
        // f16's range either, and either choice changes the bits of results
        // that are already meaningless; kept as each walk has always done.
        if (mx > 0.0f && mx <= 3.0e38f) {
            const int e = pow2_shift(mx, kTileTop);
            inv = ldexpf(1.0f, -e);
            back = ldexpf(1.0f, e);
        }
    }
    for (int i = lane; i < kScratch; i += 32) dst[(i / 16) * ld + (i % 16)] = from_float<T>(scratch[i] * inv);
    return back;
}

// Whether rows src + t * stride (t >= 0) of n valid elements can be read
// four elements at a time with aligned 8-byte loads.
template <typename In>
__device__ __forceinline__ bool row_vec_ok(const In* src, int64_t stride, int n) {
    return (reinterpret_cast<uintptr_t>(src) & 7) == 0 && (stride & 3) == 0 && (n & 3) == 0;
}

// One warp stages a row: dst[x] = T(f(src[x])) for x < n (when live), zero
// for the rest of n_pad (a multiple of 16). With vec, each lane moves four
// elements per 8-byte load and store (dst rows are 16-byte aligned; In and T
// are both 2 bytes). Returns the largest |f(src[x])| this lane staged (fp32,
// before the rounding).
template <typename In, typename T, typename F>
__device__ __forceinline__ float load_row(T* dst, const In* src, int n, int n_pad, bool live, bool vec, F f) {
    static_assert(sizeof(In) == 2 && sizeof(T) == 2, "load_row: 16-bit elements");
    const int lane = threadIdx.x & 31;
    float mx = 0.0f;
    if (vec) {
        for (int x = lane * 4; x < n_pad; x += 128) {
            T v[4] = {from_float<T>(0.0f), from_float<T>(0.0f), from_float<T>(0.0f), from_float<T>(0.0f)};
            if (live && x < n) {
                const uint2 raw = *reinterpret_cast<const uint2*>(src + x);
                In u[4];
                memcpy(u, &raw, sizeof(raw));
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float y = f(to_float(u[i]));
                    mx = fmaxf(mx, fabsf(y));
                    v[i] = from_float<T>(y);
                }
            }
            uint2 packed;
            memcpy(&packed, v, sizeof(packed));
            *reinterpret_cast<uint2*>(dst + x) = packed;
        }
    } else {
        for (int x = lane; x < n_pad; x += 32) {
            const float y = live && x < n ? f(to_float(src[x])) : 0.0f;
            mx = fmaxf(mx, fabsf(y));
            dst[x] = from_float<T>(y);
        }
    }
    return mx;
}

// The f16 walk's range windows (see the rounding list in docs/kernels.md).
// A row of s phi(q) whose largest magnitude is outside [2^-6, 2^15) is
// restaged scaled into [2^4, 2^5); a row of masked scores whose largest
// magnitude reaches 2^15 is rounded scaled into [2^14, 2^15), and its s phi(q)
// row follows it (exactly: a power of two on an f16 value), so the row's
// numerator and denominator share one factor, undone with eps in fp32.
constexpr float kQLo = 0.015625f, kQHi = 32768.0f;
constexpr int kQTop = 5;
constexpr float kAHi = 32768.0f;
constexpr int kATop = 15;

// In types the global q, k, v and o, T the shared tiles and every Mma<T>
// decision; they differ only for f16 inputs on bf16 tiles (forward.cu's
// forward_f16_bf16tc).
template <typename In, typename T = In>
__device__ __forceinline__ void chunk_walk_mma(const LinattnForwardParams& p, float* smem) {
    using namespace nvcuda;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int nwarps = blockDim.x >> 5;
    const WalkBlock b = walk_block(p);
    if (!b.active) return;

    const int D = (int)p.d;
    const int M = (int)p.m;
    const int C = p.chunk;
    const int MT = p.m_tile;
    const int DP = pad16(D);
    const int m0 = b.tile * MT;
    const int mt = M - m0 < MT ? M - m0 : MT;  // valid columns of this tile
    const int LQ = DP + 8, LV = MT + 8, LA = C + 8;
    const int LF = (C > MT ? C : MT) + 4;
    const int tiles_e = MT / 16;
    const int state_tiles = (DP / 16) * tiles_e;
    const int out_tiles = (C / 16) * tiles_e;
    // With tiles handed out as t = warp + k * nwarps, all of a warp's tiles
    // sit in one 16-column strip when tiles_e divides the warp count: the
    // strip's v (state update) and S16 (phi(Q) S) fragments are then loaded
    // once per k-step and shared by the warp's tiles.
    const bool shared_e = nwarps % tiles_e == 0;
    const int e_own = (warp % tiles_e) * 16;
    // f16 loads both operands per product: its per-tile scale fix-up needs
    // the registers that sharing takes (ptxas spills on sm_90 otherwise).
    const bool share = shared_e && !Mma<T>::scaled;

    T* Q16 = reinterpret_cast<T*>(smem);
    T* K16 = Q16 + C * LQ;
    T* V16 = K16 + C * LQ;
    T* S16 = V16 + C * LV;
    T* A16 = S16 + DP * LV;
    float* F = reinterpret_cast<float*>(A16 + C * LA);
    float* scratch = F + C * LF + warp * kScratch;
    float* zs = F + C * LF + nwarps * kScratch;
    float* den = zs + DP;
    float* scales = den + C;
    smem_end(smem, scales + state_tiles);
    // f16: each staged s phi(q) row's scale exponent, from its staging (1) to
    // its score rounding (3), in warp 0's scratch (free until (4)).
    float* rowq = F + C * LF;
    constexpr bool kScaled = Mma<T>::scaled;
    // f16 inputs on bf16 tiles: v as exact bf16 hi + lo halves in (4).
    constexpr bool kSplitV = !std::is_same<In, T>::value;
    static_assert(!kSplitV || !kScaled, "chunk_walk_mma: v halves on unscaled (bf16) tiles only");

    const bool causal = p.causal != 0;
    const bool out = p.write_output != 0;
    const bool norm = p.normalize != 0;
    const bool scores = causal && out;
    const int fm = p.feature_map;

    // ---- starting state: fragments (via the scratch), S16 and z -----------
    const float* ls = nullptr;
    const float* lz = nullptr;
    walk_state_source(p, b, ls, lz);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> st[kStateFrags];
#pragma unroll
    for (int k = 0; k < kStateFrags; ++k) {
        const int t = warp + k * nwarps;
        wmma::fill_fragment(st[k], 0.0f);
        if (t >= state_tiles) continue;
        const int d0 = (t / tiles_e) * 16, e0 = (t % tiles_e) * 16;
        for (int i = lane; i < kScratch; i += 32) {
            const int d = d0 + i / 16, e = e0 + i % 16;
            scratch[i] = (ls != nullptr && d < D && e < mt) ? ls[(int64_t)d * M + m0 + e] : 0.0f;
        }
        __syncwarp();
        wmma::load_matrix_sync(st[k], scratch, 16, wmma::mem_row_major);
        if (out) {
            const float back = publish_tile<T>(scratch, S16 + d0 * LV + e0, LV);
            if (lane == 0) scales[t] = back;
        }
        __syncwarp();
    }
    for (int d = tid; d < DP; d += blockDim.x) zs[d] = (lz != nullptr && d < D) ? lz[d] : 0.0f;
    __syncthreads();

    const In* qb = ptr<const In>(p.q) + b.r.batch * p.q_batch_stride + b.head * p.q_head_stride;
    const In* kb = ptr<const In>(p.k) + b.r.batch * p.k_batch_stride + b.head * p.k_head_stride;
    const In* vb = ptr<const In>(p.v) + b.r.batch * p.v_batch_stride + b.head * p.v_head_stride + m0;
    In* ob = ptr<In>(p.o) + b.r.batch * p.o_batch_stride + b.head * p.o_head_stride + m0;
    // Four elements per 8-byte load where every row start is 8-byte aligned
    // and the row's valid length a multiple of 4 (the common contiguous case).
    // One flag for all three keeps the register count down (f16 on sm_80).
    const bool vec = row_vec_ok(qb, p.q_token_stride, D) && row_vec_ok(kb, p.k_token_stride, D) &&
                     row_vec_ok(vb, p.v_token_stride, mt);

    // Writes one finished chunk (outputs in F, denominators in den). f16:
    // numerators and den are in the row's units 2^-u, and den already holds
    // eps 2^-u (normalised) or the factor 2^u (unnormalised).
    auto write_outputs = [&](int64_t t0, int rows) {
        for (int row = warp; row < rows; row += nwarps) {
            const float dn = kScaled ? den[row] : den[row] + p.eps;
            In* orow = ob + (t0 + row) * p.o_token_stride;
            for (int e = lane; e < mt; e += 32) {
                const float num = F[row * LF + e];
                // __fdividef: no IEEE slow-path call, 2 ulp.
                float o;
                if constexpr (kScaled) {
                    o = norm ? __fdividef(num, dn) : num * dn;
                } else {
                    o = norm ? __fdividef(num, dn) : num;
                }
                orow[e] = from_float<In>(o);
            }
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kOutFrags];
    // The outputs' phi(Q) S16 part (after (2) for bf16; for f16 after (3),
    // which may rescale a row of Q16).
    auto q_times_s16 = [&]() {
#pragma unroll
        for (int k = 0; k < kOutFrags; ++k) wmma::fill_fragment(acc[k], 0.0f);
#pragma unroll 1
        for (int x0 = 0; x0 < DP; x0 += 16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> s;
            if (share) wmma::load_matrix_sync(s, S16 + x0 * LV + e_own, LV);
#pragma unroll
            for (int k = 0; k < kOutFrags; ++k) {
                const int t = warp + k * nwarps;
                if (t >= out_tiles) continue;
                const int i0 = (t / tiles_e) * 16, e0 = (t % tiles_e) * 16;
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::load_matrix_sync(a, Q16 + i0 * LQ + x0, LQ);
                if (!share) wmma::load_matrix_sync(s, S16 + x0 * LV + e0, LV);
                if constexpr (kScaled) {
                    wmma::fragment<wmma::accumulator, 16, 16, 16, float> part;
                    wmma::fill_fragment(part, 0.0f);
                    wmma::mma_sync(part, a, s, part);
                    const float back = scales[(x0 / 16) * tiles_e + e0 / 16];
                    for (int i = 0; i < part.num_elements; ++i) acc[k].x[i] = fmaf(part.x[i], back, acc[k].x[i]);
                } else {
                    wmma::mma_sync(acc[k], a, s, acc[k]);
                }
            }
        }
    };

    int64_t pending_t0 = 0;
    int pending_rows = 0;
    for (int64_t c0 = b.t_begin; c0 < b.t_end; c0 += C) {
        const int rows = (int)(b.t_end - c0 < C ? b.t_end - c0 : C);
        const int64_t t0 = b.r.start + c0;
        // ---- (1) the previous chunk's outputs; load this chunk, zero-padded
        if (pending_rows > 0) write_outputs(pending_t0, pending_rows);
        for (int row = warp; row < C; row += nwarps) {
            const bool live = row < rows;
            if (out) {
                const In* qrow = qb + (t0 + row) * p.q_token_stride;
                float mq = load_row<In, T>(Q16 + row * LQ, qrow, D, DP, live, vec,
                                       [&](float x) { return phi(x, fm) * p.scale; });
                if constexpr (kScaled) {
                    // mq >= 0: its bits order as the value does (one redux, not five shuffles).
                    mq = __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(mq)));
                    int eq = 0;
                    if (pow2_out_of(mq, kQLo, kQHi)) {  // warp-uniform; rare
                        eq = pow2_shift(mq, kQTop);
                        const float inv = ldexpf(1.0f, -eq);
                        load_row<In, T>(Q16 + row * LQ, qrow, D, DP, live, vec,
                                    [&](float x) { return phi(x, fm) * p.scale * inv; });
                    }
                    if (lane == 0) rowq[row] = (float)eq;
                }
            }
            if (causal) {
                load_row<In, T>(K16 + row * LQ, kb + (t0 + row) * p.k_token_stride, D, DP, live, vec,
                            [&](float x) { return phi(x, fm); });
                load_row<In, T>(V16 + row * LV, vb + (t0 + row) * p.v_token_stride, mt, MT, live, vec,
                            [](float x) { return x; });  // exact where In is T
            }
        }
        __syncthreads();

        // ---- (2) scores, phi(Q) S16 into the output fragments, phi(Q) . z
        if constexpr (!kScaled) {
            if (out) q_times_s16();
        }
        if (scores) {
            const int tc = C / 16, tiles = tc * (tc + 1) / 2;
            for (int t = warp; t < tiles; t += nwarps) {
                int bi = 0;  // t -> (bi, bj), bj <= bi, row by row of the lower triangle
                while ((bi + 1) * (bi + 2) / 2 <= t) ++bi;
                const int bj = t - bi * (bi + 1) / 2;
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> a_ij;
                wmma::fill_fragment(a_ij, 0.0f);
                #pragma unroll 1
                for (int x0 = 0; x0 < DP; x0 += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kt;
                    wmma::load_matrix_sync(a, Q16 + bi * 16 * LQ + x0, LQ);
                    wmma::load_matrix_sync(kt, K16 + bj * 16 * LQ + x0, LQ);
                    wmma::mma_sync(a_ij, a, kt, a_ij);
                }
                wmma::store_matrix_sync(F + bi * 16 * LF + bj * 16, a_ij, LF, wmma::mem_row_major);
            }
        }
        if (out) {
            // den[i] = s phi(q_i) . z: four lanes per row, fixed-order combine.
            for (int i = tid >> 2; i < C; i += blockDim.x >> 2) {
                float acc_z = 0.0f;
                if (norm) {
                    for (int x = tid & 3; x < DP; x += 4) acc_z = fmaf(to_float(Q16[i * LQ + x]), zs[x], acc_z);
                }
                acc_z += __shfl_xor_sync(0xffffffffu, acc_z, 1);
                acc_z += __shfl_xor_sync(0xffffffffu, acc_z, 2);
                if ((tid & 3) == 0) den[i] = acc_z;
            }
        }
        __syncthreads();

        // ---- (3) mask and round A, its row sums; z += colsum(phi(K)) -----
        // f16 also finishes each row's units here (and non-causal rows too).
        if (scores || (kScaled && out)) {
            // Row i, quarter q of the columns: four lanes per row again.
            const int tc = C / 4;
            for (int i = tid >> 2; i < C; i += blockDim.x >> 2) {
                const int j0 = (tid & 3) * tc;
                float sum = 0.0f, amax = 0.0f;
                if (scores) {
                    for (int j = j0; j < j0 + tc; ++j) {
                        if (j / 16 > i / 16) break;  // A V reads the lower block triangle only
                        const float aij = j <= i ? F[i * LF + j] : 0.0f;
                        sum += aij;
                        amax = fmaxf(amax, fabsf(aij));
                        A16[i * LA + j] = from_float<T>(aij);
                    }
                    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                }
                if constexpr (kScaled) {
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
                    int u = (int)rowq[i];
                    float inv_a = 1.0f;
                    if (pow2_out_of(amax, 0.0f, kAHi)) {  // uniform over the row's lanes; rare
                        const int ea = pow2_shift(amax, kATop);
                        inv_a = ldexpf(1.0f, -ea);
                        u += ea;
                        for (int j = j0; j < j0 + tc; ++j) {
                            if (j / 16 > i / 16) break;
                            A16[i * LA + j] = from_float<T>(j <= i ? F[i * LF + j] * inv_a : 0.0f);
                        }
                        // Exact (a power of two on f16 values) unless one drops below 2^-14.
                        for (int x = tid & 3; x < DP; x += 4) Q16[i * LQ + x] = from_float<T>(to_float(Q16[i * LQ + x]) * inv_a);
                    }
                    if ((tid & 3) == 0) {
                        const float dsum = (den[i] + sum) * inv_a;
                        // u = 0 (the common case) costs no ldexpf.
                        den[i] = norm ? dsum + (u == 0 ? p.eps : ldexpf(p.eps, -u)) : (u == 0 ? 1.0f : ldexpf(1.0f, u));
                    }
                } else {
                    if ((tid & 3) == 0) den[i] += sum;
                }
            }
        }
        if (causal) {
            for (int d = tid; d < DP; d += blockDim.x) {
                float acc_z = zs[d];
                for (int j = 0; j < rows; ++j) acc_z += to_float(K16[j * LQ + d]);
                zs[d] = acc_z;
            }
        }
        __syncthreads();

        // ---- (4) A V into the output fragments, outputs to F; S += K^T V --
        // f16 inputs on bf16 tiles (kSplitV): V16 holds v's high half first,
        // then its low half (exact: f16's 11 bits in two bf16 halves), and
        // both products take each; the outputs are stored after the second.
        auto a_times_v = [&](bool store) {
#pragma unroll
            for (int k = 0; k < kOutFrags; ++k) {
                const int t = warp + k * nwarps;
                if (t >= out_tiles) continue;
                const int bi = t / tiles_e, e0 = (t % tiles_e) * 16;
                if (scores) {
                    #pragma unroll 1
                    for (int bj = 0; bj <= bi; ++bj) {
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v;
                        wmma::load_matrix_sync(a, A16 + bi * 16 * LA + bj * 16, LA);
                        wmma::load_matrix_sync(v, V16 + bj * 16 * LV + e0, LV);
                        wmma::mma_sync(acc[k], a, v, acc[k]);
                    }
                }
                if (store) wmma::store_matrix_sync(F + bi * 16 * LF + e0, acc[k], LF, wmma::mem_row_major);
            }
        };
        // Rows past the sequence end are zero in K16 and V16.
        auto absorb_v = [&]() {
#pragma unroll 1
            for (int j0 = 0; j0 < C; j0 += 16) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v;
                if (share) wmma::load_matrix_sync(v, V16 + j0 * LV + e_own, LV);
#pragma unroll
                for (int k = 0; k < kStateFrags; ++k) {
                    const int t = warp + k * nwarps;
                    if (t >= state_tiles) continue;
                    const int d0 = (t / tiles_e) * 16, e0 = (t % tiles_e) * 16;
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> kt;
                    wmma::load_matrix_sync(kt, K16 + j0 * LQ + d0, LQ);
                    if (!share) wmma::load_matrix_sync(v, V16 + j0 * LV + e0, LV);
                    wmma::mma_sync(st[k], kt, v, st[k]);
                }
            }
        };
        if (out) {
            if constexpr (kScaled) q_times_s16();
            a_times_v(!kSplitV);
        }
        if (causal) absorb_v();
        if constexpr (kSplitV) {
            if (causal) {
                __syncthreads();  // every warp is done with v's high half
                for (int row = warp; row < C; row += nwarps)
                    load_row<In, T>(V16 + row * LV, vb + (t0 + row) * p.v_token_stride, mt, MT, row < rows, vec,
                                    [](float x) { return x - x == 0.0f ? x - to_float(from_float<T>(x)) : 0.0f; });
                __syncthreads();
            }
            if (out) a_times_v(true);
            if (causal) absorb_v();
        }
        if (causal) {
            if (out) {
                // f16 reads S16 in this step (phi(Q) S16 above): every warp
                // must be done with it before any publishes (uniform branch).
                if constexpr (kScaled) __syncthreads();
#pragma unroll
                for (int k = 0; k < kStateFrags; ++k) {
                    const int t = warp + k * nwarps;
                    if (t >= state_tiles) continue;
                    const int d0 = (t / tiles_e) * 16, e0 = (t % tiles_e) * 16;
                    wmma::store_matrix_sync(scratch, st[k], 16, wmma::mem_row_major);
                    __syncwarp();
                    const float back = publish_tile<T>(scratch, S16 + d0 * LV + e0, LV);
                    if (lane == 0) scales[t] = back;
                    __syncwarp();
                }
            }
        }
        __syncthreads();
        if (out) {
            pending_t0 = t0;
            pending_rows = rows;
        }
    }
    if (pending_rows > 0) write_outputs(pending_t0, pending_rows);

    // ---- final state of the walk --------------------------------------------
    float* ss = nullptr;
    float* sz = nullptr;
    walk_state_sink(p, b, ss, sz);
    if (ss != nullptr) {
#pragma unroll
        for (int k = 0; k < kStateFrags; ++k) {
            const int t = warp + k * nwarps;
            if (t >= state_tiles) continue;
            const int d0 = (t / tiles_e) * 16, e0 = (t % tiles_e) * 16;
            wmma::store_matrix_sync(scratch, st[k], 16, wmma::mem_row_major);
            __syncwarp();
            for (int i = lane; i < kScratch; i += 32) {
                const int d = d0 + i / 16, e = e0 + i % 16;
                if (d < D && e < mt) ss[(int64_t)d * M + m0 + e] = scratch[i];
            }
            __syncwarp();
        }
        if (b.tile == 0) {
            for (int d = tid; d < D; d += blockDim.x) sz[d] = zs[d];
        }
    }
}

}  // namespace linattn
