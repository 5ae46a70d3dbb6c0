// forward.cu: linear attention, chunked, feature map and normaliser fused,
// initial state in and final state out, causal or non-causal (the runtime
// flag `causal` in the params: every kernel here serves both kinds).
//
// One kernel body per dtype (f32: the fp32 FMA walk of
// linattn/chunk_walk.cuh; f16/bf16: the tensor-core walk of
// linattn/walk_mma.cuh). Suffix `_f16_bf16tc`: f16 inputs and outputs on
// bf16 tensor-core tiles (AttentionOptions::f16_tiles = Bf16: fp32's
// exponent range for the staged operands, 2^-9 rounding instead of 2^-12;
// same shared memory and tiling as forward_f16). Launched as chosen by the plain-Rust policy in
// crates/kernels/src/ops/forward/tiling.rs:
//   causal walk:  one launch; grid (seq-heads x value tiles, 1); each block
//          keeps its fp32 state slice in shared memory and walks every chunk
//          in order.
//   causal split: for small seq-heads x value tiles. (1) forward_<t> with
//          write_output = 0 writes each partition's own state into a
//          workspace, (2) forward_state_scan turns those into exclusive
//          prefix states (initial state included, fixed order) and writes the
//          final state, (3) forward_<t> walks every partition in parallel
//          from its prefix state and writes the outputs.
//   non-causal: three launches, all deterministic (no atomics; every sum in
//          a fixed order): (1) forward_<t>, write_output = 0: the KV
//          outer-product scan of each token partition into its own workspace
//          slot (grid: seq-heads x value tiles, partitions); (2)
//          forward_state_scan: slot 0 <- initial + sum of the partitions in
//          partition order, the final state written when asked for; (3)
//          forward_<t>, causal = 0: every partition's rows read out against
//          the total state (the walk with its causal parts switched off).
// Block: 256 threads; dynamic shared memory as sized by the plan.
#include <cstdint>
#include "linattn/params.h"
#include "linattn/chunk_walk.cuh"
#include "linattn/walk_mma.cuh"

extern "C" __global__ void __launch_bounds__(256, 2) forward_f32(const LinattnForwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::chunk_walk<float>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) forward_f16(const LinattnForwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::chunk_walk_mma<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) forward_bf16(const LinattnForwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::chunk_walk_mma<__nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) forward_f16_bf16tc(const LinattnForwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::chunk_walk_mma<__half, __nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) forward_state_scan(const LinattnStateScanParams p) {
    linattn::state_scan(p);
}
