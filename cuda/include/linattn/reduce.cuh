// Warp and block sums in fp32 for the row kernels. Every thread of the block
// gets the same total (each sums the per-warp partials in the same order), so
// no broadcast barrier is needed; the leading barrier protects `red` from the
// previous call's readers.
#pragma once

namespace linattn {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// `red` holds at least blockDim.x / 32 floats of shared memory; blockDim.x is
// a multiple of 32 and every thread of the block calls this.
__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += red[w];
    return total;
}

}  // namespace linattn
