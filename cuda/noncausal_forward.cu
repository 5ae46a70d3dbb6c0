// noncausal_forward.cu: non-causal linear attention,
// O = s phi(Q) S / (s phi(Q) z + eps) with S = S0 + sum_j phi(K_j) V_j^T and
// z = z0 + sum_j phi(K_j) over each whole sequence.
//
// Three launches, all deterministic (no atomics; every sum in a fixed order):
//   (1) noncausal_forward_<t>, write_output = 0: the KV outer-product scan of
//       each token partition into its own workspace slot
//       (grid: seq-heads x value tiles, partitions);
//   (2) noncausal_state_scan: slot 0 <- initial + sum of the partitions in
//       partition order; the final state is written when asked for;
//   (3) noncausal_forward_<t>, causal = 0: every partition's rows read out
//       against the total state.
// The body is the chunk walk (linattn/chunk_walk.cuh for f32,
// linattn/walk_mma.cuh for f16/bf16) with its causal parts switched off. Block: 256 threads; dynamic shared memory as sized by the plan.
#include <cstdint>
#include "linattn/params.h"
#include "linattn/chunk_walk.cuh"
#include "linattn/walk_mma.cuh"

extern "C" __global__ void __launch_bounds__(256, 2) noncausal_forward_f32(const LinattnForwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::chunk_walk<float>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) noncausal_forward_f16(const LinattnForwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::chunk_walk_mma<__half>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) noncausal_forward_bf16(const LinattnForwardParams p) {
    extern __shared__ __align__(128) float smem[];
    linattn::chunk_walk_mma<__nv_bfloat16>(p, smem);
}
extern "C" __global__ void __launch_bounds__(256, 2) noncausal_state_scan(const LinattnStateScanParams p) {
    linattn::state_scan(p);
}
