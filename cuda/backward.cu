// backward.cu: gradients of linear attention, causal or non-causal (the
// runtime flag `causal` in the params: every kernel here serves both
// kinds): dq, dk, dv and the initial state's gradient, feature map and
// normaliser differentiated inside, fp32 accumulation for every dtype (wmma tensor cores for f16/bf16),
// deterministic (no atomics).
//
// Launches, in order (plan: crates/kernels/src/ops/backward/plan.rs; math and
// fp32 FMA bodies: linattn/backward_walk.cuh; tensor-core bodies for
// f16/bf16: linattn/backward_mma.cuh):
//   backward_prep_<t>: den_i, d den_i per token (normalised only);
//       grid: seq-heads x M tiles.
//   backward_dq_<t>:   dq;             grid: seq-heads x D tiles.
//   backward_dk_<t>:   dk, dS0, dz0;   grid: seq-heads x D tiles.
//   backward_dv_<t>:   dv;             grid: seq-heads x M tiles.
//   or, for f16/bf16 heads whose whole state fits the block's registers
//   (D16 x M16 <= 64 tiles of 16 x 16; the plan's policy), two walks:
//   backward_prepdq_<t>: den, d den and dq in one forward walk;
//   backward_dkv_<t>:    dk, dv, dS0, dz0 in one reverse walk;
//       grid: seq-heads (t = f16, bf16 only).
//   Split (small seq-heads x long sequences): grid y = partitions, and each
//   walk runs twice: its partition sums from zero (LINATTN_BWD_PARTIALS),
//   backward_state_scan, then every partition from its slot
//   (LINATTN_BWD_FROM_WORK): prepdq partials, scan, prepdq, dkv partials,
//   scan, dkv. Causal: the scan makes prefixes from the initial state for
//   prepdq and suffixes from d_final for dkv (fixed order); non-causal: it
//   puts the total (from the initial state, or from d_final) in every slot
//   and the walk reads it out per partition.
// Suffix `_f16_bf16tc` (every 16-bit pass): f16 inputs and outputs on bf16
// tensor-core tiles (AttentionOptions::f16_tiles = Bf16), the bf16 bodies'
// arithmetic with f16 loads and stores; same shared memory and plan as _f16.
// Block: 256 threads (prepdq, dkv: 256 or 512, the plan's `dkv_threads`);
// dynamic shared memory as sized by the plan (<= SHARED_BUDGET_BYTES = 99
// KiB; the executor opts in above 48 KiB).
#include <cstdint>
#include "linattn/params.h"
#include "linattn/backward_mma.cuh"

extern "C" __global__ void __launch_bounds__(256, 2) backward_prep_f32(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::prep<float>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_prep_f16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::prep<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_prep_bf16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::prep<__nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dq_f32(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dq_walk<float>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dq_f16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dq_walk<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dq_bf16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dq_walk<__nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dk_f32(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dk_walk<float>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dk_f16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dk_walk<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dk_bf16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dk_walk<__nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dv_f32(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dv_walk<float>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dv_f16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dv_walk<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dv_bf16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dv_walk<__nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(512, 1) backward_dkv_f16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dkv_walk<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(512, 1) backward_dkv_bf16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dkv_walk<__nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(512, 1) backward_prepdq_f16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::prep_dq_walk<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(512, 1) backward_prepdq_bf16(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::prep_dq_walk<__nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_prep_f16_bf16tc(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::prep<__half, __nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dq_f16_bf16tc(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dq_walk<__half, __nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dk_f16_bf16tc(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dk_walk<__half, __nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) backward_dv_f16_bf16tc(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dv_walk<__half, __nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(512, 1) backward_dkv_f16_bf16tc(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::dkv_walk<__half, __nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(512, 1) backward_prepdq_f16_bf16tc(const LinattnBackwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::bwd::prep_dq_walk<__half, __nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256) backward_state_scan(const LinattnBackwardParams p) {
    linattn::bwd::backward_state_scan(p);
}
