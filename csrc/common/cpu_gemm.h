// Row-major GEMM for the CPU kernels: C (M×N) = op(A)·op(B) + beta·C.
//
// ATen does not export its typed cpublas::gemm, but x86 builds of torch link MKL statically
// and export its Fortran BLAS entry points sgemm_/dgemm_ from libtorch_cpu. They are declared
// weak here, so the extension also loads against a torch without them (another BLAS, another
// platform) and then uses the portable loop below. LINATTN_CPU_GEMM=reference forces the
// loop, which is how the tests exercise it.
#pragma once

#include "cpu_isa.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace linattn {
namespace LINATTN_ISA {  // one copy per instruction-set build (cpu_isa.h)

inline bool blas_gemm_allowed() {
  static const bool allowed = [] {
    const char* choice = std::getenv("LINATTN_CPU_GEMM");
    return choice == nullptr || std::strcmp(choice, "reference") != 0;
  }();
  return allowed;
}

// Portable i-k-j loop: the inner loop runs over contiguous rows of B and C and vectorizes.
template <typename T>
void gemm_loop(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
               int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (beta == T(0)) {
      std::fill(c, c + N, T(0));
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
    for (int64_t p = 0; p < K; ++p) {
      const T a = trans_a ? A[p * lda + i] : A[i * lda + p];
      if (!trans_b) {
        const T* b = B + p * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      } else {
        for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + p];
      }
    }
  }
}

template <typename T>
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const T* alpha, const T* a, const int* lda, const T* b, const int* ldb,
                      const T* beta, T* c, const int* ldc);
template <>
inline void blas_gemm<float>(const char* ta, const char* tb, const int* m, const int* n,
                             const int* k, const float* alpha, const float* a, const int* lda,
                             const float* b, const int* ldb, const float* beta, float* c,
                             const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
inline void blas_gemm<double>(const char* ta, const char* tb, const int* m, const int* n,
                              const int* k, const double* alpha, const double* a, const int* lda,
                              const double* b, const int* ldb, const double* beta, double* c,
                              const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
inline bool blas_available();
template <>
inline bool blas_available<float>() { return sgemm_ != nullptr; }
template <>
inline bool blas_available<double>() { return dgemm_ != nullptr; }

// Row-major in, row-major out. Column-major BLAS sees a row-major matrix as its transpose, so
// C' = op(B)'·op(A)' is the same call with the operands swapped and the flags kept.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const int64_t biggest = std::max({M, N, K, lda, ldb, ldc});
  if (K == 0 || biggest > INT_MAX || !blas_available<T>() || !blas_gemm_allowed()) {
    gemm_loop(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int lb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int lc = static_cast<int>(std::max<int64_t>(ldc, 1));
  const T one(1);
  blas_gemm<T>(trans_b ? "T" : "N", trans_a ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta,
               C, &lc);
}

}  // namespace LINATTN_ISA
}  // namespace linattn
