// The device-generic (ATen) form of common/masked_product.h's causal product: tril(A)·V for a batch
// of chunks with the strictly upper (masked) pairs excluded rather than multiplied by 0. Non-finite
// entries of V are taken out of the product and the entries of the rows that can see one (same
// column, same or later row) are NaN, so a later row's Inf or NaN never reaches an earlier row.
// Without a host-side branch on the data (no synchronisation) it costs a few element-wise passes,
// no extra product. Shared by the generic linear attention and delta rule.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace linattn {

// `lower`: A with its strictly upper triangle already 0 (… , L, L); V (… , L, w).
inline at::Tensor causal_product(const at::Tensor& lower, const at::Tensor& V) {
  const at::Tensor finite_part = at::nan_to_num(V, 0.0, 0.0, 0.0);
  const at::Tensor non_finite = at::ne(finite_part, V);  // NaN != 0, ±inf != 0
  at::Tensor product = at::matmul(lower, finite_part);
  // int32 counts: ONNX's CumSum (exports trace this path) takes no byte type.
  return product.masked_fill_(at::cumsum(non_finite, -2, at::kInt).gt(0), NAN);
}

}  // namespace linattn
