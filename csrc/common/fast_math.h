// exp(x) for x <= 0 in float32, written branch-free so that loops over it vectorize (the
// elu+1 feature map evaluates it on every element of q and k). Cody-Waite range reduction and
// Cephes' degree-6 polynomial: within 2 ulp of expf down to the smallest normal float
// (x ≈ -87.34), then correctly rounded into the subnormals, and exactly 0 below -104 (as expf).
// NaN stays NaN; no float-to-int conversion ever sees a NaN or an out-of-range value.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace linattn {

inline float pow2_int(int32_t n) {  // 2^n for n in [-126, 127]
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}

inline float exp_nonpositive(float x) {
  const bool is_nan = x != x;
  // Clamped to [-104, 0]; NaN replaced by 0 before the integer conversion (and restored below).
  float xc = is_nan ? 0.0f : x;
  xc = xc > 0.0f ? 0.0f : xc;
  xc = xc < -104.0f ? -104.0f : xc;
  // n = round(x / ln 2) for x <= 0 (truncation of a value <= -0.5 rounds half away from 0).
  const int32_t n = static_cast<int32_t>(xc * 1.44269504088896341f - 0.5f);
  const float nf = static_cast<float>(n);
  float r = xc - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * z + r + 1.0f;
  // 2^n in two normal factors (n >= -150 splits into two halves >= -75), so results below the
  // smallest normal round once, into the subnormals, instead of being flushed or clamped.
  const int32_t n_high = n / 2;
  const float result = (y * pow2_int(n_high)) * pow2_int(n - n_high);
  return is_nan ? x : result;
}

inline double exp_nonpositive(double x) {
  return std::exp(x > 0.0 ? 0.0 : x);
}

}  // namespace linattn
