// The loader that copies rows of a strided view into contiguous accumulation-type scratch:
// where the CPU kernels deal with strides and with float16/bfloat16 conversion.
#pragma once

#include "cpu_isa.h"

#include <cstdint>

namespace linattn {
namespace LINATTN_ISA {

// Copies `rows` strided rows of `cols` elements into a contiguous buffer with leading dim ld.
template <typename scalar_t, typename acc_t>
void load_rows(acc_t* dst, int64_t ld, const scalar_t* src, int64_t row_stride,
               int64_t col_stride, int64_t rows, int64_t cols) {
  if (col_stride == 1 && row_stride == cols && ld == cols) {  // one contiguous block
    for (int64_t x = 0; x < rows * cols; ++x) dst[x] = static_cast<acc_t>(src[x]);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    acc_t* d = dst + r * ld;
    if (col_stride == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c * col_stride]);
    }
  }
}

}  // namespace LINATTN_ISA
}  // namespace linattn
