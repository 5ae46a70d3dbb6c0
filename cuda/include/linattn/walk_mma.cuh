// Tensor-core pieces of the chunk walk (linattn/chunk_walk.cuh): the state
// update S (fp32, D x MT) += phi(K_c)^T V_c with 16-bit phi(K) and V tiles,
// fp32 accumulation, on nvcuda::wmma 16x16x16 fragments. Used for f16/bf16
// inputs when D, the chunk C and the value tile MT are all multiples of 16;
// the FMA loop covers every other case. Fragment tiles are walked in a fixed
// order, so results stay bit-identical run to run.
#pragma once
#include <mma.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace linattn {

template <typename T> struct WalkMma { static constexpr bool available = false; };
template <> struct WalkMma<__half> { static constexpr bool available = true; };
template <> struct WalkMma<__nv_bfloat16> { static constexpr bool available = true; };

// Mirrors `uses_mma` in crates/kernels/src/ops/forward.rs (shared memory sizing).
template <typename T>
__device__ __forceinline__ bool use_walk_mma(int d, int chunk, int m_tile) {
    return WalkMma<T>::available && d % 16 == 0 && chunk % 16 == 0 && m_tile % 16 == 0;
}

// S[d][e] (row-major, ldm MT) += sum_j K16[j][d] * V16[j][e] over C rows;
// one warp per 16 x 16 tile of S. K16 is C x D row-major (read as the
// column-major A = K^T), V16 is C x MT row-major.
template <typename T>
__device__ __forceinline__ void state_update_mma(float* S, const T* K16, const T* V16, int D, int C, int MT) {
    if constexpr (WalkMma<T>::available) {
        using namespace nvcuda;
        const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
        const int tiles_e = MT / 16, tiles = (D / 16) * tiles_e;
        for (int t = warp; t < tiles; t += nwarps) {
            const int d0 = (t / tiles_e) * 16, e0 = (t % tiles_e) * 16;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, S + d0 * MT + e0, MT, wmma::mem_row_major);
            for (int j0 = 0; j0 < C; j0 += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                wmma::load_matrix_sync(a, K16 + j0 * D + d0, D);
                wmma::load_matrix_sync(b, V16 + j0 * MT + e0, MT);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(S + d0 * MT + e0, acc, MT, wmma::mem_row_major);
        }
    } else {
        (void)S; (void)K16; (void)V16; (void)D; (void)C; (void)MT;
    }
}

}  // namespace linattn
