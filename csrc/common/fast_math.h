// exp(x) for x <= 0 in float32, written branch-free so that loops over it vectorize
// (the elu+1 feature map evaluates it on every element of q and k). Cody-Waite range
// reduction and Cephes' degree-6 polynomial: within 2 ulp of expf on [-87, 0]; below -87 it
// returns exp(-87) ≈ 1.6e-38 instead of flushing towards 0. NaN stays NaN.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace linattn {

inline float exp_nonpositive(float x) {
  // Argument order matters: std::min/max return their first argument when the comparison is
  // false, so a NaN x stays NaN (and so does the result) instead of being clamped away.
  x = std::max(std::min(x, 0.0f), -87.0f);
  // n = round(x / ln 2) for x <= 0 (truncation of a value <= -0.5 rounds half away from 0).
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);
  const float nf = static_cast<float>(n);
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
  const int32_t bits = (n + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline double exp_nonpositive(double x) {
  return std::exp(x > 0.0 ? 0.0 : x);
}

}  // namespace linattn
