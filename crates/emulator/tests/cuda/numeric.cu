// Test kernels for half/bf16 conversions, wmma and throughput measurements.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <cstdint>

using namespace nvcuda;

struct ConvParams {
  const float* in;
  unsigned short* half_bits;
  unsigned short* bf16_bits;
  float* half_back;  // __half2float(bits as half) for the i-th 16-bit pattern
  float* bf16_back;
  const double* din;
  unsigned short* half_from_double;
  unsigned n;
};

extern "C" __global__ void emu_test_conversions(ConvParams p) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) {
    p.half_bits[i] = __half_as_ushort(__float2half_rn(p.in[i]));
    p.bf16_bits[i] = __bfloat16_as_ushort(__float2bfloat16_rn(p.in[i]));
    p.half_from_double[i] = __half_as_ushort(__double2half(p.din[i]));
  }
  if (i < 65536) {
    p.half_back[i] = __half2float(__ushort_as_half((unsigned short)i));
    p.bf16_back[i] = __bfloat162float(__ushort_as_bfloat16((unsigned short)i));
  }
}

struct WmmaParams {
  const __half* a;  // M x K row-major
  const __half* b;  // K x N, row-major or col-major (b_col_major)
  float* c;         // M x N row-major
  const __nv_bfloat16* a16;
  const __nv_bfloat16* b16;
  float* c16;
  int m, n, k;
  int b_col_major;
  float scale;
};

// One warp per 16x16 output tile; blockDim.x = 32 * warps.
extern "C" __global__ void emu_test_wmma_gemm(WmmaParams p) {
  int warp = threadIdx.x / 32;
  int tiles_n = p.n / 16;
  int tile = blockIdx.x * (blockDim.x / 32) + warp;
  if (tile >= (p.m / 16) * tiles_n) return;
  int tm = tile / tiles_n, tn = tile % tiles_n;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc, acc16;
  wmma::fill_fragment(acc, 0.0f);
  wmma::fill_fragment(acc16, 0.0f);
  for (int kk = 0; kk < p.k; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, p.a + tm * 16 * p.k + kk, p.k);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa16;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb16;
    wmma::load_matrix_sync(fa16, p.a16 + tm * 16 * p.k + kk, p.k);
    wmma::load_matrix_sync(fb16, p.b16 + kk * p.n + tn * 16, p.n);
    if (p.b_col_major) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, p.b + tn * 16 * p.k + kk, p.k);
      wmma::mma_sync(acc, fa, fb, acc);
    } else {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, p.b + kk * p.n + tn * 16, p.n);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::mma_sync(acc16, fa16, fb16, acc16);
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= p.scale;
  wmma::store_matrix_sync(p.c + tm * 16 * p.n + tn * 16, acc, p.n, wmma::mem_row_major);
  // col-major store of the transposed tile position, then read back by the test
  wmma::store_matrix_sync(p.c16 + tn * 16 * p.m + tm * 16, acc16, p.m, wmma::mem_col_major);
}

struct FragCountParams {
  int* out;
};

extern "C" __global__ void emu_test_fragment_sizes(FragCountParams p) {
  if (threadIdx.x != 0) return;
  p.out[0] = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>::num_elements;
  p.out[1] = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major>::num_elements;
  p.out[2] = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>::num_elements;
  p.out[3] = wmma::fragment<wmma::accumulator, 16, 16, 16, float>::num_elements;
}

struct SwitchParams {
  int iters;
  int* out;
};

// Fiber switch cost: every thread passes `iters` barriers.
extern "C" __global__ void emu_test_switch_bench(SwitchParams p) {
  __shared__ int s[1024];
  s[threadIdx.x] = 0;
  for (int i = 0; i < p.iters; ++i) {
    __syncthreads();
  }
  __syncthreads();
  if (threadIdx.x == 0) p.out[blockIdx.x] = s[0] + p.iters;
}

struct ScanParams {
  const float* q;  // [BH, N, D] (already feature-mapped)
  const float* k;  // [BH, N, D]
  const float* v;  // [BH, N, M]
  float* out;      // [BH, N, M]
  int n, d, m;
};

// Causal linear attention, one block per (batch, head), one thread per output column:
// S += k_t v_t^T ; z += k_t ; out_t = (q_t S) / (q_t z + eps).
extern "C" __global__ void emu_test_causal_scan(ScanParams p) {
  extern __shared__ float smem[];
  float* S = smem;                 // d x m
  float* z = S + p.d * p.m;        // d
  float* qs = z + p.d;             // d
  float* ks = qs + p.d;            // d
  int col = threadIdx.x;
  size_t bh = blockIdx.x;
  const float* q = p.q + bh * p.n * p.d;
  const float* k = p.k + bh * p.n * p.d;
  const float* v = p.v + bh * p.n * p.m;
  float* out = p.out + bh * p.n * p.m;
  for (int i = col; i < p.d * p.m; i += blockDim.x) S[i] = 0.0f;
  for (int i = col; i < p.d; i += blockDim.x) z[i] = 0.0f;
  __syncthreads();
  for (int t = 0; t < p.n; ++t) {
    for (int i = col; i < p.d; i += blockDim.x) {
      qs[i] = q[t * p.d + i];
      ks[i] = k[t * p.d + i];
    }
    __syncthreads();
    if (col < p.m) {
      float vt = v[t * p.m + col];
      float num = 0.0f, den = 0.0f;
      for (int i = 0; i < p.d; ++i) {
        float s = S[i * p.m + col] + ks[i] * vt;
        S[i * p.m + col] = s;
        num += qs[i] * s;
      }
      for (int i = 0; i < p.d; ++i) den += qs[i] * (z[i] + ks[i]);
      out[t * p.m + col] = num / (den + 1e-6f);
    }
    __syncthreads();
    for (int i = col; i < p.d; i += blockDim.x) z[i] += ks[i];
    __syncthreads();
  }
}
