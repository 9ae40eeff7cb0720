// Meta kernels of the linear attention operators: what fake tensors (torch.compile, export,
// opcheck) and meta tensors run. They apply the very checks of the real kernels (op_checks.h),
// on symbolic sizes, and allocate outputs with the real kernels' (contiguous) layout. A call
// mixing meta and real tensors dispatches here too and is refused by the device check.
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  const LinearAttentionSizes s =
      check_forward_inputs(q, k, v, initial_state, key_padding_mask, feature_map, causal, eps);
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  return {at::empty_symint({s.batch, s.heads, s.q_len, s.value_dim}, q.options()),
          at::empty_symint(s.state(), acc),
          at::empty_symint({s.batch, s.heads, s.q_len}, acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state) {
  const LinearAttentionSizes s =
      check_backward_inputs(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                            key_padding_mask, feature_map, causal, final_state);
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  return {at::empty_symint({s.batch, s.heads, s.q_len, s.feature_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.k_len, s.feature_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.k_len, s.value_dim}, q.options()),
          at::empty_symint(s.state(), acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decayed_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool normalize, double eps) {
  const LinearAttentionSizes s =
      check_forward_inputs(q, k, v, initial_state, key_padding_mask, feature_map, true, eps);
  check_log_decay(log_decay, q, s);
  return forward_meta(q, k, v, initial_state, key_padding_mask, feature_map, true, normalize, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> decayed_backward_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    const at::Tensor& out, const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool normalize) {
  auto [gq, gk, gv, gi] = backward_meta(grad_out, grad_final_state, q, k, v, out, normalizer,
                                        initial_state, key_padding_mask, feature_map, true, normalize,
                                        std::nullopt);
  const LinearAttentionSizes s = check_inputs(q, k, v, initial_state, key_padding_mask, feature_map, true);
  check_log_decay(log_decay, q, s);
  return {gq, gk, gv, gi, at::empty_symint(log_decay.sym_sizes(), log_decay.options())};  // per row or channel
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& initial_state,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  const LinearAttentionSizes s =
      check_varlen_forward_inputs(q, k, v, cu_seqlens, log_decay, initial_state, feature_map, causal, eps);
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  return {at::empty_symint({1, s.heads, s.q_len, s.value_dim}, q.options()),
          at::empty_symint({cu_seqlens.sym_size(0) - 1, s.heads, s.feature_dim, s.value_dim + 1}, acc),
          at::empty_symint({1, s.heads, s.q_len}, acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const at::Tensor& out, const at::Tensor& normalizer,
    const std::optional<at::Tensor>& initial_state, int64_t feature_map, bool causal, bool normalize,
    const std::optional<at::Tensor>& final_state) {
  const LinearAttentionSizes s = check_varlen_backward_inputs(grad_out, grad_final_state, q, k, v, cu_seqlens,
                                                              log_decay, out, normalizer, initial_state,
                                                              feature_map, causal, final_state);
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  return {at::empty_symint({1, s.heads, s.q_len, s.feature_dim}, q.options()),
          at::empty_symint({1, s.heads, s.k_len, s.feature_dim}, q.options()),
          at::empty_symint({1, s.heads, s.k_len, s.value_dim}, q.options()),
          at::empty_symint({cu_seqlens.sym_size(0) - 1, s.heads, s.feature_dim, s.value_dim + 1}, acc),
          log_decay.has_value() ? at::empty_symint(log_decay->sym_sizes(), acc) : at::empty({0}, acc)};
}

// The operators' Meta entries, routed as the CPU kernel routes them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens) {
  return route_linear_attention(
      key_padding_mask, causal, log_decay, cu_seqlens,
      [&] { return varlen_forward_meta(q, k, v, *cu_seqlens, log_decay, initial_state, feature_map, causal, normalize, eps); },
      [&] { return decayed_forward_meta(q, k, v, *log_decay, initial_state, key_padding_mask, feature_map, normalize, eps); },
      [&] { return forward_meta(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens) {
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  return route_linear_attention(
      key_padding_mask, causal, log_decay, cu_seqlens,
      [&]() -> Grads {
        return varlen_backward_meta(grad_out, grad_final_state, q, k, v, *cu_seqlens, log_decay, out, normalizer,
                                    initial_state, feature_map, causal, normalize, final_state);
      },
      [&]() -> Grads {
        return decayed_backward_meta(grad_out, grad_final_state, q, k, v, *log_decay, out, normalizer,
                                     initial_state, key_padding_mask, feature_map, normalize);
      },
      [&]() -> Grads {
        auto [gq, gk, gv, gi] = backward_meta(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                                              key_padding_mask, feature_map, causal, normalize, final_state);
        return {gq, gk, gv, gi, at::empty({0}, normalizer.options())};
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, Meta, m) {
  for (const char* name : {"linear_attn_fwd", "linear_attn_fwd_generic", "linear_attn_fwd_fused"})
    m.impl(name, &linear_forward_meta);
  for (const char* name : {"linear_attn_bwd", "linear_attn_bwd_generic", "linear_attn_bwd_fused"})
    m.impl(name, &linear_backward_meta);
}

}  // namespace linattn
