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

// Grouped-query heads: the tiles read one key/value head per query head, so k and v are
// repeated to H heads here (copies; the CPU and flash engines read the shared heads in place), and
// the repeats' gradients summed back onto each shared head (summed_per_shared_head, op_checks.h).
at::Tensor per_query_head(const at::Tensor& x, const WindowAttentionShape& s) {
  if (s.kv_group == 1) return x;
  const int64_t kv_heads = s.kv_heads();
  return x.unsqueeze(2).expand({x.size(0), kv_heads, s.kv_group, x.size(2), x.size(3)})
      .reshape({x.size(0), s.heads, x.size(2), x.size(3)});
}

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
  const at::Tensor k_heads = per_query_head(k, s), v_heads = per_query_head(v, s);
  if (p.uses_layout()) return restricted_generic::layout_forward(q, k_heads, v_heads, scale, s, p);
  return restricted_generic::window_forward(q, k_heads, v_heads, scale, s, p);
}

RestrictedGradients backward_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, scale, p);
  const WindowAttentionShape s = window_kernel_shape(q, k, v, p, scale);
  if (empty_call(s))
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v),
            p.bias ? at::zeros_like(*p.bias) : at::empty({0}, q.options()),
            p.forget_cumsum ? at::zeros_like(*p.forget_cumsum) : at::empty({0}, q.options())};
  const at::Tensor k_heads = per_query_head(k, s), v_heads = per_query_head(v, s);
  if (p.uses_layout()) {
    auto [dq, dk, dv, grad_bias, grad_forget] =
        restricted_generic::layout_backward(grad_out, grad_lse, q, k_heads, v_heads, out, lse, scale, s, p);
    return {dq, summed_per_shared_head(dk, s.kv_group), summed_per_shared_head(dv, s.kv_group), grad_bias,
            grad_forget};
  }
  auto [dq, dk, dv, grad_forget] =
      restricted_generic::window_backward(grad_out, grad_lse, q, k_heads, v_heads, out, lse, scale, s, p);
  return {dq, summed_per_shared_head(dk, s.kv_group), summed_per_shared_head(dv, s.kv_group),
          at::empty({0}, q.options()), grad_forget};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CompositeExplicitAutograd, m) {
  for (const char* name : {"restricted_softmax_fwd", "restricted_softmax_fwd_generic"}) m.impl(name, &forward_generic);
  for (const char* name : {"restricted_softmax_bwd", "restricted_softmax_bwd_generic"}) m.impl(name, &backward_generic);
}

}  // namespace linattn
