// Element types: every kernel loads its input dtype, computes in fp32 and
// stores back in the input dtype. One overload set, so templated kernels read
// the same for f32, f16 and bf16.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace linattn {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Which element types take the tensor-core (wmma) bodies, and which of those
// round fp32 operands to tiles scaled by a power of two (f16: its range is
// too small for a growing state or a shrinking dnum; bf16 has fp32's
// exponent range). See linattn/mma_tile.cuh.
template <typename T> struct Mma {
    static constexpr bool available = false;
    static constexpr bool scaled = false;
};
template <> struct Mma<__half> {
    static constexpr bool available = true;
    static constexpr bool scaled = true;
};
template <> struct Mma<__nv_bfloat16> {
    static constexpr bool available = true;
    static constexpr bool scaled = false;
};

// Device pointers travel as 64-bit integers in the params structs.
template <typename T> __device__ __forceinline__ T* ptr(unsigned long long p) { return reinterpret_cast<T*>(p); }

}  // namespace linattn
