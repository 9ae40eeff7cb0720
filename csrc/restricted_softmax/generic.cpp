// Device-generic restricted softmax (windows and block layouts): the same operator in ATen ops, for CUDA and
// every other backend, and under the *_generic name so the tests run it on CPU tensors. Window patterns run
// whole tiles of query blocks per call (generic_window.cpp), block layouts tiles of (head, query block)
// pairs with the key blocks each sees (generic_layout.cpp); both share the per-tile arithmetic
// (generic_tile.cpp), so memory stays bounded by the tile size at any T, never T×T.
#include "generic_layout.h"
#include "generic_tile.h"
#include "generic_window.h"
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>


namespace linattn {
namespace {

// No score to compute (an empty batch, head count or length): the window and layout tiles assume one.
bool empty_call(const WindowAttentionShape& s) { return s.batch * s.heads * s.q_len * s.k_len == 0; }

std::tuple<at::Tensor, at::Tensor> forward_generic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_inputs(q, k, v, scale, p);
  const WindowAttentionShape s = window_kernel_shape(q, k, v, p, scale);
  if (empty_call(s))  // rows without a key: 0, lse −inf
    return {at::zeros({s.batch, s.heads, s.q_len, s.value_dim}, q.options()),
            at::full({s.batch, s.heads, s.q_len}, -restricted_generic::kInf,
                     q.options().dtype(accumulate_type(q.scalar_type())))};
  if (p.uses_layout()) return restricted_generic::layout_forward(q, k, v, scale, s, p);
  return restricted_generic::window_forward(q, k, v, scale, s, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, scale, p);
  const WindowAttentionShape s = window_kernel_shape(q, k, v, p, scale);
  if (empty_call(s))
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v),
            p.bias ? at::zeros_like(*p.bias) : at::empty({0}, q.options())};
  if (p.uses_layout()) return restricted_generic::layout_backward(grad_out, grad_lse, q, k, v, out, lse, scale, s, p);
  auto [dq, dk, dv] = restricted_generic::window_backward(grad_out, grad_lse, q, k, v, out, lse, scale, s, p);
  return {dq, dk, dv, at::empty({0}, q.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CompositeExplicitAutograd, m) {
  for (const char* name : {"restricted_softmax_fwd", "restricted_softmax_fwd_generic"}) m.impl(name, &forward_generic);
  for (const char* name : {"restricted_softmax_bwd", "restricted_softmax_bwd_generic"}) m.impl(name, &backward_generic);
}

}  // namespace linattn
