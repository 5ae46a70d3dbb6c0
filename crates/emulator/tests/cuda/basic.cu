// Test kernels for the emulator: reductions, shared memory, barriers, shuffles,
// votes, atomics. Plain CUDA: this file would compile with nvcc too.
#include <cuda_runtime.h>
#include <cstdint>

struct SumParams {
  const float* input;
  float* output;  // one partial sum per block
  unsigned n;
};

// Tree reduction in static shared memory.
extern "C" __global__ void __launch_bounds__(256) emu_test_block_sum(const SumParams p) {
  __shared__ float buf[256];
  unsigned tid = threadIdx.x;
  float acc = 0.0f;
  for (unsigned i = blockIdx.x * blockDim.x + tid; i < p.n; i += gridDim.x * blockDim.x) acc += p.input[i];
  buf[tid] = acc;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) buf[tid] += buf[tid + s];
    __syncthreads();
  }
  if (tid == 0) p.output[blockIdx.x] = buf[0];
}

// Same with dynamic shared memory (blockDim.x floats) and a 2-D shared array.
extern "C" __global__ void emu_test_block_sum_dyn(SumParams p) {
  extern __shared__ float dyn[];
  __shared__ __align__(16) float grid2d[2][8];
  unsigned tid = threadIdx.x;
  float acc = 0.0f;
  for (unsigned i = blockIdx.x * blockDim.x + tid; i < p.n; i += gridDim.x * blockDim.x) acc += p.input[i];
  dyn[tid] = acc;
  if (tid < 16) grid2d[tid / 8][tid % 8] = 1.0f;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) dyn[tid] += dyn[tid + s];
    __syncthreads();
  }
  if (tid == 0) {
    float ones = 0.0f;
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < 8; ++c) ones += grid2d[r][c];
    p.output[blockIdx.x] = dyn[0] + ones - 16.0f;
  }
}

struct ShflParams {
  int* out;  // [variant][width_index][thread]
  long long* out64;
  double* outd;
  unsigned short* outh;  // __half / bf16 bits
};

// Every shuffle variant with widths 32, 16, 8, 4, 2, 1 and several types.
extern "C" __global__ void emu_test_shuffles(ShflParams p) {
  unsigned t = threadIdx.x;
  int lane = t % 32;
  int v = (int)(t * 7 + 3);
  const int widths[6] = {32, 16, 8, 4, 2, 1};
  for (int wi = 0; wi < 6; ++wi) {
    int w = widths[wi];
    int base = wi * 4 * (int)blockDim.x;
    p.out[base + 0 * blockDim.x + t] = __shfl_sync(0xffffffffu, v, (lane * 3 + 1) % 32, w);
    p.out[base + 1 * blockDim.x + t] = __shfl_up_sync(0xffffffffu, v, 3, w);
    p.out[base + 2 * blockDim.x + t] = __shfl_down_sync(0xffffffffu, v, 3, w);
    p.out[base + 3 * blockDim.x + t] = __shfl_xor_sync(0xffffffffu, v, 5, w);
  }
  long long big = ((long long)t << 40) | t;
  p.out64[t] = __shfl_xor_sync(0xffffffffu, big, 1);
  double d = 0.5 + t;
  p.outd[t] = __shfl_down_sync(0xffffffffu, d, 1);
  float f = 1.25f * t;
  float g = __shfl_sync(0xffffffffu, f, 0);
  unsigned u = __shfl_sync(0xffffffffu, (unsigned)t + 1000u, 31);
  __half h = __float2half(0.5f * t);
  __half hh = __shfl_up_sync(0xffffffffu, h, 1);
  __nv_bfloat16 b = __float2bfloat16(2.0f * t);
  __nv_bfloat16 bb = __shfl_xor_sync(0xffffffffu, b, 2);
  p.outh[4 * t + 0] = __half_as_ushort(hh);
  p.outh[4 * t + 1] = __bfloat16_as_ushort(bb);
  p.outh[4 * t + 2] = (unsigned short)(g == 1.25f * (t - lane) ? 1 : 0);
  p.outh[4 * t + 3] = (unsigned short)(u - 1000u);
}

struct VoteParams {
  unsigned* out;  // per thread: ballot, any, all, count, and, or, activemask, reduce_add
};

extern "C" __global__ void emu_test_votes(VoteParams p) {
  unsigned t = threadIdx.x;
  unsigned lane = t % 32;
  unsigned* o = p.out + 8 * t;
  o[0] = __ballot_sync(0xffffffffu, (lane % 3) == 0);
  o[1] = __any_sync(0xffffffffu, t == 40);
  o[2] = __all_sync(0xffffffffu, t < 48);
  o[3] = __syncthreads_count(t % 5 == 0);
  o[4] = __syncthreads_and(t < 1000);
  o[5] = __syncthreads_or(t == 63);
  o[6] = __activemask();
  o[7] = __reduce_add_sync(0xffffffffu, lane);
  // partial-mask collectives: even lanes only
  if (lane % 2 == 0) {
    unsigned m = __ballot_sync(0x55555555u, lane >= 16);
    __syncwarp(0x55555555u);
    o[7] += m == 0x55550000u ? 0 : 1000000u;
  }
}

struct AtomicParams {
  int* counter_i;
  unsigned* counter_u;
  unsigned long long* counter_ull;
  float* counter_f;
  double* counter_d;
  int* max_i;
  int* min_i;
  unsigned* exch;
  int* cas_hits;
  unsigned* shared_result;  // per block
};

extern "C" __global__ void emu_test_atomics(AtomicParams p) {
  __shared__ unsigned block_count;
  unsigned t = threadIdx.x;
  if (t == 0) block_count = 0;
  __syncthreads();
  atomicAdd(&block_count, 1u);
  int gid = (int)(blockIdx.x * blockDim.x + t);
  atomicAdd(p.counter_i, 1);
  atomicAdd(p.counter_u, 2u);
  atomicAdd(p.counter_ull, 3ull);
  atomicAdd(p.counter_f, 1.0f);
  atomicAdd(p.counter_d, 0.5);
  atomicMax(p.max_i, gid);
  atomicMin(p.min_i, -gid);
  atomicExch(p.exch, 7u);
  // exactly one thread of the grid wins the CAS
  if (atomicCAS(p.cas_hits + 1, 0, 1) == 0) atomicAdd(p.cas_hits, 1);
  __syncthreads();
  if (t == 0) p.shared_result[blockIdx.x] = block_count;
}

struct PoisonParams {
  float* out;
};

// Thread 0 writes nothing; everyone reads shared slot 0 after a barrier: NaN.
extern "C" __global__ void emu_test_poison(PoisonParams p) {
  __shared__ float never_written[64];
  extern __shared__ float dyn_unwritten[];
  __syncthreads();
  p.out[2 * threadIdx.x] = never_written[threadIdx.x];
  p.out[2 * threadIdx.x + 1] = dyn_unwritten[threadIdx.x];
}

struct RaceParams {
  float* out;
  unsigned racy_block;
};

// Neighbour exchange through shared memory; the barrier is missing in one block.
extern "C" __global__ void emu_test_missing_barrier(RaceParams p) {
  __shared__ float s[128];
  unsigned t = threadIdx.x;
  s[t] = (float)(t + blockIdx.x);
  if (blockIdx.x != p.racy_block) __syncthreads();
  p.out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}

struct DivParams {
  int* out;
  int mode;
};

// mode 0: half the block returns before __syncthreads.
// mode 1: even threads __syncthreads, odd ones __syncwarp.
// mode 2: a shuffle names lanes that exited.
// mode 3: correct kernel.
extern "C" __global__ void emu_test_divergent(DivParams p) {
  unsigned t = threadIdx.x;
  if (p.mode == 0) {
    if (t >= 32) return;
    __syncthreads();
  } else if (p.mode == 1) {
    if (t % 2 == 0)
      __syncthreads();
    else
      __syncwarp();
  } else if (p.mode == 2) {
    if (t % 32 >= 16) return;
    int v = __shfl_xor_sync(0xffffffffu, (int)t, 1);
    p.out[t] = v;
    return;
  }
  p.out[t] = 1;
}

struct TrapParams {
  int width;
};

extern "C" __global__ void emu_test_bad_width(TrapParams p) {
  int v = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0, p.width);
  (void)v;
}

// Static shared memory larger than the module's limit.
extern "C" __global__ void emu_test_big_shared(SumParams p) {
  __shared__ float big[16384];  // 64 KiB
  big[threadIdx.x] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) p.output[0] = big[0];
}

extern "C" __global__ void emu_test_no_params() {}
