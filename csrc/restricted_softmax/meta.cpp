// Meta kernels of the window attention operators: the real kernels' checks on symbolic sizes,
// outputs with the real kernels' (contiguous) layout.
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, int64_t left, int64_t right,
                                                int64_t dilation,
                                                const std::optional<at::Tensor>& global_mask,
                                                const std::optional<at::Tensor>& key_padding_mask,
                                                double scale, const std::optional<at::Tensor>& segment_ids) {
  const auto s =
      check_window_inputs(q, k, v, left, right, dilation, global_mask, key_padding_mask, scale, segment_ids);
  return {at::empty_symint({s.batch, s.heads, s.q_len, s.value_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.q_len}, q.options().dtype(accumulate_type(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t left, int64_t right, int64_t dilation,
    const std::optional<at::Tensor>& global_mask, const std::optional<at::Tensor>& key_padding_mask,
    double scale, const std::optional<at::Tensor>& segment_ids) {
  const auto s =
      check_window_inputs(q, k, v, left, right, dilation, global_mask, key_padding_mask, scale, segment_ids);
  check_window_backward_inputs(grad_out, q, out, lse, s);
  return {at::empty_symint({s.batch, s.heads, s.q_len, s.head_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.k_len, s.head_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.k_len, s.value_dim}, q.options())};
}

std::tuple<at::Tensor, at::Tensor> block_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& layout, int64_t block_size,
    bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& q_segments,
    const std::optional<at::Tensor>& k_segments, const std::optional<at::Tensor>& positions) {
  const auto s = check_block_sparse_inputs(q, k, v, layout, block_size, key_padding_mask, scale,
                                           {bias, q_segments, k_segments, positions});
  return {at::empty_symint({s.batch, s.heads, s.q_len, s.value_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.q_len}, q.options().dtype(accumulate_type(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_backward_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& layout, int64_t block_size,
    bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& q_segments,
    const std::optional<at::Tensor>& k_segments, const std::optional<at::Tensor>& positions) {
  const auto s = check_block_sparse_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, layout, block_size,
                                                    key_padding_mask, scale, {bias, q_segments, k_segments, positions});
  return {at::empty_symint({s.batch, s.heads, s.q_len, s.head_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.k_len, s.head_dim}, q.options()),
          at::empty_symint({s.batch, s.heads, s.k_len, s.value_dim}, q.options()),
          bias.has_value() ? at::empty_symint(bias->sym_sizes(), bias->options()) : at::empty({0}, q.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, Meta, m) {
  m.impl("block_sparse_attn_fwd", &block_forward_meta);
  m.impl("block_sparse_attn_bwd", &block_backward_meta);
  m.impl("block_sparse_attn_fwd_generic", &block_forward_meta);
  m.impl("block_sparse_attn_bwd_generic", &block_backward_meta);
  m.impl("sliding_window_attn_fwd", &forward_meta);
  m.impl("sliding_window_attn_bwd", &backward_meta);
  m.impl("sliding_window_attn_fwd_generic", &forward_meta);
  m.impl("sliding_window_attn_bwd_generic", &backward_meta);
}

}  // namespace linattn
