// exp(x) for x <= 0 in float32, written branch-free so that loops over it vectorize (the
// elu+1 feature map evaluates it on every element of q and k). Cody-Waite range reduction and
// Cephes' degree-6 polynomial: within 2 ulp of expf down to the smallest normal float,
// exp(-87.3365) = FLT_MIN; below that it returns 0 (within FLT_MIN of the true value, and 0 as
// the exp of an underflowing score must be: a feature or probability that vanished stays out of
// every sum, so a normalizer built only of such terms is exactly eps, or 0).
// NaN stays NaN, and nothing converts a float to an integer (undefined behaviour for NaN):
// round(x / ln 2) comes from the 1.5·2^23 rounding trick and integer bit patterns.
#pragma once

#include "cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace linattn {
namespace LINATTN_ISA {  // one copy per instruction-set build (cpu_isa.h)

inline float exp_nonpositive(float input) {
  constexpr float kLogMin = -87.3365447f;  // ln(FLT_MIN)
  // Argument order matters: std::min/max return their first argument when the comparison is
  // false, so a NaN x stays NaN (and so does the result) instead of being clamped away.
  float x = std::max(std::min(input, 0.0f), kLogMin);
  // shifted = 1.5·2^23 + n with n = round(x / ln 2) in [-126, 0], rounded by the addition itself.
  constexpr float kRoundingShift = 12582912.0f;  // 1.5·2^23, bit pattern 0x4B400000
  const float shifted = x * 1.44269504088896341f + kRoundingShift;
  const float nf = shifted - kRoundingShift;
  float r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * z + r + 1.0f;
  // 2^n from the low bits of `shifted` (unsigned arithmetic: defined for any bit pattern).
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  const uint32_t scale_bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  // A select, not a branch (loops over it still vectorize); false for NaN, which stays NaN.
  return input < kLogMin ? 0.0f : y * scale;
}

inline double exp_nonpositive(double x) {
  return std::exp(x > 0.0 ? 0.0 : x);
}

// tanh(x) in float32 from exp_nonpositive, branch-free so that loops over it vectorize (the
// restricted softmax's soft-capped scores, c·tanh(s / c)): (1 − e) / (1 + e) with e = e^(−2|x|),
// the sign put back. Its error is absolute, a few float ulps of 1 (relatively larger only where
// |tanh x| < 1e-3), which is the error a capped score may carry: softmax sees scores' absolute
// errors. ±Inf give ±1, NaN stays NaN. float64 keeps std::tanh.
inline float tanh_of(float x) {
  const float e = exp_nonpositive(-2.0f * std::fabs(x));
  return std::copysign((1.0f - e) / (1.0f + e), x);
}

inline double tanh_of(double x) { return std::tanh(x); }

}  // namespace LINATTN_ISA
}  // namespace linattn
