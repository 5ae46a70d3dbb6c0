// The tensor-core toolbox of the forward (linattn/walk_mma.cuh) and the
// backward (linattn/backward_mma.cuh) walks: padding to whole 16 x 16 wmma
// tiles, the warp maximum and power-of-two scale of an f16 tile, and the
// scaled fragment product that undoes it.
//
// f16 tiles: every 16 x 16 tile of a rounded fp32 operand (a state, dnum, a
// score block) is multiplied by the power of two 2^-e that brings its
// largest magnitude into [2^14, 2^15) (pow2_shift(mx, kTileTop), see
// linattn/scaled_round.cuh) and the fp32 partial product of that tile is
// multiplied back by 2^e; bf16 has fp32's exponent range and is never scaled
// (Mma<T>::scaled in linattn/dtype.cuh).
#pragma once
#include <mma.h>
#include "linattn/dtype.cuh"
#include "linattn/scaled_round.cuh"

namespace linattn {

// n rounded up to a whole number of 16-wide wmma tiles.
__device__ __forceinline__ int pad16(int n) { return (n + 15) & ~15; }

// f16 tiles are scaled so that their largest magnitude is in [2^14, 2^15).
constexpr int kTileTop = 15;

// The largest of the 32 lanes' mx (non-negative, NaN-free: fmaxf drops NaN).
__device__ __forceinline__ float warp_max(float mx) {
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    return mx;
}

// acc += a b * f. For f16 the product goes through a separate fp32 partial
// multiplied by f (the operands' inverse tile scales) before it is added;
// fragments of one type share their element mapping, so element i of the
// partial and of acc is the same (row, column). bf16 accumulates directly
// and ignores f.
template <typename T, typename FA, typename FB>
__device__ __forceinline__ void mma_scaled(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>& acc,
                                           const FA& a, const FB& b, float f) {
    using namespace nvcuda;
    if constexpr (Mma<T>::scaled) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> part;
        wmma::fill_fragment(part, 0.0f);
        wmma::mma_sync(part, a, b, part);
        for (int i = 0; i < part.num_elements; ++i) acc.x[i] = fmaf(part.x[i], f, acc.x[i]);
    } else {
        (void)f;
        wmma::mma_sync(acc, a, b, acc);
    }
}

}  // namespace linattn
