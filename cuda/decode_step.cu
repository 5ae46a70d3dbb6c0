// decode_step.cu: one new token for every (batch, head), the state updated in
// place in fp32 ("RNN mode"):
//   S += phi(k) v^T ;  z += phi(k) ;  o = s phi(q)^T S / (s phi(q)^T z + eps)
//
// Memory bound: each S element is read once and written once. One block of
// 256 threads per (batch, head) (grid x = batch * heads), so the in-place
// update never races with another block. When M is a multiple of 4 and S is
// 16-byte aligned (the usual case), thread t handles the four value columns
// 4 (t % (M/4)) .. +3 for key rows d = g, g + G, ... (g = t / (M/4), G =
// 1024 / M groups) with 16-byte loads, kBatch rows in flight per thread
// (enough outstanding loads to approach the bandwidth with few heads: a
// D = M = 128 state, 64 KB, is in flight in two rounds). Otherwise one
// column per thread (G = 256 / M). Either way a warp reads consecutive S
// elements and the G partial sums per column and the normaliser's dot
// product are combined in a fixed order (deterministic).
#include <cstdint>
#include "linattn/params.h"
#include "linattn/dtype.cuh"
#include "linattn/feature_map.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxDim = 256;
constexpr int kBatch = 8;  // S rows (16-byte loads) in flight per thread
// Partial sums: G groups x M columns, G * M <= 1024 (vector path) or 256.
constexpr int kParts = 4 * kThreads;

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

    const bool vec = (M & 3) == 0 && (reinterpret_cast<uintptr_t>(S) & 15) == 0;
    const int groups = vec ? kThreads / (M / 4) : kThreads / M;  // M <= 256: at least one
    if (vec) {
        const int M4 = M / 4;
        const int e4 = tid % M4, g = tid / M4;
        if (g < groups) {
            float ve[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) ve[i] = linattn::to_float(v[4 * e4 + i]);
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            float4* S4 = reinterpret_cast<float4*>(S) + e4;  // row d at S4 + d * M4
            for (int d0 = g; d0 < D; d0 += groups * kBatch) {
                float4 s[kBatch];
#pragma unroll
                for (int j = 0; j < kBatch; ++j) {
                    const int d = d0 + j * groups;
                    if (d < D) s[j] = S4[d * M4];
                }
#pragma unroll
                for (int j = 0; j < kBatch; ++j) {
                    const int d = d0 + j * groups;
                    if (d >= D) break;
                    const float kd = kh[d], qd = qh[d];
                    s[j].x = fmaf(kd, ve[0], s[j].x);
                    s[j].y = fmaf(kd, ve[1], s[j].y);
                    s[j].z = fmaf(kd, ve[2], s[j].z);
                    s[j].w = fmaf(kd, ve[3], s[j].w);
                    S4[d * M4] = s[j];
                    acc[0] = fmaf(qd, s[j].x, acc[0]);
                    acc[1] = fmaf(qd, s[j].y, acc[1]);
                    acc[2] = fmaf(qd, s[j].z, acc[2]);
                    acc[3] = fmaf(qd, s[j].w, acc[3]);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) part[g * M + 4 * e4 + i] = acc[i];
        }
    } else {
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
            part[g * M + e] = acc;
        }
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
    __shared__ float kh[kMaxDim], qh[kMaxDim], part[kParts], red[kThreads / 32];
    decode_body<float>(p, kh, qh, part, red);
}
extern "C" __global__ void __launch_bounds__(256) decode_step_f16(const LinattnDecodeParams p) {
    __shared__ float kh[kMaxDim], qh[kMaxDim], part[kParts], red[kThreads / 32];
    decode_body<__half>(p, kh, qh, part, red);
}
extern "C" __global__ void __launch_bounds__(256) decode_step_bf16(const LinattnDecodeParams p) {
    __shared__ float kh[kMaxDim], qh[kMaxDim], part[kParts], red[kThreads / 32];
    decode_body<__nv_bfloat16>(p, kh, qh, part, red);
}
