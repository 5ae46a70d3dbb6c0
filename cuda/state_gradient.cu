// state_gradient.cu: a gradient flowing into a piece's final state, added
// to the piece's dk and dv (context parallelism's backward,
// docs/context-parallel.md).
//
// A piece's final state is S_F = S_0 + sum_j phi(k_j) v_j^T and
// z_F = z_0 + sum_j phi(k_j), for causal and non-causal attention alike, so
// a gradient (G_S, G_z) flowing into it adds, for every token j of the piece,
//   dk_j += phi'(k_j) * (G_S v_j + G_z)      (D values)
//   dv_j += G_S^T phi(k_j)                   (M values)
// and nothing to dq (no query reaches the final state) or to the gradient of
// S_0 beyond G itself. Those are exactly the terms by which the backward
// with d_final = G differs from the backward without it.
//
// Params: LinattnBackwardParams (read: k, v, d_final_s, d_final_z,
// cu_seqlens, sizes, the strides of k and v; read and written: dk with k's
// strides, dv with v's; `tiles` = D tiles + M tiles of kTile). Grid x:
// seq-heads x tiles, blockIdx.x = sh * tiles + tile: tiles below the D
// tiles own kTile rows of dk, the others kTile columns of dv. Grid y: token
// groups, each block striding over its sequence's tokens by gridDim.y x 8.
// Block: 256 threads, 8 warps, a token per warp at a time, a lane per row
// (dk) or column (dv); fp32 FMA, sums in a fixed order (deterministic).
// Shared memory (the plan's `state_gradient_shared_bytes` mirrors it): the
// block's slice of G_S (kTile x ld with ld = M rounded up to an odd count
// against bank conflicts, or D x kTile), then one fp32 row per warp (v_j for
// dk, phi(k_j) for dv; M or D floats).
#include <cstdint>
#include "linattn/params.h"
#include "linattn/dtype.cuh"
#include "linattn/coords.cuh"
#include "linattn/feature_map.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;

template <typename T>
__device__ __forceinline__ void state_gradient_body(const LinattnBackwardParams& p, float* smem) {
    using namespace linattn;
    const SeqHeadTile g = seq_head_tile(p.tiles, p.heads);
    const SeqRange r = seq_range(p.cu_seqlens, (int64_t)g.seq, p.tokens);
    const int D = (int)p.d, M = (int)p.m;
    const int d_tiles = (D + kTile - 1) / kTile;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* gs = ptr<const float>(p.d_final_s) + g.sh * (int64_t)D * M;
    const float* gz = ptr<const float>(p.d_final_z) + g.sh * (int64_t)D;
    const int64_t k_base = r.batch * p.k_batch_stride + g.head * p.k_head_stride;
    const int64_t v_base = r.batch * p.v_batch_stride + g.head * p.v_head_stride;
    const T* k = ptr<const T>(p.k) + k_base;
    const T* v = ptr<const T>(p.v) + v_base;
    const int64_t first = (int64_t)blockIdx.y * kWarps + warp;
    const int64_t step = (int64_t)gridDim.y * kWarps;
    if (g.tile < d_tiles) {
        // dk rows d0 .. d0 + rows: G_S rows in shared memory, lane = row.
        T* dk = ptr<T>(p.dk) + k_base;
        const int d0 = g.tile * kTile;
        const int rows = min(kTile, D - d0);
        const int ld = M | 1;
        float* gsr = smem;
        float* vrow = smem + kTile * ld + warp * M;
        for (int i = threadIdx.x; i < rows * M; i += kThreads) {
            const int x = i / M, e = i - x * M;
            gsr[x * ld + e] = gs[(int64_t)(d0 + x) * M + e];
        }
        const float gzx = lane < rows ? gz[d0 + lane] : 0.0f;
        __syncthreads();
        for (int64_t t = first; t < r.len; t += step) {
            const int64_t tok = r.start + t;
            const T* vt = v + tok * p.v_token_stride;
            for (int e = lane; e < M; e += 32) vrow[e] = to_float(vt[e]);
            __syncwarp();
            if (lane < rows) {
                const float* gx = gsr + lane * ld;
                float acc = gzx;
                for (int e = 0; e < M; ++e) acc = fmaf(gx[e], vrow[e], acc);
                const int64_t at = tok * p.k_token_stride + d0 + lane;
                const float kx = to_float(k[at]);
                dk[at] = from_float<T>(fmaf(phi_prime(kx, p.feature_map), acc, to_float(dk[at])));
            }
            __syncwarp();
        }
    } else {
        // dv columns m0 .. m0 + cols: G_S columns in shared memory, lane = column.
        T* dv = ptr<T>(p.dv) + v_base;
        const int m0 = (g.tile - d_tiles) * kTile;
        const int cols = min(kTile, M - m0);
        float* gsc = smem;
        float* krow = smem + D * kTile + warp * D;
        for (int i = threadIdx.x; i < D * kTile; i += kThreads) {
            const int x = i / kTile, e = i - x * kTile;
            gsc[i] = e < cols ? gs[(int64_t)x * M + m0 + e] : 0.0f;
        }
        __syncthreads();
        for (int64_t t = first; t < r.len; t += step) {
            const int64_t tok = r.start + t;
            const T* kt = k + tok * p.k_token_stride;
            for (int x = lane; x < D; x += 32) krow[x] = phi(to_float(kt[x]), p.feature_map);
            __syncwarp();
            if (lane < cols) {
                float acc = 0.0f;
                for (int x = 0; x < D; ++x) acc = fmaf(gsc[x * kTile + lane], krow[x], acc);
                const int64_t at = tok * p.v_token_stride + m0 + lane;
                dv[at] = from_float<T>(to_float(dv[at]) + acc);
            }
            __syncwarp();
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) state_gradient_f32(const LinattnBackwardParams p) {
    extern __shared__ __align__(16) float smem[];
    state_gradient_body<float>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256) state_gradient_f16(const LinattnBackwardParams p) {
    extern __shared__ __align__(16) float smem[];
    state_gradient_body<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256) state_gradient_bf16(const LinattnBackwardParams p) {
    extern __shared__ __align__(16) float smem[];
    state_gradient_body<__nv_bfloat16>(p, smem);
}
