// Tensor-core pieces of the chunk walk (linattn/chunk_walk.cuh), all on
// nvcuda::wmma 16x16x16 fragments with fp32 accumulation: the causal scores
// A = phi(Q_c) phi(K_c)^T (16-bit phi(Q), phi(K) tiles), the intra-chunk
// numerators A V_c (A rounded to 16-bit after masking) and the state update
// S (fp32, D x MT) += phi(K_c)^T V_c. Used for f16/bf16
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

// Causal scores of one chunk, lower block triangle only: A[i][j] (fp32, C x
// C, ldm C) = sum_x Q16[i][x] * K16[j][x] for the 16 x 16 tiles with block
// row >= block column; one warp per tile. Q16 and K16 are C x D row-major
// (K16 read as the column-major B = K^T). Tiles above the diagonal are not
// written (the readers never look at them).
template <typename T>
__device__ __forceinline__ void scores_mma(float* A, const T* Q16, const T* K16, int D, int C) {
    if constexpr (WalkMma<T>::available) {
        using namespace nvcuda;
        const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
        const int tc = C / 16, tiles = tc * (tc + 1) / 2;
        for (int t = warp; t < tiles; t += nwarps) {
            // t -> (bi, bj) with bj <= bi, row by row of the lower triangle.
            int bi = 0;
            while ((bi + 1) * (bi + 2) / 2 <= t) ++bi;
            const int bj = t - bi * (bi + 1) / 2;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (int x0 = 0; x0 < D; x0 += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                wmma::load_matrix_sync(a, Q16 + bi * 16 * D + x0, D);
                wmma::load_matrix_sync(b, K16 + bj * 16 * D + x0, D);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(A + bi * 16 * C + bj * 16, acc, C, wmma::mem_row_major);
        }
    } else {
        (void)A; (void)Q16; (void)K16; (void)D; (void)C;
    }
}

// Intra-chunk numerators O (fp32, C x MT, ldm MT) = A16 V16 over the lower
// block triangle: O[i][e] = sum_{j-block <= i-block} A16[i][j] * V16[j][e],
// one warp per 16 x 16 output tile, j-blocks in increasing order. A16 is the
// masked C x C score matrix rounded to T (zero above the diagonal inside the
// diagonal blocks), V16 is C x MT row-major.
template <typename T>
__device__ __forceinline__ void scores_times_v_mma(float* O, const T* A16, const T* V16, int C, int MT) {
    if constexpr (WalkMma<T>::available) {
        using namespace nvcuda;
        const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
        const int tiles_e = MT / 16, tiles = (C / 16) * tiles_e;
        for (int t = warp; t < tiles; t += nwarps) {
            const int bi = t / tiles_e, e0 = (t % tiles_e) * 16;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (int bj = 0; bj <= bi; ++bj) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                wmma::load_matrix_sync(a, A16 + bi * 16 * C + bj * 16, C);
                wmma::load_matrix_sync(b, V16 + bj * 16 * MT + e0, MT);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(O + bi * 16 * MT + e0, acc, MT, wmma::mem_row_major);
        }
    } else {
        (void)O; (void)A16; (void)V16; (void)C; (void)MT;
    }
}

}  // namespace linattn
