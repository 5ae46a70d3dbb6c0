// Test kernels for the checks that make the emulator as strict as a GPU:
// __launch_bounds__, the shared memory limit, wmma pointer alignment and ldm,
// the alignment of the dynamic shared memory base, fast-math intrinsics.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <cstdint>

using namespace nvcuda;

constexpr int kStrictThreads = 96;

struct FillParams {
  unsigned* out;
};

// At most 128 threads a block.
extern "C" __global__ void __launch_bounds__(128) emu_test_bounds_128(FillParams p) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  p.out[blockIdx.x * blockDim.x * blockDim.y * blockDim.z + t] = t + 1;
}

// The bound is an expression over a namespace-scope constant, with minBlocks.
extern "C" __global__ void __launch_bounds__(kStrictThreads * 2, 1) emu_test_bounds_expr(FillParams p) {
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = threadIdx.x + 1;
}

// Without the attribute: CUDA's limit of 1024.
extern "C" __global__ void emu_test_bounds_none(FillParams p) {
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = threadIdx.x + 1;
}

// Dynamic shared memory only: every thread writes its slots, then reads a neighbour's.
struct DynParams {
  unsigned* out;
  unsigned words;  // dynamic shared memory in 4-byte words
};

extern "C" __global__ void emu_test_dyn_only(DynParams p) {
  extern __shared__ unsigned dyn_words[];
  for (unsigned i = threadIdx.x; i < p.words; i += blockDim.x) dyn_words[i] = i;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned s = 0;
    for (unsigned i = 0; i < p.words; ++i) s += dyn_words[i] == i;
    p.out[blockIdx.x] = s;
  }
}

// The launch's dynamic shared memory size as device code sees it: PTX's
// %dynamic_smem_size on a GPU, the emulator's record of the launch here.
extern "C" __global__ void emu_test_dyn_bytes(DynParams p) {
  unsigned n;
#ifdef LINATTN_EMULATOR
  n = (unsigned)linattn_emu::dynamic_shared_bytes();
#else
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
#endif
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = n;
}

// Where the dynamic shared memory base lies: out[0] = base % 4096 for each kernel.
struct BaseParams {
  unsigned long long* out;
};

extern "C" __global__ void emu_test_dyn_base_default(BaseParams p) {
  extern __shared__ float dyn_default[];
  if (threadIdx.x == 0) p.out[0] = reinterpret_cast<uintptr_t>(dyn_default) % 4096;
}

extern "C" __global__ void emu_test_dyn_base_128(BaseParams p) {
  extern __shared__ __align__(128) float dyn_128[];
  if (threadIdx.x == 0) p.out[0] = reinterpret_cast<uintptr_t>(dyn_128) % 4096;
}

// Two extern declarations alias one base, aligned to the larger of the two.
extern "C" __global__ void emu_test_dyn_base_two(BaseParams p) {
  extern __shared__ __align__(32) float dyn_a[];
  extern __shared__ __align__(64) int dyn_b[];
  if (threadIdx.x == 0) {
    p.out[0] = reinterpret_cast<uintptr_t>(dyn_a) % 4096;
    p.out[1] = (void*)dyn_a == (void*)dyn_b;
  }
}

// An aligned extern declaration outside the kernel's body: the base is only aligned
// to what the kernel itself declares, so this is a fault under the emulator.
__device__ float* aligned_dyn_in_helper() {
  extern __shared__ __align__(128) float dyn_helper[];
  return dyn_helper;
}

extern "C" __global__ void emu_test_dyn_align_in_helper(BaseParams p) {
  float* s = aligned_dyn_in_helper();
  if (threadIdx.x == 0) p.out[0] = reinterpret_cast<uintptr_t>(s) % 4096;
}

// The backward walks' pattern: carve the dynamic region into buffers on 128-byte
// offsets and run wmma on them. Correct only if the base itself is 128-byte aligned
// (or at least 32-byte aligned): with the bare declaration the first wmma load faults.
struct CarveParams {
  float* out;  // 16 x 16, row-major: the product of the staged tiles
};

__device__ void carve_and_mma(char* base, float* out) {
  unsigned off = 48;  // a small fp32 buffer first, then round up to 128 like `Carve`
  off = (off + 127u) & ~127u;
  __half* a = reinterpret_cast<__half*>(base + off);
  off += 16 * 24 * sizeof(__half);
  off = (off + 127u) & ~127u;
  __half* b = reinterpret_cast<__half*>(base + off);
  for (int i = threadIdx.x; i < 16 * 24; i += blockDim.x) {
    const int r = i / 24, c = i % 24;
    a[i] = __float2half(c < 16 ? (float)((r + c) % 5) : 0.0f);
    b[i] = __float2half(c < 16 ? (r == c ? 1.0f : 0.0f) : 0.0f);
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, a, 24);
    wmma::load_matrix_sync(fb, b, 24);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
  }
}

extern "C" __global__ void emu_test_carve_unaligned(CarveParams p) {
  extern __shared__ float smem_bare[];
  carve_and_mma(reinterpret_cast<char*>(smem_bare), p.out);
}

extern "C" __global__ void emu_test_carve_aligned(CarveParams p) {
  extern __shared__ __align__(128) float smem_128[];
  carve_and_mma(reinterpret_cast<char*>(smem_128), p.out);
}

// wmma loads and stores with chosen offsets (in elements) and leading dimensions.
struct WmmaArgsParams {
  const __half* h;            // 256-byte aligned, at least 64 x 64
  const __nv_bfloat16* bf;    // 256-byte aligned, at least 64 x 64
  float* f;                   // 256-byte aligned, at least 64 x 64
  __half* hout;               // 256-byte aligned, at least 64 x 64
  int which;                  // 0: a (half), 1: b (bf16, col-major), 2: acc load (float),
                              // 3: acc store (float), 4: acc load (half), 5: acc store (half)
  int offset;                 // elements from the buffer start
  unsigned ldm;
};

extern "C" __global__ void emu_test_wmma_args(WmmaArgsParams p) {
  switch (p.which) {
    case 0: {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> f;
      wmma::load_matrix_sync(f, p.h + p.offset, p.ldm);
      break;
    }
    case 1: {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> f;
      wmma::load_matrix_sync(f, p.bf + p.offset, p.ldm);
      break;
    }
    case 2: {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> f;
      wmma::load_matrix_sync(f, p.f + p.offset, p.ldm, wmma::mem_col_major);
      break;
    }
    case 3: {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> f;
      wmma::fill_fragment(f, 1.0f);
      wmma::store_matrix_sync(p.f + p.offset, f, p.ldm, wmma::mem_row_major);
      break;
    }
    case 4: {
      wmma::fragment<wmma::accumulator, 16, 16, 16, __half> f;
      wmma::load_matrix_sync(f, p.hout + p.offset, p.ldm, wmma::mem_row_major);
      break;
    }
    default: {
      wmma::fragment<wmma::accumulator, 16, 16, 16, __half> f;
      wmma::fill_fragment(f, __float2half(1.0f));
      wmma::store_matrix_sync(p.hout + p.offset, f, p.ldm, wmma::mem_row_major);
      break;
    }
  }
}

// The fast intrinsics, element-wise.
struct FastMathParams {
  const float* x;
  const float* y;
  float* fdividef;  // __fdividef(x, y)
  float* expf_;     // __expf(x)
  float* logf_;     // __logf(x)
  float* log2f_;    // __log2f(x)
  float* log10f_;   // __log10f(x)
  float* powf_;     // __powf(x, y)
  float* exp10f_;   // __exp10f(x)
  float* div;       // x / y (IEEE)
  unsigned n;
};

extern "C" __global__ void emu_test_fast_math(FastMathParams p) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const float x = p.x[i], y = p.y[i];
  p.fdividef[i] = __fdividef(x, y);
  p.expf_[i] = __expf(x);
  p.logf_[i] = __logf(x);
  p.log2f_[i] = __log2f(x);
  p.log10f_[i] = __log10f(x);
  p.powf_[i] = __powf(x, y);
  p.exp10f_[i] = __exp10f(x);
  p.div[i] = x / y;
}
