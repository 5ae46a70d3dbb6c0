// decode_step.cu: one new token for every (batch, head), the state updated in
// place in fp32 ("RNN mode"):
//   S += phi(k) v^T ;  z += phi(k) ;  o = s phi(q)^T S / (s phi(q)^T z + eps)
//
// Memory bound: each S element is read once and written once. One block of
// 256 threads per (batch, head) (grid x = batch * heads), so the in-place
// update never races with another block. Thread t handles value column
// t % M for key rows d = t / M, t / M + G, ... (G = 256 / M groups), so a warp
// reads consecutive S elements; the G partial sums per column and the
// normaliser's dot product are combined in a fixed order (deterministic).
#include <cstdint>
#include "linattn/params.h"
#include "linattn/dtype.cuh"
#include "linattn/feature_map.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxDim = 256;

template <typename T>
__device__ __forceinline__ void decode_body(const LinattnDecodeParams& p, float* kh, float* qh, float* part, float* red) {
    const int tid = threadIdx.x;
    const int64_t sh = blockIdx.x;
    const int64_t b = sh / p.heads, h = sh % p.heads;
    const int D = (int)p.d, M = (int)p.m;
    const T* q = linattn::ptr<const T>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* k = linattn::ptr<const T>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
    const T* v = linattn::ptr<const T>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
    T* o = linattn::ptr<T>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
    float* S = linattn::ptr<float>(p.state_s) + sh * (int64_t)D * M;
    float* z = linattn::ptr<float>(p.state_z) + sh * (int64_t)D;

    for (int d = tid; d < D; d += kThreads) {
        kh[d] = linattn::phi(linattn::to_float(k[d]), p.feature_map);
        qh[d] = linattn::phi(linattn::to_float(q[d]), p.feature_map) * p.scale;
    }
    __syncthreads();

    const int groups = kThreads / M;  // M <= 256, so at least one
    const int e = tid % M, g = tid / M;
    if (g < groups) {
        const float ve = linattn::to_float(v[e]);
        float acc = 0.0f;
#pragma unroll 4
        for (int d = g; d < D; d += groups) {
            float* sp = S + d * M + e;
            const float s = fmaf(kh[d], ve, *sp);
            *sp = s;
            acc = fmaf(qh[d], s, acc);
        }
        part[tid] = acc;
    }
    // z update and the normaliser: one key row per thread, then a fixed tree.
    float qz = 0.0f;
    if (tid < D) {
        const float zn = z[tid] + kh[tid];
        z[tid] = zn;
        qz = qh[tid] * zn;
    }
    for (int off = 16; off > 0; off >>= 1) qz += __shfl_xor_sync(0xffffffffu, qz, off);
    if ((tid & 31) == 0) red[tid >> 5] = qz;
    __syncthreads();
    if (tid < M) {
        float num = 0.0f;
        for (int gg = 0; gg < groups; ++gg) num += part[gg * M + tid];
        float out = num;
        if (p.normalize) {
            float den = 0.0f;
            for (int w = 0; w < kThreads / 32; ++w) den += red[w];
            out = num / (den + p.eps);
        }
        o[tid] = linattn::from_float<T>(out);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) decode_step_f32(const LinattnDecodeParams p) {
    __shared__ float kh[kMaxDim], qh[kMaxDim], part[kThreads], red[kThreads / 32];
    decode_body<float>(p, kh, qh, part, red);
}
extern "C" __global__ void __launch_bounds__(256) decode_step_f16(const LinattnDecodeParams p) {
    __shared__ float kh[kMaxDim], qh[kMaxDim], part[kThreads], red[kThreads / 32];
    decode_body<__half>(p, kh, qh, part, red);
}
extern "C" __global__ void __launch_bounds__(256) decode_step_bf16(const LinattnDecodeParams p) {
    __shared__ float kh[kMaxDim], qh[kMaxDim], part[kThreads], red[kThreads / 32];
    decode_body<__nv_bfloat16>(p, kh, qh, part, red);
}
