// model_ops.cu: the transformer's element-wise and row ops in fp32 (the
// model keeps its residual stream in f32): LayerNorm, bias + GELU, residual
// add, token embedding + sinusoidal positions. All memory bound.
//
// layer_norm: one 256-thread block per row (grid-stride over rows), two-pass
// fp32 statistics like the CPU model (mean, then the mean of squared
// deviations), block sums by warp shuffles plus 8 shared partials.
// The element-wise kernels: a flat grid-stride loop over rows * cols with
// 256 threads per block; all offsets 64-bit.
#include <cstdint>
#include "linattn/params.h"
#include "linattn/dtype.cuh"
#include "linattn/reduce.cuh"

namespace {

constexpr int kThreads = 256;

// GELU, tanh approximation, evaluated in the CPU model's order.
__device__ __forceinline__ float gelu_tanh(float x) {
    const float c = 0.7978846f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) layer_norm_f32(const LinattnLayerNormParams p) {
    __shared__ float red[kThreads / 32];
    const float* __restrict__ x = linattn::ptr<const float>(p.x);
    float* y = linattn::ptr<float>(p.y);
    const float* __restrict__ gain = linattn::ptr<const float>(p.gain);
    const float* __restrict__ bias = linattn::ptr<const float>(p.bias);
    const float inv_cols = 1.0f / (float)p.cols;
    for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const float* xr = x + r * p.cols;
        float* yr = y + r * p.cols;
        float s = 0.0f;
        for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) s += xr[c];
        const float mean = linattn::block_sum(s, red) * inv_cols;
        float ss = 0.0f;
        for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
            const float dv = xr[c] - mean;
            ss += dv * dv;
        }
        const float var = linattn::block_sum(ss, red) * inv_cols;
        const float inv = 1.0f / sqrtf(var + p.eps);
        // Every thread has read its elements of the row above (both sums
        // finished behind barriers), so writing in place is safe.
        for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
            yr[c] = (xr[c] - mean) * inv * gain[c] + bias[c];
        }
        // The next row's first block_sum starts with a barrier.
    }
}

extern "C" __global__ void __launch_bounds__(256) bias_gelu_f32(const LinattnRowsParams p) {
    float* x = linattn::ptr<float>(p.x);
    const float* __restrict__ bias = linattn::ptr<const float>(p.bias);
    const int64_t total = p.rows * p.cols;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        x[i] = gelu_tanh(x[i] + bias[i % p.cols]);
    }
}

extern "C" __global__ void __launch_bounds__(256) add_residual_f32(const LinattnRowsParams p) {
    float* x = linattn::ptr<float>(p.x);
    const float* __restrict__ y = linattn::ptr<const float>(p.y);
    const float* __restrict__ bias = linattn::ptr<const float>(p.bias);
    const bool has_bias = p.bias != 0;
    const int64_t total = p.rows * p.cols;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const float add = has_bias ? y[i] + bias[i % p.cols] : y[i];
        x[i] += add;
    }
}

// pe(p, 2i) = sin(p * 10000^(-2i/cols)), pe(p, 2i+1) = cos(same), in fp32:
// the angle's absolute error grows like p * 2^-24 (about 1e-4 rad at
// p = 1000 for the fastest pair; slower pairs far less).
extern "C" __global__ void __launch_bounds__(256) embed_positions_f32(const LinattnEmbedParams p) {
    const float* __restrict__ tokens = linattn::ptr<const float>(p.tokens);
    const float* __restrict__ table = linattn::ptr<const float>(p.table);
    float* __restrict__ x = linattn::ptr<float>(p.x);
    const int64_t total = p.rows * p.cols;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int64_t t = i / p.cols;
        const int64_t c = i - t * p.cols;
        int64_t id = (int64_t)tokens[t];
        id = id < 0 ? 0 : (id >= p.vocab ? p.vocab - 1 : id);  // host validates; never read out of bounds
        const int64_t pair = c >> 1;
        const float expo = -(float)(2 * pair) / (float)p.cols;
        const float freq = powf(10000.0f, expo);
        const float angle = (float)(p.start + t) * freq;
        const float pe = (c & 1) ? cosf(angle) : sinf(angle);
        x[i] = table[id * p.cols + c] + pe;
    }
}
