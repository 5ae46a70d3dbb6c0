// linattn emulator: maps CUDA's device built-ins onto a CPU runtime.
//
// The build helper (linattn_emulator::build) force-includes this header into every
// cuda/*.cu file it compiles with the host C++ compiler, and puts this directory first
// on the include path so that <cuda_fp16.h>, <cuda_bf16.h>, <mma.h> and
// <cuda_runtime.h> resolve to the stand-ins next to this file, never to a real CUDA
// installation.
//
// Every CUDA thread of a block runs as a fiber on one OS thread. Device code reaches
// its fiber's context (threadIdx, blockIdx, shared memory, the runtime's callbacks)
// through one thread-local pointer that the Rust scheduler sets before it resumes a
// fiber. Fibers switch only inside __syncthreads(), warp collectives and wmma calls.
#pragma once
#ifndef LINATTN_EMU_H
#define LINATTN_EMU_H

#ifndef __cplusplus
#error "linattn_emu.h is C++ only (the emulator compiles .cu files as C++17)"
#endif

// Standard headers first: some of the macros below (asm) must not reach them.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <math.h>
#include <new>
#include <type_traits>
#include <utility>

/// Defined whenever code is compiled for the emulator. Project helper headers (never
/// kernel bodies) may branch on it.
#define LINATTN_EMULATOR 1
/// Version of the C ABI between this header and the Rust runtime.
#define LINATTN_EMU_ABI_VERSION 3

// The emulated architecture: sources that branch on __CUDA_ARCH__ take the sm_80 path
// (no TMA, wgmma or clusters). The build helper may override it.
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif

// ---------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__
#define __grid_constant__
#define __cudart_builtin__
// `__noinline__` is rewritten by the build helper (a macro would break
// `__attribute__((__noinline__))` inside the C++ standard library).
// `__shared__` declarations are rewritten by the build helper into
// LINATTN_EMU_SHARED / LINATTN_EMU_EXTERN_SHARED. One that reaches the compiler was
// not rewritten (for example it sits inside a macro): make that a compile error.
#define __shared__ linattn_emu_error_this_shared_declaration_was_not_rewritten_by_the_build_helper
// Inline PTX cannot run on the CPU.
#define asm linattn_emu_error_inline_asm_is_not_supported_by_the_emulator

// ---------------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define LINATTN_EMU_VEC2(T, name, al)                                            \
  struct __attribute__((aligned(al))) name {                                     \
    T x, y;                                                                      \
  };                                                                             \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define LINATTN_EMU_VEC3(T, name)                                                \
  struct name {                                                                  \
    T x, y, z;                                                                   \
  };                                                                             \
  inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define LINATTN_EMU_VEC4(T, name, al)                                            \
  struct __attribute__((aligned(al))) name {                                     \
    T x, y, z, w;                                                                \
  };                                                                             \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
#define LINATTN_EMU_VEC1(T, name)                                                \
  struct name {                                                                  \
    T x;                                                                         \
  };                                                                             \
  inline name make_##name(T x) { return name{x}; }

LINATTN_EMU_VEC1(float, float1)
LINATTN_EMU_VEC2(float, float2, 8)
LINATTN_EMU_VEC3(float, float3)
LINATTN_EMU_VEC4(float, float4, 16)
LINATTN_EMU_VEC1(double, double1)
LINATTN_EMU_VEC2(double, double2, 16)
LINATTN_EMU_VEC3(double, double3)
LINATTN_EMU_VEC4(double, double4, 16)
LINATTN_EMU_VEC1(int, int1)
LINATTN_EMU_VEC2(int, int2, 8)
LINATTN_EMU_VEC3(int, int3)
LINATTN_EMU_VEC4(int, int4, 16)
LINATTN_EMU_VEC1(unsigned int, uint1)
LINATTN_EMU_VEC2(unsigned int, uint2, 8)
LINATTN_EMU_VEC4(unsigned int, uint4, 16)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
LINATTN_EMU_VEC2(short, short2, 4)
LINATTN_EMU_VEC4(short, short4, 8)
LINATTN_EMU_VEC2(unsigned short, ushort2, 4)
LINATTN_EMU_VEC4(unsigned short, ushort4, 8)
LINATTN_EMU_VEC2(signed char, char2, 2)
LINATTN_EMU_VEC4(signed char, char4, 4)
LINATTN_EMU_VEC2(unsigned char, uchar2, 2)
LINATTN_EMU_VEC4(unsigned char, uchar4, 4)
LINATTN_EMU_VEC2(long long, longlong2, 16)
LINATTN_EMU_VEC2(unsigned long long, ulonglong2, 16)
#undef LINATTN_EMU_VEC1
#undef LINATTN_EMU_VEC2
#undef LINATTN_EMU_VEC3
#undef LINATTN_EMU_VEC4

// ---------------------------------------------------------------------------------
// The C ABI shared with the Rust runtime (crates/emulator/src/ffi.rs mirrors it).
// ---------------------------------------------------------------------------------
struct LinattnEmuThreadCtx;

struct LinattnEmuCallbacks {
  // kind: 0 = __syncthreads, 1 = _count, 2 = _and, 3 = _or. Returns the reduction.
  uint32_t (*syncthreads)(LinattnEmuThreadCtx* ctx, uint32_t kind, uint32_t pred);
  // A warp collective (see LinattnEmuWarpOp). Returns this lane's result.
  uint64_t (*warp_op)(LinattnEmuThreadCtx* ctx, uint32_t op, uint32_t mask, uint64_t value, int32_t arg,
                      int32_t width);
  // Address of the static __shared__ variable identified by `key` in the current block.
  void* (*static_shared)(LinattnEmuThreadCtx* ctx, const void* key, uint64_t size, uint64_t align);
  // Reports a fault in device code; never returns.
  void (*fail)(LinattnEmuThreadCtx* ctx, const char* message);
  // Lanes of the calling warp that have not exited.
  uint32_t (*active_mask)(LinattnEmuThreadCtx* ctx);
};

struct LinattnEmuThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  uint32_t linear_tid;
  uint32_t lane;
  uint32_t warp;
  uint32_t dyn_shared_bytes;  // the launch's dynamic shared memory bytes
  unsigned char* dyn_shared;  // the launch's dynamic shared memory (extern __shared__)
  float* warp_scratch;        // 3 * 256 floats per warp, used by wmma::mma_sync
  const LinattnEmuCallbacks* cb;
  void* rt;  // owned by the Rust runtime
};

enum LinattnEmuWarpOp : uint32_t {
  LINATTN_EMU_WARP_SYNC = 0,
  LINATTN_EMU_SHFL_IDX = 1,
  LINATTN_EMU_SHFL_UP = 2,
  LINATTN_EMU_SHFL_DOWN = 3,
  LINATTN_EMU_SHFL_XOR = 4,
  LINATTN_EMU_BALLOT = 5,
  LINATTN_EMU_ANY = 6,
  LINATTN_EMU_ALL = 7,
  LINATTN_EMU_REDUCE_ADD = 8,
  LINATTN_EMU_REDUCE_MIN_U = 9,
  LINATTN_EMU_REDUCE_MAX_U = 10,
  LINATTN_EMU_REDUCE_MIN_I = 11,
  LINATTN_EMU_REDUCE_MAX_I = 12,
  LINATTN_EMU_REDUCE_AND = 13,
  LINATTN_EMU_REDUCE_OR = 14,
  LINATTN_EMU_REDUCE_XOR = 15,
  LINATTN_EMU_MATCH_ANY = 16,
  LINATTN_EMU_MATCH_ALL = 17,
};

struct LinattnEmuKernel {
  const char* name;
  void (*entry)(const void* params);
  unsigned long long params_size;
  unsigned long long params_align;
  // First argument of the kernel's __launch_bounds__ (maxThreadsPerBlock), 1024 without.
  unsigned long long max_threads;
  // Largest __align__(N) on the extern __shared__ declarations in the kernel's body, 0
  // without: the dynamic shared memory base is aligned to max(N, 16) and no more.
  unsigned long long dyn_align;
};

struct LinattnEmuModule {
  uint32_t magic;  // LINATTN_EMU_MAGIC
  uint32_t abi_version;
  uint32_t thread_ctx_size;
  uint32_t num_kernels;
  const LinattnEmuKernel* kernels;
  void (*set_ctx)(LinattnEmuThreadCtx* ctx);
  const char* lib_name;
  // Clears AddressSanitizer poison left on a fiber stack whose frames were abandoned
  // (a no-op unless the library was built with LINATTN_EMU_SANITIZE=address).
  void (*unpoison)(void* addr, unsigned long long len);
};
#define LINATTN_EMU_MAGIC 0x4C454D55u

// The per-library thread-local context pointer. The build helper names it after the
// library (-DLINATTN_EMU_TLS=<lib>_emu_tls) so several emulated libraries can share
// one binary; the generated registry file defines it.
#ifndef LINATTN_EMU_TLS
#define LINATTN_EMU_TLS linattn_emu_tls
#endif
extern "C" __attribute__((tls_model("initial-exec"))) __thread LinattnEmuThreadCtx* LINATTN_EMU_TLS;

namespace linattn_emu {

inline LinattnEmuThreadCtx* ctx() { return LINATTN_EMU_TLS; }

[[noreturn]] inline void fail(const char* message) {
  LinattnEmuThreadCtx* c = ctx();
  if (c == nullptr) {
    std::fprintf(stderr, "linattn emulator: device code ran outside a kernel launch: %s\n", message);
    std::abort();
  }
  c->cb->fail(c, message);
  std::abort();  // the runtime never resumes a failed fiber
}

template <class T>
struct type_identity {
  using type = T;
};
template <class T>
using type_identity_t = typename type_identity<T>::type;

template <class To, class From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: size mismatch");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

constexpr uint64_t shared_align(uint64_t explicit_align, uint64_t type_align) {
  // Shared variables get at least 16-byte alignment (vectorised accesses assume it).
  return explicit_align > type_align ? (explicit_align > 16 ? explicit_align : 16)
                                     : (type_align > 16 ? type_align : 16);
}

inline void* static_shared(const void* key, uint64_t size, uint64_t align) {
  LinattnEmuThreadCtx* c = ctx();
  if (c == nullptr) fail("__shared__ variable used outside a kernel launch");
  return c->cb->static_shared(c, key, size, align);
}

// The dynamic shared memory base (extern __shared__). The runtime aligns it to the
// largest __align__ on the kernel's own extern __shared__ declarations (at least 16
// bytes) and to nothing more, so a declaration that needs more alignment than the
// kernel declares is a fault here, not a silent misalignment on the GPU.
inline void* dynamic_shared(uint64_t explicit_align, uint64_t type_align, const char* name) {
  LinattnEmuThreadCtx* c = ctx();
  if (c == nullptr) fail("extern __shared__ variable used outside a kernel launch");
  const uint64_t need = explicit_align > type_align ? explicit_align : type_align;
  const uintptr_t base = reinterpret_cast<uintptr_t>(c->dyn_shared);
  if (need > 1 && base % need != 0) {
    const uint64_t have = base & (~base + 1);
    char msg[320];
    std::snprintf(msg, sizeof msg,
                  "extern __shared__ `%s` needs %llu-byte alignment but the dynamic shared memory base is only "
                  "%llu-byte aligned: the base is aligned to the largest __align__ on the extern __shared__ "
                  "declarations in the kernel's body (at least 16 bytes)",
                  name, (unsigned long long)need, (unsigned long long)have);
    fail(msg);
  }
  return c->dyn_shared;
}

// The launch's dynamic shared memory bytes (the third launch parameter), what
// PTX's %dynamic_smem_size reads on a GPU: project helper headers check their
// shared-memory carving against it.
inline uint64_t dynamic_shared_bytes() {
  LinattnEmuThreadCtx* c = ctx();
  if (c == nullptr) fail("dynamic_shared_bytes() called outside a kernel launch");
  return c->dyn_shared_bytes;
}

// Registry helpers (the build helper's generated kernel info functions call them).
template <class N>
constexpr unsigned long long launch_bound(N max_threads) {
  static_assert(std::is_integral<N>::value, "__launch_bounds__ takes integer constants");
  return max_threads > 0 ? (unsigned long long)max_threads : 0ull;
}
constexpr unsigned long long max_align(std::initializer_list<unsigned long long> aligns) {
  unsigned long long m = 0;
  for (unsigned long long a : aligns) m = a > m ? a : m;
  return m;
}

inline uint64_t warp_op(uint32_t op, uint32_t mask, uint64_t value, int32_t arg, int32_t width) {
  LinattnEmuThreadCtx* c = ctx();
  return c->cb->warp_op(c, op, mask, value, arg, width);
}

template <class T>
inline uint64_t to_bits64(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp shuffles take values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T>
inline T from_bits64(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Entry points generated by the build helper call kernels through these, so the
// params type never has to be spelled outside the kernel's own scope.
template <class P>
inline void invoke_kernel(void (*kernel)(P), const void* params) {
  using D = typename std::decay<P>::type;
  kernel(*static_cast<const D*>(params));
}
inline void invoke_kernel(void (*kernel)(), const void*) { kernel(); }
template <class P>
inline void kernel_info(void (*)(P), unsigned long long* size, unsigned long long* align) {
  static_assert(!std::is_reference<P>::value, "kernels must take their params struct by value");
  using D = typename std::decay<P>::type;
  static_assert(std::is_trivially_copyable<D>::value, "kernel params must be trivially copyable");
  *size = sizeof(D);
  *align = alignof(D);
}
inline void kernel_info(void (*)(), unsigned long long* size, unsigned long long* align) {
  *size = 0;
  *align = 1;
}

}  // namespace linattn_emu

// Rewritten shared declarations (see the build helper). ALIGN is an explicit
// __align__/alignas value or 0; the type may contain commas, hence the variadic form.
#define LINATTN_EMU_SHARED(ALIGN, NAME, ...)                                                     \
  static constexpr char linattn_emu_shared_key_##NAME = 0;                                       \
  ::linattn_emu::type_identity_t<__VA_ARGS__>& NAME =                                            \
      *static_cast<::linattn_emu::type_identity_t<__VA_ARGS__>*>(::linattn_emu::static_shared(   \
          &linattn_emu_shared_key_##NAME, sizeof(::linattn_emu::type_identity_t<__VA_ARGS__>),   \
          ::linattn_emu::shared_align((ALIGN), alignof(::linattn_emu::type_identity_t<__VA_ARGS__>))))
#define LINATTN_EMU_EXTERN_SHARED(ALIGN, NAME, ...)                                    \
  ::linattn_emu::type_identity_t<__VA_ARGS__>* const NAME =                             \
      static_cast<::linattn_emu::type_identity_t<__VA_ARGS__>*>(::linattn_emu::dynamic_shared( \
          (ALIGN), alignof(::linattn_emu::type_identity_t<__VA_ARGS__>), #NAME))

// ---------------------------------------------------------------------------------
// Built-in variables
// ---------------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::linattn_emu::ctx()->thread_idx))
#define blockIdx (static_cast<const uint3&>(::linattn_emu::ctx()->block_idx))
#define blockDim (static_cast<const dim3&>(::linattn_emu::ctx()->block_dim))
#define gridDim (static_cast<const dim3&>(::linattn_emu::ctx()->grid_dim))
#define warpSize 32

// ---------------------------------------------------------------------------------
// Barriers and warp collectives
// ---------------------------------------------------------------------------------
inline void __syncthreads() {
  LinattnEmuThreadCtx* c = ::linattn_emu::ctx();
  c->cb->syncthreads(c, 0, 0);
}
inline int __syncthreads_count(int pred) {
  LinattnEmuThreadCtx* c = ::linattn_emu::ctx();
  return (int)c->cb->syncthreads(c, 1, pred != 0);
}
inline int __syncthreads_and(int pred) {
  LinattnEmuThreadCtx* c = ::linattn_emu::ctx();
  return (int)c->cb->syncthreads(c, 2, pred != 0);
}
inline int __syncthreads_or(int pred) {
  LinattnEmuThreadCtx* c = ::linattn_emu::ctx();
  return (int)c->cb->syncthreads(c, 3, pred != 0);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::linattn_emu::warp_op(LINATTN_EMU_WARP_SYNC, mask, 0, 0, 32);
}
inline unsigned __activemask() {
  LinattnEmuThreadCtx* c = ::linattn_emu::ctx();
  return c->cb->active_mask(c);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { ::linattn_emu::fail("__trap() called"); }
[[noreturn]] inline void __brkpt() { ::linattn_emu::fail("__brkpt() called"); }
inline void __nanosleep(unsigned) {}
inline long long clock64() {
  return (long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline long long __clock64() { return clock64(); }

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return ::linattn_emu::from_bits64<T>(
      ::linattn_emu::warp_op(LINATTN_EMU_SHFL_IDX, mask, ::linattn_emu::to_bits64(var), src_lane, width));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::linattn_emu::from_bits64<T>(
      ::linattn_emu::warp_op(LINATTN_EMU_SHFL_UP, mask, ::linattn_emu::to_bits64(var), (int32_t)delta, width));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::linattn_emu::from_bits64<T>(::linattn_emu::warp_op(LINATTN_EMU_SHFL_DOWN, mask,
                                                              ::linattn_emu::to_bits64(var), (int32_t)delta, width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::linattn_emu::from_bits64<T>(
      ::linattn_emu::warp_op(LINATTN_EMU_SHFL_XOR, mask, ::linattn_emu::to_bits64(var), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return (unsigned)::linattn_emu::warp_op(LINATTN_EMU_BALLOT, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) {
  return (int)::linattn_emu::warp_op(LINATTN_EMU_ANY, mask, pred != 0, 0, 32);
}
inline int __all_sync(unsigned mask, int pred) {
  return (int)::linattn_emu::warp_op(LINATTN_EMU_ALL, mask, pred != 0, 0, 32);
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  return (unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_ADD, mask, v, 0, 32);
}
inline int __reduce_add_sync(unsigned mask, int v) {
  return (int)(unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_ADD, mask, (uint32_t)v, 0, 32);
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return (unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_MIN_U, mask, v, 0, 32);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return (unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_MAX_U, mask, v, 0, 32);
}
inline int __reduce_min_sync(unsigned mask, int v) {
  return (int)(unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_MIN_I, mask, (uint32_t)v, 0, 32);
}
inline int __reduce_max_sync(unsigned mask, int v) {
  return (int)(unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_MAX_I, mask, (uint32_t)v, 0, 32);
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
  return (unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_AND, mask, v, 0, 32);
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
  return (unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_OR, mask, v, 0, 32);
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
  return (unsigned)::linattn_emu::warp_op(LINATTN_EMU_REDUCE_XOR, mask, v, 0, 32);
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  return (unsigned)::linattn_emu::warp_op(LINATTN_EMU_MATCH_ANY, mask, ::linattn_emu::to_bits64(value), 0, 32);
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
  unsigned r =
      (unsigned)::linattn_emu::warp_op(LINATTN_EMU_MATCH_ALL, mask, ::linattn_emu::to_bits64(value), 0, 32);
  *pred = r != 0;
  return r;
}

// ---------------------------------------------------------------------------------
// Atomics: blocks run on several OS threads, so these are real atomics.
// ---------------------------------------------------------------------------------
namespace linattn_emu {
template <class T, class F>
inline T atomic_update(T* address, F f) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "atomic on an unsupported size");
  using U = typename std::conditional<sizeof(T) == 2, uint16_t,
                                      typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type>::type;
  U* p = reinterpret_cast<U*>(address);
  U old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T old_value = bit_cast<T>(old_bits);
    U new_bits = bit_cast<U>(static_cast<T>(f(old_value)));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return old_value;
  }
}
}  // namespace linattn_emu

#define LINATTN_EMU_ATOMIC_INT(T)                                                                          \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                    \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                  \
  inline T atomicMin(T* p, T v) {                                                                        \
    return ::linattn_emu::atomic_update(p, [v](T o) { return o < v ? o : v; });                         \
  }                                                                                                      \
  inline T atomicMax(T* p, T v) {                                                                        \
    return ::linattn_emu::atomic_update(p, [v](T o) { return o > v ? o : v; });                         \
  }                                                                                                      \
  inline T atomicCAS(T* p, T compare, T v) {                                                             \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);              \
    return compare;                                                                                      \
  }
LINATTN_EMU_ATOMIC_INT(int)
LINATTN_EMU_ATOMIC_INT(unsigned int)
LINATTN_EMU_ATOMIC_INT(unsigned long long)
LINATTN_EMU_ATOMIC_INT(long long)
#undef LINATTN_EMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* p, unsigned short compare, unsigned short v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline float atomicAdd(float* p, float v) {
  return ::linattn_emu::atomic_update(p, [v](float o) { return o + v; });
}
inline double atomicAdd(double* p, double v) {
  return ::linattn_emu::atomic_update(p, [v](double o) { return o + v; });
}
inline float atomicExch(float* p, float v) {
  return ::linattn_emu::bit_cast<float>(
      __atomic_exchange_n(reinterpret_cast<uint32_t*>(p), ::linattn_emu::bit_cast<uint32_t>(v), __ATOMIC_RELAXED));
}
inline float atomicMax(float* p, float v) {
  return ::linattn_emu::atomic_update(p, [v](float o) { return fmaxf(o, v); });
}
inline float atomicMin(float* p, float v) {
  return ::linattn_emu::atomic_update(p, [v](float o) { return fminf(o, v); });
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  return ::linattn_emu::atomic_update(p, [limit](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  return ::linattn_emu::atomic_update(p, [limit](unsigned o) { return (o == 0 || o > limit) ? limit : o - 1u; });
}
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicExch_block atomicExch
#define atomicCAS_block atomicCAS
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin

// ---------------------------------------------------------------------------------
// Loads/stores with cache hints: plain accesses on the CPU.
// ---------------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline T __ldcv(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwb(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------
// Integer and float intrinsics
// ---------------------------------------------------------------------------------
inline int __float_as_int(float x) { return ::linattn_emu::bit_cast<int>(x); }
inline float __int_as_float(int x) { return ::linattn_emu::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return ::linattn_emu::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return ::linattn_emu::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return ::linattn_emu::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return ::linattn_emu::bit_cast<double>(x); }
inline int __double2hiint(double x) { return (int)(::linattn_emu::bit_cast<unsigned long long>(x) >> 32); }
inline int __double2loint(double x) { return (int)(::linattn_emu::bit_cast<unsigned long long>(x) & 0xffffffffu); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned long long __brevll(unsigned long long x) {
  unsigned long long r = 0;
  for (int i = 0; i < 64; ++i) r |= ((x >> i) & 1ull) << (63 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __mul24(int a, int b) { return (int)((a << 8) >> 8) * (int)((b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    unsigned sel = (s >> (4 * i)) & 7u;
    r |= (unsigned)((v >> (8 * sel)) & 0xffu) << (8 * i);
  }
  return r;
}
inline unsigned __sad(int x, int y, unsigned z) { return z + (unsigned)(x > y ? x - y : y - x); }

// Float conversions with explicit rounding modes.
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)std::floor(x); }
inline int __float2int_ru(float x) { return (int)std::ceil(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)std::nearbyint(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline long long __float2ll_rn(float x) { return (long long)std::nearbyint(x); }
inline long long __float2ll_rz(float x) { return (long long)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }
inline int __double2int_rn(double x) { return (int)std::nearbyint(x); }
inline int __double2int_rz(double x) { return (int)x; }

// ---------------------------------------------------------------------------------
// Math with CUDA's names.
//
// The fast intrinsics follow the GPU's documented construction (CUDA Math API,
// "Single Precision Intrinsics"; PTX ISA ex2/lg2/div.approx) rather than the exact
// host functions, so code that relies on exact results notices:
//   __expf(x)      = ex2.approx(x * log2(e)), the product rounded to float first
//   __exp10f(x)    = ex2.approx(x * log2(10))
//   __log2f(x)     = lg2.approx(x);  __logf(x) = lg2.approx(x) * ln(2);
//   __log10f(x)    = lg2.approx(x) * log10(2)
//   __powf(x, y)   = ex2.approx(y * lg2.approx(x))   (NaN for x < 0)
//   __fdividef(x, y) = x * (1 / y), with 1 / y = 0 for 2^126 < |y| (so 0 there, and
//                    NaN if x is infinite)
// ex2.approx and lg2.approx flush subnormal inputs and results to sign-preserving zero
// ("most input and output values around denormal range are flushed to sign preserving
// 0.0"). Their own few-ulp approximation error is not modelled (the host exp2f/log2f
// are used on the flushed float argument). The other functions (expf, logf, sqrtf,
// __sinf, __tanhf, rsqrtf, ...) use the accurate host functions.
// ---------------------------------------------------------------------------------
namespace linattn_emu {
inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
inline float ex2_approx(float x) { return ftz(exp2f(ftz(x))); }
inline float lg2_approx(float x) { return log2f(ftz(x)); }
}  // namespace linattn_emu
inline float __expf(float x) { return ::linattn_emu::ex2_approx(x * 1.44269504f); }
inline float __exp10f(float x) { return ::linattn_emu::ex2_approx(x * 3.32192809f); }
inline float __logf(float x) { return ::linattn_emu::lg2_approx(x) * 0.693147181f; }
inline float __log2f(float x) { return ::linattn_emu::lg2_approx(x); }
inline float __log10f(float x) { return ::linattn_emu::lg2_approx(x) * 0.301029996f; }
inline float __powf(float x, float y) { return ::linattn_emu::ex2_approx(y * ::linattn_emu::lg2_approx(x)); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline void sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) {
  const float r = std::fabs(b) > 0x1p126f ? std::copysign(0.0f, b) : 1.0f / b;
  return a * r;
}
inline float fdividef(float a, float b) { return __fdividef(a, b); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }

// min/max as CUDA overloads them (same-type overloads, plus a mixed-type fallback that
// uses the usual arithmetic conversions).
#define LINATTN_EMU_MINMAX(T)                   \
  inline T min(T a, T b) { return a < b ? a : b; } \
  inline T max(T a, T b) { return a > b ? a : b; }
LINATTN_EMU_MINMAX(int)
LINATTN_EMU_MINMAX(unsigned int)
LINATTN_EMU_MINMAX(long)
LINATTN_EMU_MINMAX(unsigned long)
LINATTN_EMU_MINMAX(long long)
LINATTN_EMU_MINMAX(unsigned long long)
#undef LINATTN_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value &&
                                          !std::is_same<A, B>::value>::type>
inline typename std::common_type<A, B>::type min(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return ::min((C)a, (C)b);
}
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value &&
                                          !std::is_same<A, B>::value>::type>
inline typename std::common_type<A, B>::type max(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return ::max((C)a, (C)b);
}

#include "linattn_emu_fp16.h"
#include "linattn_emu_wmma.h"

#endif  // LINATTN_EMU_H
