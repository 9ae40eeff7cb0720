// Meta kernels of the restricted-softmax operator: the real kernels' checks on symbolic sizes,
// outputs with the real kernels' (contiguous) layout.
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const auto s = check_restricted_inputs(q, k, v, scale, {LINATTN_RESTRICTED_PATTERN_ARGS});
  return {at::empty_symint({s.batch, s.heads, s.q_len, s.value_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.q_len}, q.options().dtype(accumulate_type(q.scalar_type())))};
}

RestrictedGradients backward_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const auto s =
      check_restricted_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, scale, {LINATTN_RESTRICTED_PATTERN_ARGS});
  return {at::empty_symint({s.batch, s.heads, s.q_len, s.head_dim}, q.options()),
          at::empty_symint({s.batch, s.kv_heads, s.k_len, s.head_dim}, q.options()),
          at::empty_symint({s.batch, s.kv_heads, s.k_len, s.value_dim}, q.options()),
          bias.has_value() ? at::empty_symint(bias->sym_sizes(), bias->options()) : at::empty({0}, q.options()),
          forget_cumsum.has_value() ? at::empty_symint(forget_cumsum->sym_sizes(), forget_cumsum->options())
                                    : at::empty({0}, q.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, Meta, m) {
  for (const char* name : {"restricted_softmax_fwd", "restricted_softmax_fwd_generic", "restricted_softmax_fwd_fused"})
    m.impl(name, &forward_meta);
  for (const char* name : {"restricted_softmax_bwd", "restricted_softmax_bwd_generic", "restricted_softmax_bwd_fused"})
    m.impl(name, &backward_meta);
}

}  // namespace linattn
