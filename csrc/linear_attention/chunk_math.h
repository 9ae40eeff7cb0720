// The element-wise pieces of the chunked linear-attention kernel (chunk_kernel.h): feature maps
// and their derivatives, causal masking, row views, vector passes. Part of each instruction-set
// build (included from cpu_kernel_impl.h inside its target pragma).
#pragma once

#include "kernel.h"
#include "../common/cpu_gemm.h"
#include "../common/fast_math.h"
#include "../common/masked_product.h"
#include "../common/row_loader.h"

#include <type_traits>

namespace linattn {
namespace LINATTN_ISA {
namespace {

// φ and its derivative, with the switch outside the element loops and branch-free bodies,
// so the loops vectorize. elu(x) + 1 is x + 1 for x > 0 and exp(x) otherwise (exactly, unlike
// expm1(x) + 1); its derivative is 1 for x > 0 and exp(x) otherwise.
template <typename acc_t>
void apply_feature_map(FeatureMap map, acc_t* x, int64_t rows, int64_t cols, int64_t ld) {
  if (map == kFeatureIdentity) return;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = x + r * ld;
    if (map == kFeatureElu) {
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t e = exp_nonpositive(row[c]);
        row[c] = row[c] > 0 ? row[c] + acc_t(1) : e;
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) row[c] = row[c] < 0 ? acc_t(0) : row[c];  // NaN stays NaN
    }
  }
}

// grad[c] *= φ'(x[c]) for one row, from the features f = φ(x) rather than x, so no exp is
// evaluated again: elu+1 has φ' = 1 where x > 0, which is where f > 1 (f = x + 1 there and
// exp(x) <= 1 elsewhere; where x + 1 rounds to 1 both sides give 1), and φ' = exp(x) = f
// elsewhere; relu has φ' = 1 where f > 0. A NaN x has a NaN f: elu passes NaN, relu 0, as φ'(x).
template <typename acc_t>
void apply_feature_map_derivative(FeatureMap map, acc_t* grad, const acc_t* f, int64_t cols) {
  if (map == kFeatureElu) {
    for (int64_t c = 0; c < cols; ++c) grad[c] *= f[c] > acc_t(1) ? acc_t(1) : f[c];
  } else if (map == kFeatureRelu) {
    for (int64_t c = 0; c < cols; ++c) grad[c] = f[c] > acc_t(0) ? grad[c] : acc_t(0);
  }
}

// Zeroes the strictly upper triangle of an L×L row-major block: keeps key j <= query i.
template <typename acc_t>
void keep_causal(acc_t* a, int64_t L, int64_t ld) {
  for (int64_t i = 0; i < L; ++i) std::fill(a + i * ld + i + 1, a + i * ld + L, acc_t(0));
}

// A normalizer that is 0 or subnormal (only possible when eps underflows the accumulation type
// and the query's features miss every key, or signed features cancel): the row is defined as 0
// (numerator·0, so still NaN where it sees a NaN or Inf) and passes no gradient, instead of 0/0
// or a reciprocal that overflows. NaN is not vanished.
template <typename acc_t>
bool vanished(acc_t d) {
  return std::abs(d) < std::numeric_limits<acc_t>::min();
}

// A block of L rows in the accumulation type: the input itself where it can be multiplied in
// place (see Kernel::kInPlace), else a scratch copy. ld is its row stride in elements.
template <typename acc_t>
struct Rows {
  const acc_t* data;
  int64_t ld;
  const acc_t* row(int64_t r) const { return data + r * ld; }
};

template <typename acc_t>
acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += x[c] * y[c];
  return sum;
}

// y (n) += Σ_r w[r]·x_r over the rows of x; w null means all ones (column sums).
template <typename acc_t>
void add_weighted_rows(acc_t* y, Rows<acc_t> x, const acc_t* w, int64_t L, int64_t n) {
  for (int64_t r = 0; r < L; ++r) {
    const acc_t* row = x.row(r);
    const acc_t wr = w ? w[r] : acc_t(1);
    if (wr == acc_t(0)) continue;  // a zero weight adds nothing, not 0·Inf
    for (int64_t c = 0; c < n; ++c) y[c] += wr * row[c];
  }
}

// Row r of the L × n block x (leading dim ld) += w[r]·y (n); w null means all ones.
template <typename acc_t>
void add_outer(acc_t* x, int64_t ld, const acc_t* w, const acc_t* y, int64_t L, int64_t n) {
  for (int64_t r = 0; r < L; ++r) {
    const acc_t wr = w ? w[r] : acc_t(1);
    if (wr == acc_t(0)) continue;
    acc_t* row = x + r * ld;
    for (int64_t c = 0; c < n; ++c) row[c] += wr * y[c];
  }
}

}  // namespace
}  // namespace LINATTN_ISA
}  // namespace linattn
