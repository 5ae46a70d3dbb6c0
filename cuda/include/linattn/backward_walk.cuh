// The chunked linear-attention backward of backward.cu (both kinds)
// (math: docs/linear-attention.md, "Gradients in
// constant memory"; notation qh = s phi(q), kh = phi(k), G = dL/do).
//
// Nothing is saved by the forward besides its inputs (q, k, v, the initial
// state); four kernels recompute what they need, each walking the chunks
// with one fp32 state slice on chip:
//
//   prep (blocks tile M): the forward again, S[:, m-tile] and z: per token
//        den_i = qh_i . z_i + eps and the partial G_i[m-tile] . num_i[m-tile],
//        into fp32 workspaces (one value per token, per tile for the partial).
//        dden_i = -(G_i . num_i) / den_i^2 with the partials added in tile
//        order by whoever reads it (fixed order: deterministic).
//   dq   (blocks tile D): forward prefix walk of S[d-tile, :] and z[d-tile]:
//        dqh_i = S_prev dnum_i + dden_i z_prev + sum_{j<=i in chunk} kh_j B_ij
//        with dnum_i = G_i / den_i and B_ij = dnum_i . v_j + dden_i.
//   dk   (blocks tile D): reverse walk of the suffix state
//        dS[d-tile, :] = dS_N + sum_{i>=j} qh_i dnum_i^T, dz = dz_N + sum dden_i qh_i:
//        dkh_j = dS_next v_j + dz_next + sum_{i>=j in chunk} qh_i B_ij;
//        the walk ends at dS~_0, which is the initial state's gradient.
//   dv   (blocks tile M): reverse walk of dS[:, m-tile]:
//        dv_j = dS_next^T kh_j + sum_{i>=j in chunk} dnum_i A_ij, A_ij = qh_i . kh_j.
//
//   dkv  (f16/bf16 small heads, in place of dk and dv; backward_mma.cuh):
//        one reverse walk, one block per sequence-head owning the whole dS.
//
// Tiling D for dq/dk and M for dv means every gradient element is produced
// by exactly one block: no cross-block reduction of gradients. The non-causal kernels
// run the same bodies: a first sweep sums the whole sequence's state, the
// second sweep reads it out with no intra-chunk terms.
//
// This file has the shared helpers and the fp32 FMA bodies (prep_fma,
// dqk_fma for dq and dk, dv_fma), used for fp32 inputs; f16/bf16 run the
// tensor-core bodies of linattn/backward_mma.cuh, which also dispatches.
// Every body works in a fixed order, so results are bit-identical run to
// run (no atomics).
#pragma once
#include <cstdint>
#include "linattn/params.h"
#include "linattn/carve.cuh"
#include "linattn/coords.cuh"
#include "linattn/dtype.cuh"
#include "linattn/feature_map.cuh"

namespace linattn {
namespace bwd {

constexpr int kThreads = 256;

// One block's coordinates: sequence-head, tile along D or M, the sequence.
struct Coords {
    int64_t sh;
    int64_t head;
    int tile;
    SeqRange r;
};

__device__ __forceinline__ Coords coords(const LinattnBackwardParams& p) {
    const SeqHeadTile g = seq_head_tile(p.tiles, p.heads);
    Coords c;
    c.tile = g.tile;
    c.sh = g.sh;
    c.head = g.head;
    c.r = seq_range(p.cu_seqlens, g.seq, p.tokens);
    if (p.num_parts > 1) {
        // A split whole-head walk: partition blockIdx.y of the sequence.
        const int64_t off = (int64_t)blockIdx.y * p.part_len;
        const int64_t left = c.r.len - off;
        c.r.start += off;
        c.r.len = left < 0 ? 0 : (left < p.part_len ? left : p.part_len);
    }
    return c;
}

// Where a whole-head walk's state starts (`sh`'s state_in / d_final for one
// partition, or its work slot) and whether it only sums its partition's
// state (from zero) into that slot. `in_s`, `in_z`: the unsplit source.
struct StateSlot {
    const float* s;  // D x M rows at `index`, or null for zeros
    const float* z;
    int64_t index;
    bool partials;
};

__device__ __forceinline__ StateSlot state_slot(const LinattnBackwardParams& p, const Coords& c, linattn_ptr in_s,
                                                linattn_ptr in_z) {
    StateSlot o;
    o.partials = p.state_mode == LINATTN_BWD_PARTIALS;
    if (p.state_mode == LINATTN_BWD_WHOLE) {
        o.s = ptr<const float>(in_s);
        o.z = ptr<const float>(in_z);
        o.index = c.sh;
    } else {
        o.s = o.partials ? nullptr : ptr<const float>(p.work_s);
        o.z = o.partials ? nullptr : ptr<const float>(p.work_z);
        o.index = c.sh * p.num_parts + blockIdx.y;
    }
    return o;
}

// The fixed-order combine of a split walk's partition sums: every work
// slot of a sequence-head becomes state_in plus the partitions before it
// (PREFIX: S, z for the causal prep + dq walk), d_final plus the partitions
// after it (SUFFIX: dS, dz for the causal dk + dv walk), or the total from
// either (TOTAL_IN, TOTAL_FINAL: the non-causal walks). One thread per
// element (e < d*m of S, else of z), grid x = seq-heads x p.tiles blocks of
// blockDim.x.
__device__ __forceinline__ void backward_state_scan(const LinattnBackwardParams& p) {
    const int64_t dm = p.d * p.m;
    const int64_t sh = blockIdx.x / (unsigned)p.tiles;
    const int64_t e = (int64_t)(blockIdx.x - sh * p.tiles) * blockDim.x + threadIdx.x;
    if (e >= dm + p.d) return;
    const int mode = p.state_mode;
    const bool suffix = mode == LINATTN_BWD_SCAN_SUFFIX;
    const bool total = mode == LINATTN_BWD_SCAN_TOTAL_IN || mode == LINATTN_BWD_SCAN_TOTAL_FINAL;
    const bool from_final = suffix || mode == LINATTN_BWD_SCAN_TOTAL_FINAL;
    const bool in_s = e < dm;
    const int64_t per = in_s ? dm : p.d, x = in_s ? e : e - dm;
    const float* src = ptr<const float>(in_s ? (from_final ? p.d_final_s : p.state_in_s)
                                             : (from_final ? p.d_final_z : p.state_in_z));
    float* w = ptr<float>(in_s ? p.work_s : p.work_z) + sh * p.num_parts * per + x;
    float acc = src != nullptr ? src[sh * per + x] : 0.0f;
    for (int k = 0; k < p.num_parts; ++k) {
        float* slot = w + (suffix ? p.num_parts - 1 - k : k) * per;
        const float part = *slot;
        if (!total) *slot = acc;
        acc += part;
    }
    if (total) {
        for (int k = 0; k < p.num_parts; ++k) w[k * per] = acc;
    }
}

// Row of token t (absolute in its batch entry) in the per-token workspaces.
__device__ __forceinline__ int64_t work_row(const LinattnBackwardParams& p, const Coords& c, int64_t t) {
    return (c.r.batch * p.tokens + t) * p.heads + c.head;
}

// Rows of the per-token workspaces.
__device__ __forceinline__ int64_t work_rows(const LinattnBackwardParams& p) {
    return (p.cu_seqlens != 0 ? 1 : p.num_seqs) * p.tokens * p.heads;
}

// The sum over a warp, as lane 0 computes it, broadcast to every lane (a
// fixed reduction tree, so every lane gets the same bits).
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    return __shfl_sync(0xffffffffu, x, 0);
}

__device__ __forceinline__ int odd(int n) { return n | 1; }

// Writes rows d0 .. d0 + rows of the initial state's gradient (dS~_0 from
// the block's fp32 suffix state Ss, row stride ld, and dz~_0 from zs), when
// the caller asked for it. Used by the dk walks (FMA and tensor cores) and
// the merged dk + dv walk.
__device__ __forceinline__ void store_d_initial(const LinattnBackwardParams& p, const Coords& c, int d0, int rows,
                                                const float* Ss, int ld, const float* zs) {
    if (p.d_initial_s == 0) return;
    const int D = (int)p.d, M = (int)p.m;
    float* ss = ptr<float>(p.d_initial_s);
    float* sz = ptr<float>(p.d_initial_z);
    for (int i = threadIdx.x; i < rows * M; i += blockDim.x) {
        const int x = i / M, e = i - x * M;
        ss[(c.sh * D + d0 + x) * M + e] = Ss[x * ld + e];
    }
    for (int x = threadIdx.x; x < rows; x += blockDim.x) sz[c.sh * D + d0 + x] = zs[x];
}

// The fp32 FMA walks' causal scores of one chunk: As[i][j] (row stride ldc)
// = qh_i . kh_j for j <= i < rows, zero above the diagonal; q and k rows of
// length d at row stride dp. Used by the prep and dv walks.
__device__ __forceinline__ void causal_scores_fma(float* As, int ldc, const float* Qs, const float* Ks, int dp, int d,
                                                  int rows) {
    for (int i = threadIdx.x; i < rows * rows; i += blockDim.x) {
        const int ii = i / rows, j = i - ii * rows;
        float a = 0.0f;
        if (j <= ii) {
            const float* q = Qs + ii * dp;
            const float* k = Ks + j * dp;
            for (int x = 0; x < d; ++x) a = fmaf(q[x], k[x], a);
        }
        As[ii * ldc + j] = a;
    }
}

// Start of the last chunk of a sequence (-1 when it is empty), without a
// 64-bit division (a called subroutine on the GPU): the walk after it visits
// every chunk anyway.
__device__ __forceinline__ int64_t last_chunk(int64_t len, int chunk) {
    if (len <= 0) return -1;
    int64_t c0 = 0;
    while (c0 + chunk < len) c0 += chunk;
    return c0;
}

// Pointers to the (batch, head) rows of one tensor.
template <typename T>
__device__ __forceinline__ const T* rows_of(linattn_ptr base, const Coords& c, int64_t bs, int64_t hs) {
    return ptr<const T>(base) + c.r.batch * bs + c.head * hs;
}
template <typename T>
__device__ __forceinline__ T* rows_of_mut(linattn_ptr base, const Coords& c, int64_t bs, int64_t hs) {
    return ptr<T>(base) + c.r.batch * bs + c.head * hs;
}

// ---------------------------------------------------------------------------
// prep: the normaliser's pieces per token, recomputed like the forward.
// Blocks tile M (columns m0 .. m0 + tile); each walks the sequence with its
// slice of S and the whole z, and per token writes the partial
// G_i[tile] . num_i[tile] to work_dden (slot `tile`, row-major over tokens);
// tile 0 also writes den_i = s phi(q_i) . z_i + eps to work_den. The other
// kernels add the partials in tile order: d den_i = -(sum) / den_i^2.
// Shared: S (d x odd(tile)) | z (d) | qh, kh (C x odd(d) each) |
//         v (C x odd(tile)) | A (C x C) | qh . z_prev (C).
template <typename T>
__device__ __forceinline__ void prep_fma(const LinattnBackwardParams& p, float* smem) {
    const Coords c = coords(p);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
    const int D = (int)p.d, M = (int)p.m, C = p.chunk, DP = odd(D);
    const int MT = p.tile, MTP = odd(MT), m0 = c.tile * MT, mt = M - m0 < MT ? M - m0 : MT;
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    float* Ss = smem;
    float* zs = Ss + D * MTP;
    float* Qs = zs + D;
    float* Ks = Qs + C * DP;
    float* Vs = Ks + C * DP;
    float* As = Vs + C * MTP;
    float* qz = As + C * C;
    smem_end(smem, qz + C);
    for (int i = tid; i < D * mt; i += nthreads) {
        const int x = i / mt, e = i - x * mt;
        Ss[x * MTP + e] = p.state_in_s != 0 ? ptr<const float>(p.state_in_s)[(c.sh * D + x) * M + m0 + e] : 0.0f;
    }
    for (int x = tid; x < D; x += nthreads)
        zs[x] = p.state_in_z != 0 ? ptr<const float>(p.state_in_z)[c.sh * D + x] : 0.0f;
    const T* qb = rows_of<T>(p.q, c, p.q_batch_stride, p.q_head_stride);
    const T* kb = rows_of<T>(p.k, c, p.k_batch_stride, p.k_head_stride);
    const T* vb = rows_of<T>(p.v, c, p.v_batch_stride, p.v_head_stride) + m0;
    const T* gb = rows_of<T>(p.d_o, c, p.o_batch_stride, p.o_head_stride) + m0;
    float* wden = ptr<float>(p.work_den);
    float* wgo = ptr<float>(p.work_dden) + (int64_t)c.tile * work_rows(p);
    __syncthreads();

    for (int sweep = causal ? 1 : 0; sweep < 2; ++sweep) {
        const bool absorb = causal || sweep == 0;
        const bool emit = sweep == 1;
        for (int64_t c0 = 0; c0 < c.r.len; c0 += C) {
            const int rows = (int)(c.r.len - c0 < C ? c.r.len - c0 : C);
            const int64_t t0 = c.r.start + c0;
            for (int i = tid; i < rows * D; i += nthreads) {
                const int j = i / D, x = i - j * D;
                if (emit) Qs[j * DP + x] = phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm) * p.scale;
                if (absorb) Ks[j * DP + x] = phi(to_float(kb[(t0 + j) * p.k_token_stride + x]), fm);
            }
            if (absorb) {
                for (int i = tid; i < rows * mt; i += nthreads) {
                    const int j = i / mt, e = i - j * mt;
                    Vs[j * MTP + e] = to_float(vb[(t0 + j) * p.v_token_stride + e]);
                }
            }
            __syncthreads();
            if (emit) {
                if (causal) {
                    causal_scores_fma(As, C, Qs, Ks, DP, D, rows);
                }
                for (int i = tid; i < rows; i += nthreads) {
                    const float* q = Qs + i * DP;
                    float a = 0.0f;
                    for (int x = 0; x < D; ++x) a = fmaf(q[x], zs[x], a);
                    qz[i] = a;
                }
                __syncthreads();
                for (int i = warp; i < rows; i += nwarps) {
                    const float* q = Qs + i * DP;
                    const float* a = As + i * C;
                    float go = 0.0f;
                    const T* grow = gb + (t0 + i) * p.o_token_stride;
                    for (int e = lane; e < mt; e += 32) {
                        float num = 0.0f;
                        const float* sc = Ss + e;
                        for (int x = 0; x < D; ++x, sc += MTP) num = fmaf(q[x], *sc, num);
                        if (causal) {
                            const float* vc = Vs + e;
                            for (int j = 0; j <= i; ++j, vc += MTP) num = fmaf(a[j], *vc, num);
                        }
                        go = fmaf(to_float(grow[e]), num, go);
                    }
                    go = warp_sum(go);
                    float asum = 0.0f;
                    if (causal) {
                        for (int j = lane; j <= i; j += 32) asum += a[j];
                    }
                    asum = warp_sum(asum);
                    if (lane == 0) {
                        const int64_t row = work_row(p, c, t0 + i);
                        wgo[row] = go;
                        if (c.tile == 0) wden[row] = qz[i] + asum + p.eps;
                    }
                }
                if (causal) __syncthreads();  // S and z are read above, updated below
            }
            if (absorb) {
                for (int i = tid; i < D * mt; i += nthreads) {
                    const int x = i / mt, e = i - x * mt;
                    float acc = Ss[x * MTP + e];
                    for (int j = 0; j < rows; ++j) acc = fmaf(Ks[j * DP + x], Vs[j * MTP + e], acc);
                    Ss[x * MTP + e] = acc;
                }
                for (int x = tid; x < D; x += nthreads) {
                    float acc = zs[x];
                    for (int j = 0; j < rows; ++j) acc += Ks[j * DP + x];
                    zs[x] = acc;
                }
            }
            __syncthreads();
        }
    }
}

// Loads rows of dnum = G / den (m columns from column m0, row stride ld) and
// dden for a chunk; without normalisation dnum = G and dden = 0.
template <typename T>
__device__ __forceinline__ void load_dnum(const LinattnBackwardParams& p, const Coords& c, const T* gb, int64_t t0,
                                          int rows, int m0, int mcols, int ld, float* Gs, float* dd) {
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const bool norm = p.normalize != 0;
    const float* wden = ptr<const float>(p.work_den);
    const float* wdden = ptr<const float>(p.work_dden);
    for (int i = tid; i < rows * mcols; i += nthreads) {
        const int j = i / mcols, e = i - j * mcols;
        const float g = to_float(gb[(t0 + j) * p.o_token_stride + m0 + e]);
        Gs[j * ld + e] = norm ? __fdividef(g, wden[work_row(p, c, t0 + j)]) : g;
    }
    if (dd != nullptr) {
        const int64_t nrows = work_rows(p);
        for (int j = tid; j < rows; j += nthreads) {
            float v = 0.0f;
            if (norm) {
                // d den = -(G . num) / den^2, the partials added in tile order.
                const int64_t row = work_row(p, c, t0 + j);
                float go = 0.0f;
                for (int t = 0; t < p.prep_tiles; ++t) go += wdden[t * nrows + row];
                const float den = wden[row];
                v = -__fdividef(__fdividef(go, den), den);
            }
            dd[j] = v;
        }
    }
}

// ---------------------------------------------------------------------------
// dq (forward prefix walk) and dk (reverse suffix walk), one body; blocks
// tile D (rows d0 .. d0 + tile of S or dS). kDk selects dk, which also
// writes the initial state's gradient (dS0 rows, dz0) at the end.
//   dq: X = kh, absorbs S += kh^T v, z += kh; emits
//       dqh_i = S_prev dnum_i + dden_i z_prev + sum_{j<=i} B_ij kh_j.
//   dk: X = qh, absorbs dS += qh^T dnum, dz += dden qh; emits
//       dkh_j = dS_next v_j + dz_next + sum_{i>=j} B_ij qh_i.
// Shared: S (tile x odd(m)) | z (tile) | X (C x tile) | v (C x odd(m)) |
//         dnum (C x odd(m)) | B (C x C) | dden (C).
template <typename T, bool kDk>
__device__ __forceinline__ void dqk_fma(const LinattnBackwardParams& p, float* smem) {
    const Coords c = coords(p);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int D = (int)p.d, M = (int)p.m, C = p.chunk, MP = odd(M);
    const int DT = p.tile, d0 = c.tile * DT, dt = D - d0 < DT ? D - d0 : DT;
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    float* Ss = smem;
    float* zs = Ss + DT * MP;
    float* Xs = zs + DT;
    float* Vs = Xs + C * DT;
    float* Gs = Vs + C * MP;
    float* Bs = Gs + C * MP;
    float* dd = Bs + C * C;
    smem_end(smem, dd + C);
    const float* s_in = ptr<const float>(kDk ? p.d_final_s : p.state_in_s);
    const float* z_in = ptr<const float>(kDk ? p.d_final_z : p.state_in_z);
    for (int i = tid; i < dt * M; i += nthreads) {
        const int x = i / M, e = i - x * M;
        Ss[x * MP + e] = s_in != nullptr ? s_in[(c.sh * D + d0 + x) * M + e] : 0.0f;
    }
    for (int x = tid; x < dt; x += nthreads) zs[x] = z_in != nullptr ? z_in[c.sh * D + d0 + x] : 0.0f;
    const T* qb = rows_of<T>(p.q, c, p.q_batch_stride, p.q_head_stride) + d0;
    const T* kb = rows_of<T>(p.k, c, p.k_batch_stride, p.k_head_stride) + d0;
    const T* vb = rows_of<T>(p.v, c, p.v_batch_stride, p.v_head_stride);
    const T* gb = rows_of<T>(p.d_o, c, p.o_batch_stride, p.o_head_stride);
    T* outb = kDk ? rows_of_mut<T>(p.dk, c, p.k_batch_stride, p.k_head_stride) + d0
                  : rows_of_mut<T>(p.dq, c, p.q_batch_stride, p.q_head_stride) + d0;
    const T* xb = kDk ? qb : kb;
    const int64_t xstride = kDk ? p.q_token_stride : p.k_token_stride;
    const float xscale = kDk ? p.scale : 1.0f;
    const float* Ps = kDk ? Vs : Gs;  // S's partner in the emitted product
    const float* Us = kDk ? Gs : Vs;  // X's partner in the state update
    __syncthreads();

    const int64_t last = last_chunk(c.r.len, C);
    for (int sweep = causal ? 1 : 0; sweep < 2; ++sweep) {
        const bool absorb = causal || sweep == 0;
        const bool emit = sweep == 1;
        // dq needs dnum to emit and v to absorb; dk the other way round.
        const bool load_g = kDk ? absorb : emit;
        const bool load_v = kDk ? emit : absorb;
        for (int64_t c0 = kDk ? last : 0; kDk ? c0 >= 0 : c0 < c.r.len; c0 += kDk ? -C : C) {
            const int rows = (int)(c.r.len - c0 < C ? c.r.len - c0 : C);
            const int64_t t0 = c.r.start + c0;
            if (absorb) {
                for (int i = tid; i < rows * dt; i += nthreads) {
                    const int j = i / dt, x = i - j * dt;
                    Xs[j * DT + x] = phi(to_float(xb[(t0 + j) * xstride + x]), fm) * xscale;
                }
            }
            if (load_v) {
                for (int i = tid; i < rows * M; i += nthreads) {
                    const int j = i / M, e = i - j * M;
                    Vs[j * MP + e] = to_float(vb[(t0 + j) * p.v_token_stride + e]);
                }
            }
            if (load_g) load_dnum<T>(p, c, gb, t0, rows, 0, M, MP, Gs, dd);
            __syncthreads();
            if (emit) {
                if (causal) {
                    // B_ij = dnum_i . v_j + dden_i for j <= i.
                    for (int i = tid; i < rows * rows; i += nthreads) {
                        const int ii = i / rows, j = i - ii * rows;
                        float b = 0.0f;
                        if (j <= ii) {
                            const float* g = Gs + ii * MP;
                            const float* vv = Vs + j * MP;
#pragma unroll 4
                            for (int e = 0; e < M; ++e) b = fmaf(g[e], vv[e], b);
                            b += dd[ii];
                        }
                        Bs[ii * C + j] = b;
                    }
                    __syncthreads();
                }
                for (int i = tid; i < rows * dt; i += nthreads) {
                    const int j = i / dt, x = i - j * dt;
                    const float* s = Ss + x * MP;
                    const float* pr = Ps + j * MP;
                    float acc = 0.0f;
#pragma unroll 4
                    for (int e = 0; e < M; ++e) acc = fmaf(s[e], pr[e], acc);
                    if constexpr (kDk) {
                        acc += zs[x];
                        if (causal) {
                            for (int ii = j; ii < rows; ++ii) acc = fmaf(Bs[ii * C + j], Xs[ii * DT + x], acc);
                        }
                        const int64_t off = (t0 + j) * p.k_token_stride + x;
                        outb[off] = from_float<T>(phi_prime(to_float(kb[off]), fm) * acc);
                    } else {
                        acc = fmaf(dd[j], zs[x], acc);
                        if (causal) {
                            for (int jj = 0; jj <= j; ++jj) acc = fmaf(Bs[j * C + jj], Xs[jj * DT + x], acc);
                        }
                        const int64_t off = (t0 + j) * p.q_token_stride + x;
                        outb[off] = from_float<T>(p.scale * phi_prime(to_float(qb[off]), fm) * acc);
                    }
                }
                if (causal) __syncthreads();  // S and z are read above, updated below
            }
            if (absorb) {
                for (int i = tid; i < dt * M; i += nthreads) {
                    const int x = i / M, e = i - x * M;
                    float acc = Ss[x * MP + e];
#pragma unroll 4
                    for (int j = 0; j < rows; ++j) acc = fmaf(Xs[j * DT + x], Us[j * MP + e], acc);
                    Ss[x * MP + e] = acc;
                }
                for (int x = tid; x < dt; x += nthreads) {
                    float acc = zs[x];
                    for (int j = 0; j < rows; ++j) {
                        if constexpr (kDk) acc = fmaf(dd[j], Xs[j * DT + x], acc);
                        else acc += Xs[j * DT + x];
                    }
                    zs[x] = acc;
                }
            }
            __syncthreads();
        }
    }
    if (kDk) store_d_initial(p, c, d0, dt, Ss, MP, zs);
}

// ---------------------------------------------------------------------------
// dv: reverse walk, blocks tile M (columns m0 .. m0 + tile of dS).
// Shared: dS (d x odd(tile)) | qh (C x odd(d)) | kh (C x odd(d)) |
//         dnum (C x odd(tile)) | A (C x C).
template <typename T>
__device__ __forceinline__ void dv_fma(const LinattnBackwardParams& p, float* smem) {
    const Coords c = coords(p);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int D = (int)p.d, M = (int)p.m, C = p.chunk, DP = odd(D);
    const int MT = p.tile, MTP = odd(MT), m0 = c.tile * MT, mt = M - m0 < MT ? M - m0 : MT;
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    float* Ss = smem;
    float* Qs = Ss + D * MTP;
    float* Ks = Qs + C * DP;
    float* Gs = Ks + C * DP;
    float* As = Gs + C * MTP;
    smem_end(smem, As + C * C);
    for (int i = tid; i < D * mt; i += nthreads) {
        const int x = i / mt, e = i - x * mt;
        Ss[x * MTP + e] = p.d_final_s != 0 ? ptr<const float>(p.d_final_s)[(c.sh * D + x) * M + m0 + e] : 0.0f;
    }
    const T* qb = rows_of<T>(p.q, c, p.q_batch_stride, p.q_head_stride);
    const T* kb = rows_of<T>(p.k, c, p.k_batch_stride, p.k_head_stride);
    const T* gb = rows_of<T>(p.d_o, c, p.o_batch_stride, p.o_head_stride);
    T* dvb = rows_of_mut<T>(p.dv, c, p.v_batch_stride, p.v_head_stride) + m0;
    __syncthreads();

    const int64_t last = last_chunk(c.r.len, C);
    for (int sweep = causal ? 1 : 0; sweep < 2; ++sweep) {
        const bool absorb = causal || sweep == 0;
        const bool emit = sweep == 1;
        for (int64_t c0 = last; c0 >= 0; c0 -= C) {
            const int rows = (int)(c.r.len - c0 < C ? c.r.len - c0 : C);
            const int64_t t0 = c.r.start + c0;
            if (absorb) {
                for (int i = tid; i < rows * D; i += nthreads) {
                    const int j = i / D, x = i - j * D;
                    Qs[j * DP + x] = phi(to_float(qb[(t0 + j) * p.q_token_stride + x]), fm) * p.scale;
                }
                load_dnum<T>(p, c, gb, t0, rows, m0, mt, MTP, Gs, nullptr);
            }
            if (emit) {
                for (int i = tid; i < rows * D; i += nthreads) {
                    const int j = i / D, x = i - j * D;
                    Ks[j * DP + x] = phi(to_float(kb[(t0 + j) * p.k_token_stride + x]), fm);
                }
            }
            __syncthreads();
            if (emit) {
                if (causal) {
                    causal_scores_fma(As, C, Qs, Ks, DP, D, rows);
                    __syncthreads();
                }
                for (int i = tid; i < rows * mt; i += nthreads) {
                    const int j = i / mt, e = i - j * mt;
                    const float* k = Ks + j * DP;
                    float acc = 0.0f;
                    for (int x = 0; x < D; ++x) acc = fmaf(Ss[x * MTP + e], k[x], acc);
                    if (causal) {
                        const float* a = As + j * C + j;
                        const float* g = Gs + j * MTP + e;
                        for (int ii = j; ii < rows; ++ii, a += C, g += MTP) acc = fmaf(*a, *g, acc);
                    }
                    dvb[(t0 + j) * p.v_token_stride + e] = from_float<T>(acc);
                }
                if (causal) __syncthreads();
            }
            if (absorb) {
                for (int i = tid; i < D * mt; i += nthreads) {
                    const int x = i / mt, e = i - x * mt;
                    float acc = Ss[x * MTP + e];
                    for (int ii = 0; ii < rows; ++ii) acc = fmaf(Qs[ii * DP + x], Gs[ii * MTP + e], acc);
                    Ss[x * MTP + e] = acc;
                }
            }
            __syncthreads();
        }
    }
}

}  // namespace bwd
}  // namespace linattn
