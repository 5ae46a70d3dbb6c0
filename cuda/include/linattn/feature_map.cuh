// The feature maps phi and their derivatives, fp32 arithmetic.
// elu+1 is x + 1 for x > 0 and exp(x) otherwise: positive everywhere, so a
// normalised output is a convex combination of values.
#pragma once
#include "linattn/params.h"

namespace linattn {

__device__ __forceinline__ float phi(float x, int map) {
    switch (map) {
        case LINATTN_FEATURE_MAP_ELU_PLUS_ONE: return x > 0.0f ? x + 1.0f : expf(x);
        case LINATTN_FEATURE_MAP_RELU: return fmaxf(x, 0.0f);
        default: return x;
    }
}

__device__ __forceinline__ float phi_prime(float x, int map) {
    switch (map) {
        case LINATTN_FEATURE_MAP_ELU_PLUS_ONE: return x > 0.0f ? 1.0f : expf(x);
        case LINATTN_FEATURE_MAP_RELU: return x > 0.0f ? 1.0f : 0.0f;
        default: return 1.0f;
    }
}

}  // namespace linattn
