// Elementwise factors on mma operands in registers: each 16-bit element x of a fragment becomes
// x · factor(row, col), rounded back to 16 bits, its (row, col) in the operand read off the PTX
// ISA's fragment layouts (warp_ops.h, mma_16816). What a kernel uses where a factor differs
// element by element, so that it cannot be applied to a product's rows or columns afterwards (the
// delta rule's gates per key channel: K ⊙ e^G as an operand).
#pragma once

#include "warp_ops.h"

namespace linattn {
namespace warp {

// A 16 × 16 (rows m × columns k): a[i] holds row g + 8 (i % 2), columns 2t + 8 (i / 2) + {0, 1}.
template <typename half_t, typename Factor>
LINATTN_HD void scale_a_operand(const WarpContext& w, Fragment (&a)[4], const Factor& factor) {
  for_lanes(w, [&](int lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    LINATTN_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
      a[i][lane] = pack<half_t>(unpack_lo<half_t>(a[i][lane]) * factor(row, col),
                                unpack_hi<half_t>(a[i][lane]) * factor(row, col + 1));
    }
  });
}

// B 16 × 8 (rows k × columns n): b[i] holds rows 2t + 8i + {0, 1}, column g.
template <typename half_t, typename Factor>
LINATTN_HD void scale_b_operand(const WarpContext& w, Fragment (&b)[2], const Factor& factor) {
  for_lanes(w, [&](int lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    LINATTN_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = 2 * t + 8 * i;
      b[i][lane] = pack<half_t>(unpack_lo<half_t>(b[i][lane]) * factor(row, g),
                                unpack_hi<half_t>(b[i][lane]) * factor(row + 1, g));
    }
  });
}

// As scale_a_operand, the product in two parts: `a` becomes it rounded to 16 bits (hi) and `lo`
// the rounded rest, so that two mma (a, then lo) carry it to fp32's precision.
template <typename half_t, typename Factor>
LINATTN_HD void split_scale_a_operand(const WarpContext& w, Fragment (&a)[4], Fragment (&lo)[4], const Factor& factor) {
  for_lanes(w, [&](int lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    LINATTN_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
      const float x0 = unpack_lo<half_t>(a[i][lane]) * factor(row, col);
      const float x1 = unpack_hi<half_t>(a[i][lane]) * factor(row, col + 1);
      a[i][lane] = pack<half_t>(x0, x1);
      lo[i][lane] = pack<half_t>(x0 - unpack_lo<half_t>(a[i][lane]), x1 - unpack_hi<half_t>(a[i][lane]));
    }
  });
}

// As scale_b_operand, in two parts (split_scale_a_operand).
template <typename half_t, typename Factor>
LINATTN_HD void split_scale_b_operand(const WarpContext& w, Fragment (&b)[2], Fragment (&lo)[2], const Factor& factor) {
  for_lanes(w, [&](int lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    LINATTN_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = 2 * t + 8 * i;
      const float x0 = unpack_lo<half_t>(b[i][lane]) * factor(row, g);
      const float x1 = unpack_hi<half_t>(b[i][lane]) * factor(row + 1, g);
      b[i][lane] = pack<half_t>(x0, x1);
      lo[i][lane] = pack<half_t>(x0 - unpack_lo<half_t>(b[i][lane]), x1 - unpack_hi<half_t>(b[i][lane]));
    }
  });
}

}  // namespace warp
}  // namespace linattn
