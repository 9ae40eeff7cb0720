// The device-generic (ATen) form of common/masked_product.h's causal product: tril(A)·V for a batch
// of chunks with the strictly upper (masked) pairs excluded rather than multiplied by 0. Non-finite
// entries of V are taken out of the product and given back as marks to the rows that can see one
// (same column, same or later row), so a later row's Inf or NaN never reaches an earlier row.
// Without a host-side branch on the data (no synchronisation) it costs three element-wise passes,
// no extra product. Shared by the generic linear attention (forward and backward) and delta rule.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace linattn {

// V (…, L, w) as its finite part (non-finite entries 0) and the marks of what was dropped, summed
// down the rows (dim -2): 0 until a row meets a non-finite entry in its column, ±inf or NaN from
// there on. Adding the marks to a product of the finite part gives the rows that met one their
// non-finite value back. With `consume`, V (a temporary of the caller's) becomes the marks.
struct FiniteSplit {
  at::Tensor finite, marks;
};

inline FiniteSplit split_non_finite(at::Tensor V, bool consume = false) {
  at::Tensor finite = at::nan_to_num(V, 0.0, 0.0, 0.0);
  if (at::GradMode::is_enabled() && V.requires_grad()) return {finite, (V - finite).detach().cumsum(-2)};
  return {finite, (consume ? V.sub_(finite) : V - finite).cumsum_(-2)};
}

// `lower`: A with its strictly upper triangle already 0 (… , L, L); V (… , L, w).
inline at::Tensor causal_product(const at::Tensor& lower, const at::Tensor& V) {
  const FiniteSplit split = split_non_finite(V);
  return at::matmul(lower, split.finite).add_(split.marks);
}

// `lower`: A with its strictly upper triangle already 0 (…, L, L); X (…, L, w): tril(A)ᵀ·X, the
// sums over later rows (row j: Σ_{i≥j} A_ij X_i) with the masked pairs excluded: X's non-finite
// entries are taken out and given back as marks summed up the rows (row j gets those of rows
// i ≥ j), by a cumulative sum of the rows in reverse order.
inline at::Tensor anticausal_product(const at::Tensor& lower, const at::Tensor& X) {
  const at::Tensor finite = at::nan_to_num(X, 0.0, 0.0, 0.0);
  const bool recorded = at::GradMode::is_enabled() && X.requires_grad();
  const at::Tensor reversed = (recorded ? (X - finite).detach() : X - finite).flip(-2);
  const at::Tensor marks = (recorded ? reversed.cumsum(-2) : reversed.cumsum_(-2)).flip(-2);
  return at::matmul(lower.transpose(-1, -2), finite).add_(marks);
}

}  // namespace linattn
