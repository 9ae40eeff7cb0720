// CPU operator entry points: validate, allocate, hand raw views to the chunked kernels.
#include "kernel.h"
#include "op_checks.h"
#include "../common/tensor_views.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  check_forward_inputs(q, k, v, initial_state, key_padding_mask, feature_map, causal, eps);
  const LinearAttentionShape s = kernel_shape(q, k, v, feature_map, causal, normalize, eps);
  const auto acc = accumulate_type(q.scalar_type());
  auto out = at::empty({s.batch, s.heads, s.q_len, s.value_dim}, q.options());
  auto final_state =
      at::empty({s.batch, s.heads, s.feature_dim, s.value_dim + 1}, q.options().dtype(acc));
  auto normalizer = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(acc));
  at::Tensor initial, mask;
  const bool* mask_ptr = optional_ptr<bool>(key_padding_mask, mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attn_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LINATTN_CPU_ISA_DISPATCH(linear_attention_forward_cpu<scalar_t, acc_t>(
        s, view_of<scalar_t>(q), view_of<scalar_t>(k), view_of<scalar_t>(v), mask_ptr,
        optional_ptr<acc_t>(initial_state, initial), out.mutable_data_ptr<scalar_t>(),
        final_state.mutable_data_ptr<acc_t>(), normalizer.mutable_data_ptr<acc_t>()));
  });
  return {out, final_state, normalizer};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize) {
  check_backward_inputs(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                        key_padding_mask, feature_map, causal);
  const LinearAttentionShape s = kernel_shape(q, k, v, feature_map, causal, normalize, 1.0);
  const auto acc = accumulate_type(q.scalar_type());
  auto grad_q = at::empty({s.batch, s.heads, s.q_len, s.feature_dim}, q.options());
  auto grad_k = at::empty({s.batch, s.heads, s.k_len, s.feature_dim}, q.options());
  auto grad_v = at::empty({s.batch, s.heads, s.k_len, s.value_dim}, q.options());
  auto grad_initial =
      at::empty({s.batch, s.heads, s.feature_dim, s.value_dim + 1}, q.options().dtype(acc));
  const at::Tensor den = normalizer.contiguous();
  at::Tensor initial, grad_final, mask;
  const bool* mask_ptr = optional_ptr<bool>(key_padding_mask, mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attn_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LINATTN_CPU_ISA_DISPATCH(linear_attention_backward_cpu<scalar_t, acc_t>(
        s, view_of<scalar_t>(grad_out), view_of<scalar_t>(q), view_of<scalar_t>(k),
        view_of<scalar_t>(v), view_of<scalar_t>(out), den.const_data_ptr<acc_t>(), mask_ptr,
        optional_ptr<acc_t>(initial_state, initial), optional_ptr<acc_t>(grad_final_state, grad_final),
        grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
        grad_v.mutable_data_ptr<scalar_t>(), grad_initial.mutable_data_ptr<acc_t>()));
  });
  return {grad_q, grad_k, grad_v, grad_initial};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) {
  m.impl("linear_attn_fwd", &forward_cpu);
  m.impl("linear_attn_bwd", &backward_cpu);
}

}  // namespace linattn
