// softmax_attention.cu: the softmax-attention baseline, fp32 online softmax.
//
// prefill (softmax_prefill_*): one warp per (batch, head, query row); 4 warps
// per block take 4 consecutive rows of one (batch, head). blockIdx.x =
// (batch * heads + head) * row_blocks + row_block. Each lane holds up to 8
// elements of q and of the output accumulator (element lane + 32 u), so any
// d, m <= 256; a score is a warp-sum of the lanes' partial dot products.
// For each key j (j <= i when causal): m' = max(m, s), l = l e^(m - m') +
// e^(s - m'), acc = acc e^(m - m') + e^(s - m') v_j; o = acc / l.
//
// decode (softmax_decode_*): one warp per (batch, head), 4 per block. The
// warp first stores the new k, v at `position` of the caches (each lane the
// elements it later reads itself, so no barrier is needed), then attends q
// over positions 0..=position like one causal prefill row.
//
// No shared memory and no barriers: warps past the end simply skip.
#include <cstdint>
#include "linattn/params.h"
#include "linattn/dtype.cuh"
#include "linattn/reduce.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kPer = 8;  // elements per lane: 8 * 32 = 256 = max d, m

template <typename T>
struct Row {
    const T* q;      // query row
    const T* k;      // key 0 of this (batch, head)
    const T* v;      // value 0
    int64_t k_step;  // elements between consecutive keys
    int64_t v_step;
    int64_t keys;    // number of keys to attend
};

// Attends one query row over `keys` keys; lane `lane` returns its output
// elements in out[u] (element lane + 32 u).
template <typename T>
__device__ __forceinline__ void attend_row(const Row<T>& r, int64_t d, int64_t m, float scale,
                                           int lane, float (&out)[kPer]) {
    float q[kPer];
    float acc[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
        const int64_t c = lane + 32 * u;
        q[u] = c < d ? linattn::to_float(r.q[c]) * scale : 0.0f;
        acc[u] = 0.0f;
    }
    float mx = -INFINITY;
    float l = 0.0f;
    for (int64_t j = 0; j < r.keys; ++j) {
        const T* kj = r.k + j * r.k_step;
        const T* vj = r.v + j * r.v_step;
        float part = 0.0f;
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
            const int64_t c = lane + 32 * u;
            if (c < d) part += q[u] * linattn::to_float(kj[c]);
        }
        const float s = linattn::warp_sum(part);
        const float mn = fmaxf(mx, s);
        const float corr = expf(mx - mn);
        const float pj = expf(s - mn);
        l = l * corr + pj;
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
            const int64_t c = lane + 32 * u;
            const float vv = c < m ? linattn::to_float(vj[c]) : 0.0f;
            acc[u] = acc[u] * corr + pj * vv;
        }
        mx = mn;
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int u = 0; u < kPer; ++u) out[u] = acc[u] * inv;
}

template <typename T>
__device__ __forceinline__ void prefill_body(const LinattnSoftmaxParams& p) {
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int64_t row_blocks = (p.tokens + kWarps - 1) / kWarps;
    const int64_t bh = (int64_t)blockIdx.x / row_blocks;
    const int64_t i = ((int64_t)blockIdx.x - bh * row_blocks) * kWarps + warp;
    const int64_t b = bh / p.heads;
    const int64_t h = bh - b * p.heads;
    if (b < p.batch && i < p.tokens) {
        Row<T> r;
        r.q = linattn::ptr<const T>(p.q) + b * p.q_batch_stride + i * p.q_token_stride + h * p.q_head_stride;
        r.k = linattn::ptr<const T>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
        r.v = linattn::ptr<const T>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
        r.k_step = p.k_token_stride;
        r.v_step = p.v_token_stride;
        r.keys = p.causal ? i + 1 : p.tokens;
        float out[kPer];
        attend_row<T>(r, p.d, p.m, p.scale, lane, out);
        T* o = linattn::ptr<T>(p.o) + b * p.o_batch_stride + i * p.o_token_stride + h * p.o_head_stride;
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
            const int64_t c = lane + 32 * u;
            if (c < p.m) o[c] = linattn::from_float<T>(out[u]);
        }
    }
}

template <typename T>
__device__ __forceinline__ void decode_body(const LinattnSoftmaxParams& p) {
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int64_t bh = (int64_t)blockIdx.x * kWarps + warp;
    const int64_t b = bh / p.heads;
    const int64_t h = bh - b * p.heads;
    if (b < p.batch) {
        T* kc = linattn::ptr<T>(p.k_cache) + b * p.cache_batch_stride + h * p.cache_head_stride;
        T* vc = linattn::ptr<T>(p.v_cache) + b * p.cache_batch_stride + h * p.cache_head_stride;
        const T* kn = linattn::ptr<const T>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
        const T* vn = linattn::ptr<const T>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
        T* kt = kc + p.position * p.cache_token_stride;
        T* vt = vc + p.position * p.cache_token_stride;
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
            const int64_t c = lane + 32 * u;
            if (c < p.d) kt[c] = kn[c];
            if (c < p.m) vt[c] = vn[c];
        }
        Row<T> r;
        r.q = linattn::ptr<const T>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
        r.k = kc;
        r.v = vc;
        r.k_step = p.cache_token_stride;
        r.v_step = p.cache_token_stride;
        r.keys = p.position + 1;
        float out[kPer];
        attend_row<T>(r, p.d, p.m, p.scale, lane, out);
        T* o = linattn::ptr<T>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
            const int64_t c = lane + 32 * u;
            if (c < p.m) o[c] = linattn::from_float<T>(out[u]);
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128) softmax_prefill_f32(const LinattnSoftmaxParams p) { prefill_body<float>(p); }
extern "C" __global__ void __launch_bounds__(128) softmax_prefill_f16(const LinattnSoftmaxParams p) { prefill_body<__half>(p); }
extern "C" __global__ void __launch_bounds__(128) softmax_prefill_bf16(const LinattnSoftmaxParams p) { prefill_body<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) softmax_decode_f32(const LinattnSoftmaxParams p) { decode_body<float>(p); }
extern "C" __global__ void __launch_bounds__(128) softmax_decode_f16(const LinattnSoftmaxParams p) { decode_body<__half>(p); }
extern "C" __global__ void __launch_bounds__(128) softmax_decode_bf16(const LinattnSoftmaxParams p) { decode_body<__nv_bfloat16>(p); }
