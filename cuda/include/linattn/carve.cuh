// Carving a kernel's dynamic shared memory into buffers, the layout the
// plan's `*_bytes` functions in crates/kernels/src/ops/*/tiling.rs mirror
// in Rust (and size the launch by).
//
// A Rust/CUDA layout mismatch would make a kernel read and write past the
// launch's dynamic shared memory: on a GPU that is another buffer's bytes or
// a fault far from its cause. With LINATTN_SMEM_CHECKS on, every carve checks
// that it ends inside the launch's dynamic shared bytes (PTX's
// %dynamic_smem_size; the emulator's record of the launch): each take() of
// the 128-byte Carve, and the end of each back-to-back layout (smem_end,
// which bounds every buffer before it). A carve past the end fails the
// launch naming both numbers: on the emulator an error returned to the
// caller, on a GPU a trap. On in emulator builds and GPU debug builds
// (nvcc -G defines __CUDACC_DEBUG__; -DLINATTN_SMEM_CHECKS=1 in
// LINATTN_NVCC_FLAGS forces it), compiled out of release GPU builds.
#pragma once
#include <cstdio>

#ifndef LINATTN_SMEM_CHECKS
#if defined(LINATTN_EMULATOR) || defined(__CUDACC_DEBUG__)
#define LINATTN_SMEM_CHECKS 1
#else
#define LINATTN_SMEM_CHECKS 0
#endif
#endif

namespace linattn {

#if LINATTN_SMEM_CHECKS
// The launch's dynamic shared memory in bytes.
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
#ifdef LINATTN_EMULATOR
    return (unsigned)linattn_emu::dynamic_shared_bytes();
#else
    unsigned n;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
#endif
}

// Fails the launch: a carve ends at byte `end` of `have` dynamic bytes.
__device__ inline void smem_overrun(unsigned end, unsigned have) {
#ifdef LINATTN_EMULATOR
    char msg[200];
    std::snprintf(msg, sizeof msg,
                  "shared-memory carve ends at byte %u but the launch has %u dynamic shared bytes "
                  "(the plan's *_bytes function and the kernel's carving disagree)",
                  end, have);
    linattn_emu::fail(msg);
#else
    printf("linattn: shared-memory carve ends at byte %u of %u dynamic shared bytes (block %u, thread %u)\n", end,
           have, blockIdx.x, threadIdx.x);
    __trap();
#endif
}
#endif

#if LINATTN_SMEM_CHECKS
// Fails the launch unless a carve ending at byte `end` fits the launch.
__device__ __forceinline__ void smem_check(unsigned end) {
    const unsigned have = dynamic_smem_bytes();
    if (end > have) smem_overrun(end, have);
}
#endif

// The backward walks' carving: consecutive buffers of the dynamic shared
// memory at `base`, each starting on a 128-byte boundary. Aggregate:
// `Carve cv{reinterpret_cast<char*>(smem), 0u};`.
struct Carve {
    char* base;
    unsigned off;

    // The next n elements of U.
    template <typename U>
    __device__ __forceinline__ U* take(int n) {
        off = (off + 127u) & ~127u;
        U* q = reinterpret_cast<U*>(base + off);
        off += (unsigned)n * (unsigned)sizeof(U);
#if LINATTN_SMEM_CHECKS
        smem_check(off);
#endif
        return q;
    }
};

// The forward walks and the fp32 backward bodies carve their buffers back
// to back with plain pointer arithmetic from `smem` (the code ptxas
// allocates their registers for; routing it through a carver moved the
// fp32 walks by 20-50 registers) and check the end of their last buffer:
// the layout only grows, so that one check covers every buffer before it.
__device__ __forceinline__ void smem_end(const void* smem, const void* end) {
#if LINATTN_SMEM_CHECKS
    smem_check((unsigned)(static_cast<const char*>(end) - static_cast<const char*>(smem)));
#else
    (void)smem;
    (void)end;
#endif
}

}  // namespace linattn
