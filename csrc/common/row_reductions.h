// Horizontal reductions over one row of a score block (the flash-style softmax's row maximum
// and row sum), for rows whose width is a multiple of kRowLanes.
//
// Written with intrinsics in the AVX2 and AVX-512 builds: there, GCC's `omp simd reduction`
// ends each reduction in an epilogue that spills the vector and combines its 16 lanes one
// scalar at a time, and plain loops over per-lane arrays are unrolled and scalarized. On rows
// of Swin's 49 keys those epilogues were most of the forward's softmax time (perf). The
// portable loops below serve the baseline build and double.
#pragma once

#include "cpu_isa.h"

#include <cstdint>
#include <limits>

namespace linattn {
namespace LINATTN_ISA {  // one copy per instruction-set build (cpu_isa.h)

constexpr int64_t kRowLanes = 16;  // a multiple of every build's float and double vector length

// The largest score of a row among its visible pairs (a NaN score never wins; −inf when no
// visible score is above −inf), and whether any pair is visible at all.
template <typename acc_t>
acc_t masked_row_max(const acc_t* s, const unsigned char* visible, int64_t width, bool& any_visible) {
  unsigned char any = 0;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  // `omp simd`: the visibility bytes could alias the scores as far as the compiler knows.
#pragma omp simd reduction(| : any) reduction(max : m)
  for (int64_t c = 0; c < width; ++c) {
    any |= visible[c];
    const acc_t x = visible[c] ? s[c] : -std::numeric_limits<acc_t>::infinity();
    m = x > m ? x : m;
  }
  any_visible = any != 0;
  return m;
}

template <typename acc_t>
acc_t row_total(const acc_t* x, int64_t width) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < width; ++c) sum += x[c];
  return sum;
}

// Σ x[c]·y[c] over the c where x[c] ≠ 0, any n: a zero x[c] contributes nothing even where
// y[c] is Inf or NaN (a zero cotangent times a NaN output is not a NaN gradient).
template <typename acc_t>
acc_t dot_where_nonzero(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += x[c] == acc_t(0) ? acc_t(0) : x[c] * y[c];
  return sum;
}

#if LINATTN_ISA_LEVEL >= 2  // AVX-512 F + BW + VL

inline float masked_row_max(const float* s, const unsigned char* visible, int64_t width, bool& any_visible) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = minus_inf;
  __mmask16 any = 0;
  for (int64_t c0 = 0; c0 < width; c0 += kRowLanes) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(visible + c0));
    const __mmask16 lanes = _mm_test_epi8_mask(bytes, bytes);
    // max(x, m) returns its second operand when x is NaN: NaN scores never win.
    m = _mm512_max_ps(_mm512_mask_loadu_ps(minus_inf, lanes, s + c0), m);
    any |= lanes;
  }
  any_visible = any != 0;
  return _mm512_reduce_max_ps(m);
}

inline float row_total(const float* x, int64_t width) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < width; c0 += kRowLanes) sum = _mm512_add_ps(sum, _mm512_loadu_ps(x + c0));
  return _mm512_reduce_add_ps(sum);
}

inline float dot_where_nonzero(const float* x, const float* y, int64_t n) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < n; c0 += kRowLanes) {
    const __mmask16 in_row = n - c0 >= kRowLanes ? __mmask16(0xFFFF) : __mmask16((1u << (n - c0)) - 1);
    const __m512 xs = _mm512_maskz_loadu_ps(in_row, x + c0), ys = _mm512_maskz_loadu_ps(in_row, y + c0);
    const __mmask16 nonzero = _mm512_cmp_ps_mask(xs, _mm512_setzero_ps(), _CMP_NEQ_UQ);  // NaN x counts
    sum = _mm512_mask_add_ps(sum, nonzero, sum, _mm512_mul_ps(xs, ys));
  }
  return _mm512_reduce_add_ps(sum);
}

#elif LINATTN_ISA_LEVEL == 1  // AVX2

inline float horizontal_max(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

inline float horizontal_sum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline float masked_row_max(const float* s, const unsigned char* visible, int64_t width, bool& any_visible) {
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i zero = _mm256_setzero_si256();
  __m256 m0 = minus_inf, m1 = minus_inf;
  __m256i any = zero;
  for (int64_t c0 = 0; c0 < width; c0 += kRowLanes) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(visible + c0));
    const __m256i v0 = _mm256_cvtepu8_epi32(bytes), v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
    const __m256 lanes0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(v0, zero));
    const __m256 lanes1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(v1, zero));
    // max(x, m) returns its second operand when x is NaN: NaN scores never win.
    m0 = _mm256_max_ps(_mm256_blendv_ps(minus_inf, _mm256_loadu_ps(s + c0), lanes0), m0);
    m1 = _mm256_max_ps(_mm256_blendv_ps(minus_inf, _mm256_loadu_ps(s + c0 + 8), lanes1), m1);
    any = _mm256_or_si256(any, _mm256_or_si256(v0, v1));
  }
  any_visible = !_mm256_testz_si256(any, any);
  return horizontal_max(_mm256_max_ps(m0, m1));
}

inline float row_total(const float* x, int64_t width) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < width; c0 += kRowLanes) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + c0));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + c0 + 8));
  }
  return horizontal_sum(_mm256_add_ps(s0, s1));
}

inline float dot_where_nonzero(const float* x, const float* y, int64_t n) {
  __m256 sum = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 xs = _mm256_loadu_ps(x + c);
    const __m256 nonzero = _mm256_cmp_ps(xs, _mm256_setzero_ps(), _CMP_NEQ_UQ);  // NaN x counts
    sum = _mm256_add_ps(sum, _mm256_and_ps(nonzero, _mm256_mul_ps(xs, _mm256_loadu_ps(y + c))));
  }
  float total = horizontal_sum(sum);
  for (; c < n; ++c) total += x[c] == 0.0f ? 0.0f : x[c] * y[c];
  return total;
}

#endif

}  // namespace LINATTN_ISA
}  // namespace linattn
