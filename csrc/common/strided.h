// Strided (batch, head, row, column) views: how the operators hand tensors to the CPU kernels,
// so transposed (B, T, H, D) views need no copy (common/row_loader.h reads them).
#pragma once

#include "host_device.h"

#include <cstdint>

namespace linattn {

// A (batch, head, row, column) view with element strides.
template <typename T>
struct Strided4 {
  T* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};

  LINATTN_HD T* row(int64_t b, int64_t h, int64_t t) const {
    return data + b * stride[0] + h * stride[1] + t * stride[2];
  }

  // Element (b, h, t, c).
  LINATTN_HD T& at(int64_t b, int64_t h, int64_t t, int64_t c) const { return row(b, h, t)[c * stride[3]]; }

  // The same view starting at row t (one sequence of a packed batch).
  LINATTN_HD Strided4 from_row(int64_t t) const {
    Strided4 view = *this;
    view.data += t * stride[2];
    return view;
  }
};

}  // namespace linattn
