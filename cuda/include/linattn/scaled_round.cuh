// Power-of-two range scaling for fp32 -> f16 roundings.
//
// f16 holds magnitudes from 2^-24 (subnormal) to 65504. A block of fp32
// values whose largest magnitude `mx` lies outside a kernel's safe window is
// rounded as x * 2^-e instead of x, with e chosen by `pow2_shift` so that
// mx * 2^-e lands in [2^(top-1), 2^top); the consumer undoes the factor in
// fp32. Multiplying by a power of two is exact in binary, so where neither
// the scaled nor the unscaled value leaves f16's normal range,
// T(x * 2^-e) = T(x) * 2^-e bit for bit, and results equal the unscaled
// ones wherever the unscaled ones were finite.
#pragma once

namespace linattn {

// The exponent e with mx * 2^-e in [2^(top-1), 2^top), for a positive mx;
// clamped to +-100 so that 2^e and 2^-e stay normal fp32 numbers. The one
// exponent rule of every f16 scaling, forward and backward (top <= 26).
// frexp's exponent (mx in [2^(f-1), 2^f)) is read from the exponent bits:
// f = E - 126 for a normal mx with biased exponent E. A subnormal mx reads
// as f = -126 and +inf as f = 129; both clamp (to -100, 100) as the true
// exponent would, so this equals frexpf's result for every finite mx > 0,
// and the backward's former `14 - (E - 127)` (= -pow2_shift(mx, 15)) for
// every mx > 0.
__device__ __forceinline__ int pow2_shift(float mx, int top) {
    const int e = ((__float_as_int(mx) >> 23) & 0xff) - 126 - top;
    return e < -100 ? -100 : (e > 100 ? 100 : e);
}

// 2^e, exactly, for |e| <= 126.
__device__ __forceinline__ float pow2(int e) { return __int_as_float((127 + e) << 23); }

// Whether a block whose largest magnitude is mx needs a shift to stay within
// [lo, hi): zero blocks and non-finite maxima never do (nothing to gain).
__device__ __forceinline__ bool pow2_out_of(float mx, float lo, float hi) {
    return mx > 0.0f && mx <= 3.0e38f && (mx >= hi || mx < lo);
}

}  // namespace linattn
