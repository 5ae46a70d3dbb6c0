// feature_map.cu: y = phi(x) element-wise over a strided rows x cols view.
//
// Memory bound: one read and one write per element. Grid: x covers the
// columns of a row (each thread handles ITEMS elements, a warp reads
// contiguous memory), y walks rows with a grid stride so any row count fits
// the 65535 limit. All offsets are 64-bit.
#include <cstdint>
#include "linattn/params.h"
#include "linattn/dtype.cuh"
#include "linattn/feature_map.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;

template <typename T>
__device__ __forceinline__ void feature_map_body(const LinattnFeatureMapParams& p) {
    // No __restrict__: y may be x (in place, equal row strides; the raw entry
    // point refuses any other overlap). Every element is read and written by
    // one thread, all its loads before its stores, so in place is safe and the
    // loads are still issued together.
    const T* x = linattn::ptr<const T>(p.x);
    T* y = linattn::ptr<T>(p.y);
    const int64_t col0 = (int64_t)blockIdx.x * (kThreads * kItems) + threadIdx.x;
    for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
        const T* xr = x + r * p.x_row_stride;
        T* yr = y + r * p.y_row_stride;
        float v[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
            const int64_t c = col0 + (int64_t)i * kThreads;
            v[i] = c < p.cols ? linattn::to_float(xr[c]) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
            const int64_t c = col0 + (int64_t)i * kThreads;
            if (c < p.cols) {
                yr[c] = linattn::from_float<T>(linattn::phi(v[i], p.feature_map));
            }
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) feature_map_f32(const LinattnFeatureMapParams p) { feature_map_body<float>(p); }
extern "C" __global__ void __launch_bounds__(256) feature_map_f16(const LinattnFeatureMapParams p) { feature_map_body<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) feature_map_bf16(const LinattnFeatureMapParams p) { feature_map_body<__nv_bfloat16>(p); }
