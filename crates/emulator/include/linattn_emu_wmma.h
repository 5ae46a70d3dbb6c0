// linattn emulator: nvcuda::wmma for the 16x16x16 shape with __half / __nv_bfloat16
// inputs and float (or __half) accumulators. Included by linattn_emu.h.
//
// Each lane holds as many elements as on sm_80 (`num_elements`: 16 for __half a/b
// fragments, which hold every element twice as on hardware, 8 for __nv_bfloat16 a/b
// and for accumulators), so element-wise loops over a fragment behave alike. Which
// matrix element a slot holds follows the mma.m16n8k16 register layout, but kernels
// must not rely on it (CUDA documents the mapping as unspecified).
//
// load_matrix_sync / store_matrix_sync check what the CUDA C++ Programming Guide
// requires of their arguments: the pointer 256-bit (32-byte) aligned and ldm a multiple
// of 16 bytes (8 elements of __half / __nv_bfloat16, 4 of float). A violation is a
// device fault naming the call, the pointer and ldm (the launch fails with
// EmuError::DeviceFault); on a GPU it is undefined behaviour.
//
// load/store/mma_sync are warp collectives (they synchronise the warp). mma_sync
// computes D[r][c] = C[r][c] + sum_{k=0..15} A[r][k] * B[k][c] in float, adding the
// exact 16-bit products one by one in order k = 0..15.
#pragma once

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename T, int N>
struct __frag_base {
  T x[N];
  enum { num_elements = N, num_storage_elements = N };
  typedef T element_type;
  typedef T storage_element_type;
};

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment;  // only the 16x16x16 shapes below exist

template <> class fragment<matrix_a, 16, 16, 16, __half, row_major> : public __frag_base<__half, 16> {};
template <> class fragment<matrix_a, 16, 16, 16, __half, col_major> : public __frag_base<__half, 16> {};
template <> class fragment<matrix_b, 16, 16, 16, __half, row_major> : public __frag_base<__half, 16> {};
template <> class fragment<matrix_b, 16, 16, 16, __half, col_major> : public __frag_base<__half, 16> {};
template <> class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major> : public __frag_base<__nv_bfloat16, 8> {};
template <> class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, col_major> : public __frag_base<__nv_bfloat16, 8> {};
template <> class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, row_major> : public __frag_base<__nv_bfloat16, 8> {};
template <> class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major> : public __frag_base<__nv_bfloat16, 8> {};
template <> class fragment<accumulator, 16, 16, 16, float> : public __frag_base<float, 8> {};
template <> class fragment<accumulator, 16, 16, 16, __half> : public __frag_base<__half, 8> {};

namespace detail {
inline unsigned lane() { return ::linattn_emu::ctx()->lane; }
inline void warp_sync() { ::linattn_emu::warp_op(LINATTN_EMU_WARP_SYNC, 0xffffffffu, 0, 0, 32); }
// Slot i of `lane` in an a-fragment holds A[row][col] (i taken mod 8).
inline void a_pos(unsigned lane, int i, int& row, int& col) {
  i &= 7;
  row = (int)(lane >> 2) + 8 * ((i >> 1) & 1);
  col = (int)(lane & 3) * 2 + (i & 1) + 8 * (i >> 2);
}
// Slot i of `lane` in a b-fragment holds B[k][n] (i taken mod 8).
inline void b_pos(unsigned lane, int i, int& k, int& n) {
  i &= 7;
  k = (int)(lane & 3) * 2 + (i & 1) + 8 * ((i >> 1) & 1);
  n = (int)(lane >> 2) + 8 * (i >> 2);
}
// Slot i of `lane` in an accumulator holds C[row][col].
inline void c_pos(unsigned lane, int i, int& row, int& col) {
  int q = i & 3;
  row = (int)(lane >> 2) + 8 * (q >> 1);
  col = 8 * (i >> 2) + (int)(lane & 3) * 2 + (q & 1);
}
template <class L>
constexpr bool is_row_major() {
  return std::is_same<L, row_major>::value;
}
// The pointer and leading-dimension requirements of load/store_matrix_sync. O(1).
template <class T>
inline void check_tile(const char* call, const char* use, const void* p, unsigned ldm) {
  constexpr unsigned step = 16u / (unsigned)sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(p) & 31u) == 0;
  if (aligned && ldm % step == 0) return;
  char msg[320];
  if (!aligned)
    std::snprintf(msg, sizeof msg,
                  "wmma::%s (%s): pointer %p is not 256-bit (32-byte) aligned (ldm %u)", call, use, p, ldm);
  else
    std::snprintf(msg, sizeof msg,
                  "wmma::%s (%s): ldm %u is not a multiple of %u elements (16 bytes) of %u-byte elements "
                  "(pointer %p)",
                  call, use, ldm, step, (unsigned)sizeof(T), p);
  ::linattn_emu::fail(msg);
}
}  // namespace detail

template <typename Use, int m, int n, int k, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, m, n, k, T, L>& f, const V& v) {
  T value = T(v);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

template <typename T, typename L>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  detail::check_tile<T>("load_matrix_sync", "matrix_a", p, ldm);
  detail::warp_sync();
  unsigned lane = detail::lane();
  for (int i = 0; i < f.num_elements; ++i) {
    int r, c;
    detail::a_pos(lane, i, r, c);
    f.x[i] = detail::is_row_major<L>() ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
  }
}
template <typename T, typename L>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  detail::check_tile<T>("load_matrix_sync", "matrix_b", p, ldm);
  detail::warp_sync();
  unsigned lane = detail::lane();
  for (int i = 0; i < f.num_elements; ++i) {
    int kk, nn;
    detail::b_pos(lane, i, kk, nn);
    f.x[i] = detail::is_row_major<L>() ? p[(size_t)kk * ldm + nn] : p[(size_t)nn * ldm + kk];
  }
}
template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t layout) {
  detail::check_tile<T>("load_matrix_sync", "accumulator", p, ldm);
  detail::warp_sync();
  unsigned lane = detail::lane();
  for (int i = 0; i < f.num_elements; ++i) {
    int r, c;
    detail::c_pos(lane, i, r, c);
    f.x[i] = layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
  }
}
template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  detail::check_tile<T>("store_matrix_sync", "accumulator", p, ldm);
  detail::warp_sync();
  unsigned lane = detail::lane();
  for (int i = 0; i < f.num_elements; ++i) {
    int r, c;
    detail::c_pos(lane, i, r, c);
    if (layout == mem_row_major)
      p[(size_t)r * ldm + c] = f.x[i];
    else
      p[(size_t)c * ldm + r] = f.x[i];
  }
}

template <typename TA, typename LA, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TA, LB>& b,
                     const fragment<accumulator, 16, 16, 16, TC>& c) {
  LinattnEmuThreadCtx* ctx = ::linattn_emu::ctx();
  float* A = ctx->warp_scratch;
  float* B = A + 256;
  float* C = B + 256;
  unsigned lane = ctx->lane;
  detail::warp_sync();  // every lane is done with the previous mma's scratch
  for (int i = 0; i < a.num_elements; ++i) {
    int r, col;
    detail::a_pos(lane, i, r, col);
    A[r * 16 + col] = (float)a.x[i];
  }
  for (int i = 0; i < b.num_elements; ++i) {
    int kk, nn;
    detail::b_pos(lane, i, kk, nn);
    B[kk * 16 + nn] = (float)b.x[i];
  }
  for (int i = 0; i < c.num_elements; ++i) {
    int r, col;
    detail::c_pos(lane, i, r, col);
    C[r * 16 + col] = (float)c.x[i];
  }
  detail::warp_sync();  // the whole tiles are in scratch
  float out[8];
  for (int i = 0; i < 8; ++i) {
    int r, col;
    detail::c_pos(lane, i, r, col);
    float acc = C[r * 16 + col];
    for (int kk = 0; kk < 16; ++kk) acc += A[r * 16 + kk] * B[kk * 16 + col];
    out[i] = acc;
  }
  for (int i = 0; i < 8; ++i) d.x[i] = TC(out[i]);
}

}  // namespace wmma
}  // namespace nvcuda
