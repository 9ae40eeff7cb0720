// Products of a masked score block with a value-like block, where the masked pairs are
// excluded, never multiplied by 0: with an Inf or NaN in the right operand, 0·Inf = NaN would
// otherwise reach rows that cannot see that position. Finite operands (the common case, found
// by a vectorized scan) take one GEMM, since then 0·x = 0 exactly; others an exact loop that
// skips the masked pairs. Shared by the linear-attention, delta-rule and window-attention CPU
// kernels.
#pragma once

#include "cpu_isa.h"

#include "cpu_gemm.h"

#include <cstdint>

namespace linattn {
namespace LINATTN_ISA {  // one copy per instruction-set build (cpu_isa.h)

// Whether every element of a rows×cols block is finite: x − x is 0 for finite x and NaN for
// ±Inf or NaN. The test is AND-reduced as an integer, which (unlike a float sum) the compiler
// may reorder, so the loop vectorizes.
template <typename acc_t>
bool all_finite(const acc_t* x, int64_t rows, int64_t cols, int64_t ld) {
  int finite = 1;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* row = x + r * ld;
    for (int64_t c = 0; c < cols; ++c) finite &= (row[c] - row[c]) == acc_t(0);
  }
  return finite != 0;
}

// A is an M×N score block whose masked entries are already 0, visible(i, j) says which are not.
//   transpose_a = false: out (M × w) += A·X with X (N × w): out_i += Σ_{visible j} A_ij X_j
//   transpose_a = true:  out (N × w) += Aᵀ·X with X (M × w): out_j += Σ_{visible i} A_ij X_i
template <typename acc_t, typename Visible>
void add_masked_product(bool transpose_a, int64_t M, int64_t N, int64_t w, const acc_t* A,
                        int64_t lda, const acc_t* X, int64_t ldx, acc_t* out, int64_t ldo,
                        Visible visible) {
  const int64_t inner = transpose_a ? M : N, rows = transpose_a ? N : M;
  if (all_finite(X, inner, w, ldx)) {
    gemm<acc_t>(transpose_a, false, rows, w, inner, A, lda, X, ldx, acc_t(1), out, ldo);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* o = out + r * ldo;
    for (int64_t s = 0; s < inner; ++s) {
      const int64_t i = transpose_a ? s : r, j = transpose_a ? r : s;
      if (!visible(i, j)) continue;
      const acc_t a = A[i * lda + j];
      const acc_t* x = X + s * ldx;
      for (int64_t c = 0; c < w; ++c) o[c] += a * x[c];
    }
  }
}

// out (L × w) += tril(A)·X, or tril(A)ᵀ·X when transpose_a: the causal product of a chunk,
// A's strictly upper triangle already 0 and excluded (linear attention's chunks, the delta rule's
// P·u).
template <typename acc_t>
void add_causal_product(bool transpose_a, int64_t L, int64_t w, const acc_t* A, int64_t lda,
                        const acc_t* X, int64_t ldx, acc_t* out, int64_t ldo) {
  add_masked_product(transpose_a, L, L, w, A, lda, X, ldx, out, ldo,
                     [](int64_t i, int64_t j) { return j <= i; });
}

}  // namespace LINATTN_ISA
}  // namespace linattn
