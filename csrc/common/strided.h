// Strided (batch, head, row, column) views and the loader that copies rows of one into
// contiguous accumulation-type scratch: where every CPU kernel deals with strides and with
// float16/bfloat16 conversion, so transposed (B, T, H, D) views need no copy.
#pragma once

#include <cstdint>

namespace linattn {

// A (batch, head, row, column) view with element strides.
template <typename T>
struct Strided4 {
  T* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};

  T* row(int64_t b, int64_t h, int64_t t) const {
    return data + b * stride[0] + h * stride[1] + t * stride[2];
  }
};

// Copies `rows` strided rows of `cols` elements into a contiguous buffer with leading dim ld.
template <typename scalar_t, typename acc_t>
void load_rows(acc_t* dst, int64_t ld, const scalar_t* src, int64_t row_stride,
               int64_t col_stride, int64_t rows, int64_t cols) {
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

}  // namespace linattn
