// linattn emulator: __half and __nv_bfloat16 as 16-bit storage types with CUDA's
// round-to-nearest-even conversions. Arithmetic goes through float and rounds back.
// Included by linattn_emu.h.
#pragma once

namespace linattn_emu {

inline uint16_t float_to_half_bits(float f) {
  uint32_t x = bit_cast<uint32_t>(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;               // NaN: CUDA's canonical half NaN
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 (and inf) -> inf
  if (ax < 0x38800000u) {                              // below 2^-14: subnormal half or zero
    if (ax <= 0x33000000u) return (uint16_t)sign;      // <= 2^-25 rounds (ties-to-even) to 0
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;  // 14..24
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half_point = 1u << (shift - 1u);
    if (rem > half_point || (rem == half_point && (q & 1u))) ++q;
    return (uint16_t)(sign | q);
  }
  uint32_t e = (ax >> 23) - 112u;
  uint32_t m = ax & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
  return (uint16_t)(sign | h);
}

inline float half_bits_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0x1fu) {
    bits = sign | 0x7f800000u | (m << 13);
  } else if (e == 0) {
    if (m == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int shift = 0;
      while ((m & 0x400u) == 0) {
        m <<= 1;
        ++shift;
      }
      m &= 0x3ffu;
      bits = sign | ((uint32_t)(113 - shift) << 23) | (m << 13);
    }
  } else {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  }
  return bit_cast<float>(bits);
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x = bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // canonical NaN
  uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)((x + rounding) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return bit_cast<float>((uint32_t)b << 16); }

// Round a double to float with round-to-odd, so that a second rounding to a 16-bit
// format is correctly rounded.
inline float double_to_float_round_odd(double d) {
  float f = (float)d;
  if ((double)f == d || d != d || std::isinf(f)) return f;
  uint32_t bits = bit_cast<uint32_t>(f);
  if (std::fabs((double)f) > std::fabs(d)) bits -= 1;  // truncate toward zero
  bits |= 1u;
  return bit_cast<float>(bits);
}

}  // namespace linattn_emu

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __attribute__((aligned(2))) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  __half(float f) : __x(::linattn_emu::float_to_half_bits(f)) {}
  __half(double d) : __x(::linattn_emu::float_to_half_bits(::linattn_emu::double_to_float_round_odd(d))) {}
  __half(int v) : __half((float)v) {}
  __half(unsigned int v) : __half((float)v) {}
  __half(short v) : __half((float)v) {}
  __half(unsigned short v) : __half((float)v) {}
  __half(long long v) : __half((double)v) {}
  __half(unsigned long long v) : __half((double)v) {}
  operator float() const { return ::linattn_emu::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
  __half& operator=(float f) {
    __x = ::linattn_emu::float_to_half_bits(f);
    return *this;
  }
};

struct __attribute__((aligned(2))) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(::linattn_emu::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double d)
      : __x(::linattn_emu::float_to_bf16_bits(::linattn_emu::double_to_float_round_odd(d))) {}
  __nv_bfloat16(int v) : __nv_bfloat16((double)v) {}
  __nv_bfloat16(unsigned int v) : __nv_bfloat16((double)v) {}
  __nv_bfloat16(short v) : __nv_bfloat16((float)v) {}
  __nv_bfloat16(unsigned short v) : __nv_bfloat16((float)v) {}
  __nv_bfloat16(long long v) : __nv_bfloat16((double)v) {}
  __nv_bfloat16(unsigned long long v) : __nv_bfloat16((double)v) {}
  operator float() const { return ::linattn_emu::bf16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
  __nv_bfloat16& operator=(float f) {
    __x = ::linattn_emu::float_to_bf16_bits(f);
    return *this;
  }
};

typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

struct __attribute__((aligned(4))) __half2 {
  __half x, y;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

// ---- conversions ----
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline float __half2float(__half h) { return (float)h; }
inline __half __int2half_rn(int v) { return __half((float)v); }
inline __half __uint2half_rn(unsigned v) { return __half((float)v); }
inline __half __short2half_rn(short v) { return __half((float)v); }
inline __half __ushort2half_rn(unsigned short v) { return __half((float)v); }
inline __half __ll2half_rn(long long v) { return __half((double)v); }
inline int __half2int_rn(__half h) { return (int)std::nearbyint((float)h); }
inline int __half2int_rz(__half h) { return (int)(float)h; }
inline unsigned __half2uint_rn(__half h) { return (unsigned)std::nearbyint((float)h); }
inline short __half2short_rn(__half h) { return (short)std::nearbyint((float)h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short v) { return __half(__half_raw{v}); }
inline __half __short_as_half(short v) { return __half(__half_raw{(unsigned short)v}); }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {
  uint32_t x = ::linattn_emu::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16(__nv_bfloat16_raw{0x7fffu});
  return __nv_bfloat16(__nv_bfloat16_raw{(unsigned short)(x >> 16)});
}
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline __nv_bfloat16 __int2bfloat16_rn(int v) { return __nv_bfloat16((double)v); }
inline __nv_bfloat16 __uint2bfloat16_rn(unsigned v) { return __nv_bfloat16((double)v); }
inline int __bfloat162int_rn(__nv_bfloat16 b) { return (int)std::nearbyint((float)b); }
inline int __bfloat162int_rz(__nv_bfloat16 b) { return (int)(float)b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return (short)b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16(__nv_bfloat16_raw{v}); }
inline __nv_bfloat16 __short_as_bfloat16(short v) {
  return __nv_bfloat16(__nv_bfloat16_raw{(unsigned short)v});
}
inline __half __bfloat162half(__nv_bfloat16 b) { return __half((float)b); }  // exact float, one rounding

// ---- pairs ----
inline __half2 make_half2(__half x, __half y) { return __half2{x, y}; }
inline __half2 __halves2half2(__half x, __half y) { return __half2{x, y}; }
inline __half2 __half2half2(__half x) { return __half2{x, x}; }
inline __half2 __float2half2_rn(float f) { return __half2{__half(f), __half(f)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __half2{__half(f.x), __half(f.y)}; }
inline float2 __half22float2(__half2 h) { return float2{(float)h.x, (float)h.y}; }
inline float __low2float(__half2 h) { return (float)h.x; }
inline float __high2float(__half2 h) { return (float)h.y; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __lows2half2(__half2 a, __half2 b) { return __half2{a.x, b.x}; }
inline __half2 __highs2half2(__half2 a, __half2 b) { return __half2{a.y, b.y}; }
inline __half2 __low2half2(__half2 a) { return __half2{a.x, a.x}; }
inline __half2 __high2half2(__half2 a) { return __half2{a.y, a.y}; }

inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) { return __nv_bfloat162{x, y}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) { return __nv_bfloat162{x, y}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 x) { return __nv_bfloat162{x, x}; }
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return __nv_bfloat162{__nv_bfloat16(f), __nv_bfloat16(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) {
  return __nv_bfloat162{__nv_bfloat16(f.x), __nv_bfloat16(f.y)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{(float)h.x, (float)h.y}; }
inline float __low2float(__nv_bfloat162 h) { return (float)h.x; }
inline float __high2float(__nv_bfloat162 h) { return (float)h.y; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }

// ---- arithmetic, comparisons and classification (through float) ----
#define LINATTN_EMU_HALF_OPS(H, INF_BITS)                                                               \
  inline H operator+(const H& a, const H& b) { return H((float)a + (float)b); }                   \
  inline H operator-(const H& a, const H& b) { return H((float)a - (float)b); }                   \
  inline H operator*(const H& a, const H& b) { return H((float)a * (float)b); }                   \
  inline H operator/(const H& a, const H& b) { return H((float)a / (float)b); }                   \
  inline H operator-(const H& a) {                                                                 \
    H r = a;                                                                                       \
    r.__x ^= 0x8000u;                                                                              \
    return r;                                                                                      \
  }                                                                                                \
  inline H operator+(const H& a) { return a; }                                                     \
  inline H& operator+=(H& a, const H& b) { return a = a + b; }                                     \
  inline H& operator-=(H& a, const H& b) { return a = a - b; }                                     \
  inline H& operator*=(H& a, const H& b) { return a = a * b; }                                     \
  inline H& operator/=(H& a, const H& b) { return a = a / b; }                                     \
  inline bool operator==(const H& a, const H& b) { return (float)a == (float)b; }                 \
  inline bool operator!=(const H& a, const H& b) { return (float)a != (float)b; }                 \
  inline bool operator<(const H& a, const H& b) { return (float)a < (float)b; }                   \
  inline bool operator>(const H& a, const H& b) { return (float)a > (float)b; }                   \
  inline bool operator<=(const H& a, const H& b) { return (float)a <= (float)b; }                 \
  inline bool operator>=(const H& a, const H& b) { return (float)a >= (float)b; }                 \
  inline H __hadd(H a, H b) { return a + b; }                                                    \
  inline H __hsub(H a, H b) { return a - b; }                                                    \
  inline H __hmul(H a, H b) { return a * b; }                                                    \
  inline H __hdiv(H a, H b) { return a / b; }                                                    \
  inline H __hfma(H a, H b, H c) { return H(fmaf((float)a, (float)b, (float)c)); }              \
  inline H __hneg(H a) { return -a; }                                                            \
  inline H __habs(H a) {                                                                         \
    a.__x &= 0x7fffu;                                                                              \
    return a;                                                                                      \
  }                                                                                                \
  inline H __hmax(H a, H b) { return H(fmaxf((float)a, (float)b)); }                            \
  inline H __hmin(H a, H b) { return H(fminf((float)a, (float)b)); }                            \
  inline bool __heq(H a, H b) { return a == b; }                                                 \
  inline bool __hne(H a, H b) { return a != b; }                                                 \
  inline bool __hlt(H a, H b) { return a < b; }                                                  \
  inline bool __hle(H a, H b) { return a <= b; }                                                 \
  inline bool __hgt(H a, H b) { return a > b; }                                                  \
  inline bool __hge(H a, H b) { return a >= b; }                                                 \
  inline bool __hisnan(H a) { return (a.__x & 0x7fffu) > (INF_BITS); }                     \
  inline int __hisinf(H a) {                                                                     \
    return (a.__x & 0x7fffu) == (INF_BITS) ? ((a.__x & 0x8000u) ? -1 : 1) : 0;              \
  }                                                                                                \
  inline H hexp(H a) { return H(expf((float)a)); }                                                 \
  inline H hlog(H a) { return H(logf((float)a)); }                                                 \
  inline H hsqrt(H a) { return H(sqrtf((float)a)); }                                               \
  inline H hrsqrt(H a) { return H(1.0f / sqrtf((float)a)); }                                       \
  inline H hrcp(H a) { return H(1.0f / (float)a); }                                                \
  inline H htanh(H a) { return H(tanhf((float)a)); }                                               \
  inline H hfloor(H a) { return H(floorf((float)a)); }                                             \
  inline H hceil(H a) { return H(ceilf((float)a)); }
LINATTN_EMU_HALF_OPS(__half, 0x7c00u)
LINATTN_EMU_HALF_OPS(__nv_bfloat16, 0x7f80u)
#undef LINATTN_EMU_HALF_OPS

#define LINATTN_EMU_PAIR_OPS(H2, H)                                                                  \
  inline H2 __hadd2(H2 a, H2 b) { return H2{a.x + b.x, a.y + b.y}; }                                \
  inline H2 __hsub2(H2 a, H2 b) { return H2{a.x - b.x, a.y - b.y}; }                                \
  inline H2 __hmul2(H2 a, H2 b) { return H2{a.x * b.x, a.y * b.y}; }                                \
  inline H2 __h2div(H2 a, H2 b) { return H2{a.x / b.x, a.y / b.y}; }                                \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
  inline H2 __hneg2(H2 a) { return H2{-a.x, -a.y}; }                                                \
  inline H2 __hmax2(H2 a, H2 b) { return H2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }                  \
  inline H2 __hmin2(H2 a, H2 b) { return H2{__hmin(a.x, b.x), __hmin(a.y, b.y)}; }                  \
  inline H2 operator+(const H2& a, const H2& b) { return __hadd2(a, b); }                           \
  inline H2 operator-(const H2& a, const H2& b) { return __hsub2(a, b); }                           \
  inline H2 operator*(const H2& a, const H2& b) { return __hmul2(a, b); }                           \
  inline H2 operator/(const H2& a, const H2& b) { return __h2div(a, b); }                           \
  inline H2& operator+=(H2& a, const H2& b) { return a = a + b; }                                   \
  inline H2& operator*=(H2& a, const H2& b) { return a = a * b; }
LINATTN_EMU_PAIR_OPS(__half2, __half)
LINATTN_EMU_PAIR_OPS(__nv_bfloat162, __nv_bfloat16)
#undef LINATTN_EMU_PAIR_OPS

inline __half atomicAdd(__half* p, __half v) {
  return ::linattn_emu::atomic_update(p, [v](__half o) { return o + v; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return ::linattn_emu::atomic_update(p, [v](__nv_bfloat16 o) { return o + v; });
}
inline __half2 atomicAdd(__half2* p, __half2 v) {
  return ::linattn_emu::atomic_update(p, [v](__half2 o) { return o + v; });
}
