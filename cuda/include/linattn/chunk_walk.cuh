// The chunked linear-attention walk of forward.cu (both kinds), and the
// fixed-order combine of per-partition states.
//
// One block owns one (sequence-head sh, value tile, partition) triple and
// keeps its slice of the fp32 state on chip: S[:, m0 .. m0+m_tile] (d x
// m_tile) and the whole z (d), so no block ever needs another's results. It
// walks its partition in chunks of C rows:
//
//   A      = (s phi(Q_c)) phi(K_c)^T, masked to j <= i           (C x C)
//   num    = s phi(Q_c) S + A V_c                                  (C x m_tile)
//   den    = s phi(Q_c) z + A 1                                    (C)
//   S     += phi(K_c)^T V_c ;  z += phi(K_c)^T 1
//
// The same body, by its flags, is the state-on-chip causal walk, the
// per-partition state pass (no outputs), the causal split read-out (start
// from the partition's prefix state) and the non-causal read-out (fixed S).
//
// Arithmetic is fp32 FMA in a fixed order, so results are bit-identical run
// to run. The f32 kernels run this walk; 16-bit inputs take the tensor-core
// walk of linattn/walk_mma.cuh (same flags, same block coordinates).
#pragma once
#include <cstdint>
#include "linattn/params.h"
#include "linattn/carve.cuh"
#include "linattn/dtype.cuh"
#include "linattn/feature_map.cuh"
#include "linattn/walk_common.cuh"

namespace linattn {

constexpr int kWalkThreads = 256;
constexpr int kScanThreads = 256;

// Row stride (in floats) of the q/k chunk tiles: odd, so the rows that
// neighbouring threads read in the score loop fall in different banks.
__device__ __forceinline__ int padded_row(int d) { return d | 1; }

// Fixed-order fp32 dot product of two shared-memory rows.
__device__ __forceinline__ float dot_rows(const float* a, const float* b, int n) {
    float acc = 0.0f;
#pragma unroll 4
    for (int x = 0; x < n; ++x) acc = fmaf(a[x], b[x], acc);
    return acc;
}

template <typename T>
__device__ __forceinline__ void chunk_walk(const LinattnForwardParams& p, float* smem) {
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    const WalkBlock b = walk_block(p);
    if (!b.active) return;
    const int64_t t_begin = b.t_begin;
    const int64_t t_end = b.t_end;
    const SeqRange r = b.r;
    const int64_t head = b.head;

    const int D = (int)p.d;
    const int M = (int)p.m;
    const int C = p.chunk;
    const int MT = p.m_tile;
    const int DP = padded_row(D);
    const int m0 = b.tile * MT;
    const int mt = M - m0 < MT ? M - m0 : MT;  // valid columns of this tile

    // Shared memory (the plan's `walk_shared_bytes` mirrors it):
    float* Ss = smem;            // D x MT
    float* zs = Ss + D * MT;     // D
    float* Qs = zs + D;          // C x DP: s * phi(q)
    float* Ks = Qs + C * DP;     // C x DP: phi(k)
    float* Vs = Ks + C * DP;     // C x MT: v
    float* As = Vs + C * MT;     // C x C scores
    float* qz = As + C * C;      // C: s phi(q) . z
    smem_end(smem, qz + C);

    // ---- starting state -------------------------------------------------
    const float* ls;
    const float* lz;
    walk_state_source(p, b, ls, lz);
    for (int i = tid; i < D * MT; i += nthreads) {
        const int d = i / MT, e = i % MT;
        Ss[i] = (ls != nullptr && e < mt) ? ls[(int64_t)d * M + m0 + e] : 0.0f;
    }
    for (int d = tid; d < D; d += nthreads) zs[d] = lz != nullptr ? lz[d] : 0.0f;
    __syncthreads();

    const T* qb = ptr<const T>(p.q) + r.batch * p.q_batch_stride + head * p.q_head_stride;
    const T* kb = ptr<const T>(p.k) + r.batch * p.k_batch_stride + head * p.k_head_stride;
    const T* vb = ptr<const T>(p.v) + r.batch * p.v_batch_stride + head * p.v_head_stride + m0;
    T* ob = ptr<T>(p.o) + r.batch * p.o_batch_stride + head * p.o_head_stride + m0;
    const int fm = p.feature_map;
    const bool causal = p.causal != 0;
    const bool out = p.write_output != 0;
    const bool norm = p.normalize != 0;

    for (int64_t c0 = t_begin; c0 < t_end; c0 += C) {
        const int rows = (int)(t_end - c0 < C ? t_end - c0 : C);
        const int64_t t0 = r.start + c0;  // first token of the chunk in the buffers
        // ---- load the chunk, feature map fused, zero-padded to C rows ----
        if (out) {
            for (int i = tid; i < C * D; i += nthreads) {
                const int row = i / D, x = i % D;
                Qs[row * DP + x] = row < rows ? phi(to_float(qb[(t0 + row) * p.q_token_stride + x]), fm) * p.scale : 0.0f;
            }
        }
        if (causal) {
            for (int i = tid; i < C * D; i += nthreads) {
                const int row = i / D, x = i % D;
                Ks[row * DP + x] = row < rows ? phi(to_float(kb[(t0 + row) * p.k_token_stride + x]), fm) : 0.0f;
            }
            for (int i = tid; i < C * MT; i += nthreads) {
                const int row = i / MT, e = i % MT;
                Vs[i] = (row < rows && e < mt) ? to_float(vb[(t0 + row) * p.v_token_stride + e]) : 0.0f;
            }
        }
        __syncthreads();

        if (out) {
            // ---- intra-chunk scores and the carried normaliser ----
            if (causal) {
                for (int i = tid; i < C * C; i += nthreads) {
                    const int ii = i / C, j = i % C;
                    As[i] = j <= ii ? dot_rows(Qs + ii * DP, Ks + j * DP, D) : 0.0f;
                }
            }
            if (norm) {
                for (int i = tid; i < C; i += nthreads) qz[i] = dot_rows(Qs + i * DP, zs, D);
            }
            __syncthreads();
            // ---- outputs of the chunk ----
            for (int i = tid; i < C * MT; i += nthreads) {
                const int ii = i / MT, e = i % MT;
                if (ii >= rows || e >= mt) continue;
                float num = 0.0f;
                const float* qrow = Qs + ii * DP;
#pragma unroll 4
                for (int d = 0; d < D; ++d) num = fmaf(qrow[d], Ss[d * MT + e], num);
                float den = norm ? qz[ii] : 0.0f;
                if (causal) {
                    const float* arow = As + ii * C;
                    for (int j = 0; j <= ii; ++j) {
                        num = fmaf(arow[j], Vs[j * MT + e], num);
                        den += arow[j];
                    }
                }
                // __fdividef: no IEEE slow-path call (whose ABI spills on sm_86/89), 2 ulp.
                const float o = norm ? __fdividef(num, den + p.eps) : num;
                ob[(t0 + ii) * p.o_token_stride + e] = from_float<T>(o);
            }
            if (causal) __syncthreads();  // S and z are read above, updated below
        }

        // ---- carry the chunk into the state ----
        if (causal) {
            for (int i = tid; i < D * MT; i += nthreads) {
                const int d = i / MT, e = i % MT;
                float acc = Ss[i];
#pragma unroll 4
                for (int j = 0; j < rows; ++j) acc = fmaf(Ks[j * DP + d], Vs[j * MT + e], acc);
                Ss[i] = acc;
            }
            for (int d = tid; d < D; d += nthreads) {
                float acc = zs[d];
                for (int j = 0; j < rows; ++j) acc += Ks[j * DP + d];
                zs[d] = acc;
            }
        }
        __syncthreads();
    }

    // ---- final state of the walk ----
    float* ss;
    float* sz;
    walk_state_sink(p, b, ss, sz);
    if (ss != nullptr) {
        for (int i = tid; i < D * MT; i += nthreads) {
            const int d = i / MT, e = i % MT;
            if (e < mt) ss[(int64_t)d * M + m0 + e] = Ss[i];
        }
        if (b.tile == 0) {
            for (int d = tid; d < D; d += nthreads) sz[d] = zs[d];
        }
    }
}

// Combines per-partition states in partition order (see LinattnStateScanParams).
__device__ __forceinline__ void state_scan(const LinattnStateScanParams& p) {
    const unsigned sh32 = blockIdx.x / (unsigned)p.blocks_per_state;
    const int64_t sh = sh32;
    const int64_t e = (int64_t)(blockIdx.x - sh32 * (unsigned)p.blocks_per_state) * blockDim.x + threadIdx.x;
    const int64_t DM = p.d * p.m;
    if (e >= DM + p.d) return;
    const SeqRange r = seq_range(p.cu_seqlens, (int64_t)(sh32 / (unsigned)p.heads), p.tokens);
    const int64_t nparts = (r.len + p.part_len - 1) / p.part_len;
    const bool is_z = e >= DM;
    const int64_t ez = e - DM;
    float* ws = ptr<float>(p.work_s);
    float* wz = ptr<float>(p.work_z);
    float acc = 0.0f;
    if (p.state_in_s != 0) acc = is_z ? ptr<const float>(p.state_in_z)[sh * p.d + ez] : ptr<const float>(p.state_in_s)[sh * DM + e];
    for (int64_t part = 0; part < nparts; ++part) {
        const int64_t slot = sh * p.num_parts + part;
        float* w = is_z ? wz + slot * p.d + ez : ws + slot * DM + e;
        const float x = *w;
        if (p.causal) *w = acc;
        acc += x;
    }
    if (!p.causal) {
        const int64_t slot = sh * p.num_parts;
        if (is_z) wz[slot * p.d + ez] = acc; else ws[slot * DM + e] = acc;
    }
    if (p.state_out_s != 0) {
        if (is_z) ptr<float>(p.state_out_z)[sh * p.d + ez] = acc; else ptr<float>(p.state_out_s)[sh * DM + e] = acc;
    }
}

}  // namespace linattn
