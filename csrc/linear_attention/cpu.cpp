// CPU operator entry points: validate, allocate, hand raw views to the chunked kernels.
// One schema for plain, fading (log_decay) and packed (cu_seqlens) linear attention, one body.
#include "kernel.h"
#include "op_checks.h"
#include "../common/tensor_views.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

namespace linattn {
namespace {

// The kernel's shape with the log factors' width: 1 per token, or m per token and channel.
LinearAttentionShape with_decay_width(LinearAttentionShape s, const at::Tensor& log_decay) {
  s.decay_width = log_decay.defined() && log_decay.dim() == 4 ? log_decay.size(3) : 1;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  const LinearAttentionSizes sizes =
      check_forward_inputs(q, k, v, initial_state, key_padding_mask, feature_map, causal, eps);
  if (log_decay.defined()) check_log_decay(log_decay, q, sizes);
  const LinearAttentionShape s =
      with_decay_width(kernel_shape(q, k, v, feature_map, causal, normalize, eps), log_decay);
  const auto acc = accumulate_type(q.scalar_type());
  auto out = at::empty({s.batch, s.heads, s.q_len, s.value_dim}, q.options());
  auto final_state =
      at::empty({s.batch, s.heads, s.feature_dim, s.value_dim + 1}, q.options().dtype(acc));
  auto normalizer = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(acc));
  const at::Tensor decay = log_decay.defined() ? log_decay.contiguous() : at::Tensor();
  at::Tensor initial, mask;
  const bool* mask_ptr = optional_ptr<bool>(key_padding_mask, mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attn_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LINATTN_CPU_ISA_DISPATCH(linear_attention_forward_cpu<scalar_t, acc_t>(
        s, view_of<scalar_t>(q), view_of<scalar_t>(k), view_of<scalar_t>(v), mask_ptr,
        data_or_null<acc_t>(decay), optional_ptr<acc_t>(initial_state, initial),
        out.mutable_data_ptr<scalar_t>(), final_state.mutable_data_ptr<acc_t>(),
        normalizer.mutable_data_ptr<acc_t>()));
  });
  return {out, final_state, normalizer};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    const at::Tensor& out, const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state) {
  const LinearAttentionSizes sizes =
      check_backward_inputs(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                            key_padding_mask, feature_map, causal, final_state);
  if (log_decay.defined()) check_log_decay(log_decay, q, sizes);
  const LinearAttentionShape s =
      with_decay_width(kernel_shape(q, k, v, feature_map, causal, normalize, 1.0), log_decay);
  const auto acc = accumulate_type(q.scalar_type());
  auto grad_q = at::empty({s.batch, s.heads, s.q_len, s.feature_dim}, q.options());
  auto grad_k = at::empty({s.batch, s.heads, s.k_len, s.feature_dim}, q.options());
  auto grad_v = at::empty({s.batch, s.heads, s.k_len, s.value_dim}, q.options());
  auto grad_initial =
      at::empty({s.batch, s.heads, s.feature_dim, s.value_dim + 1}, q.options().dtype(acc));
  const at::Tensor decay = log_decay.defined() ? log_decay.contiguous() : at::Tensor();
  // dL/dc per position (c = cumsum of log_decay); the caller sums it backward in time.
  auto grad_cumulative = decay.defined() ? at::zeros(decay.sizes(), q.options().dtype(acc))  // per row or channel
                                         : at::empty({0}, q.options().dtype(acc));
  const at::Tensor den = normalizer.contiguous();
  at::Tensor initial, grad_final, final, mask;
  const bool* mask_ptr = optional_ptr<bool>(key_padding_mask, mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attn_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LINATTN_CPU_ISA_DISPATCH(linear_attention_backward_cpu<scalar_t, acc_t>(
        s, view_of<scalar_t>(grad_out), view_of<scalar_t>(q), view_of<scalar_t>(k),
        view_of<scalar_t>(v), view_of<scalar_t>(out), den.const_data_ptr<acc_t>(), mask_ptr,
        data_or_null<acc_t>(decay), optional_ptr<acc_t>(initial_state, initial),
        optional_ptr<acc_t>(grad_final_state, grad_final),
        causal ? nullptr : optional_ptr<acc_t>(final_state, final), grad_q.mutable_data_ptr<scalar_t>(),
        grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(),
        grad_initial.mutable_data_ptr<acc_t>(),
        decay.defined() ? grad_cumulative.mutable_data_ptr<acc_t>() : nullptr));
  });
  return {grad_q, grad_k, grad_v, grad_initial, grad_cumulative};
}

// --- Packed variable-length batches: each sequence runs through the same kernels on its own
// rows of the packed buffers (LinearAttentionShape's pitch; cpu_kernel_impl.h decides how the
// threads share the sequences).

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& initial_state,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  check_varlen_forward_inputs(q, k, v, cu_seqlens, log_decay, initial_state, feature_map, causal, eps);
  const LinearAttentionShape s =
      with_decay_width(kernel_shape(q, k, v, feature_map, causal, normalize, eps), log_decay.value_or(at::Tensor()));
  const std::vector<int64_t> offsets = read_sequence_offsets(cu_seqlens, s.q_len);
  const int64_t sequences = static_cast<int64_t>(offsets.size()) - 1;
  const auto acc = accumulate_type(q.scalar_type());
  auto out = at::empty({1, s.heads, s.q_len, s.value_dim}, q.options());
  auto final_state = at::empty({sequences, s.heads, s.feature_dim, s.value_dim + 1}, q.options().dtype(acc));
  auto normalizer = at::empty({1, s.heads, s.q_len}, q.options().dtype(acc));
  const at::Tensor decay = log_decay.has_value() ? log_decay->contiguous() : at::Tensor();
  const at::Tensor initial = initial_state.has_value() ? initial_state->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attn_varlen_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LINATTN_CPU_ISA_DISPATCH(linear_attention_varlen_forward_cpu<scalar_t, acc_t>(
        s, offsets.data(), sequences, view_of<scalar_t>(q), view_of<scalar_t>(k), view_of<scalar_t>(v),
        data_or_null<acc_t>(decay), data_or_null<acc_t>(initial), out.mutable_data_ptr<scalar_t>(),
        final_state.mutable_data_ptr<acc_t>(), normalizer.mutable_data_ptr<acc_t>()));
  });
  return {out, final_state, normalizer};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const at::Tensor& out, const at::Tensor& normalizer,
    const std::optional<at::Tensor>& initial_state, int64_t feature_map, bool causal, bool normalize,
    const std::optional<at::Tensor>& final_state) {
  check_varlen_backward_inputs(grad_out, grad_final_state, q, k, v, cu_seqlens, log_decay, out, normalizer,
                               initial_state, feature_map, causal, final_state);
  const LinearAttentionShape s =
      with_decay_width(kernel_shape(q, k, v, feature_map, causal, normalize, 1.0), log_decay.value_or(at::Tensor()));
  const std::vector<int64_t> offsets = read_sequence_offsets(cu_seqlens, s.q_len);
  const int64_t sequences = static_cast<int64_t>(offsets.size()) - 1;
  const auto acc = accumulate_type(q.scalar_type());
  auto grad_q = at::empty({1, s.heads, s.q_len, s.feature_dim}, q.options());
  auto grad_k = at::empty({1, s.heads, s.k_len, s.feature_dim}, q.options());
  auto grad_v = at::empty({1, s.heads, s.k_len, s.value_dim}, q.options());
  auto grad_initial = at::empty({sequences, s.heads, s.feature_dim, s.value_dim + 1}, q.options().dtype(acc));
  const at::Tensor decay = log_decay.has_value() ? log_decay->contiguous() : at::Tensor();
  auto grad_cumulative = decay.defined() ? at::zeros(decay.sizes(), q.options().dtype(acc))
                                         : at::empty({0}, q.options().dtype(acc));
  const at::Tensor den = normalizer.contiguous();
  const at::Tensor initial = initial_state.has_value() ? initial_state->contiguous() : at::Tensor();
  const at::Tensor grad_final = grad_final_state.has_value() ? grad_final_state->contiguous() : at::Tensor();
  // Non-causal, each sequence's queries saw its final state: read, not recomputed.
  const at::Tensor seen = final_state.has_value() && !causal ? final_state->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attn_varlen_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LINATTN_CPU_ISA_DISPATCH(linear_attention_varlen_backward_cpu<scalar_t, acc_t>(
        s, offsets.data(), sequences, view_of<scalar_t>(grad_out), view_of<scalar_t>(q),
        view_of<scalar_t>(k), view_of<scalar_t>(v), view_of<scalar_t>(out), den.const_data_ptr<acc_t>(),
        data_or_null<acc_t>(decay), data_or_null<acc_t>(initial), data_or_null<acc_t>(grad_final),
        data_or_null<acc_t>(seen), grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
        grad_v.mutable_data_ptr<scalar_t>(), grad_initial.mutable_data_ptr<acc_t>(),
        decay.defined() ? grad_cumulative.mutable_data_ptr<acc_t>() : nullptr));
  });
  return {grad_q, grad_k, grad_v, grad_initial, grad_cumulative};
}

// --- The operators' CPU entries: one schema for plain, fading and packed linear attention.

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens) {
  const auto chunked = [&] {
    return forward_impl(q, k, v, log_decay.value_or(at::Tensor()), initial_state, key_padding_mask, feature_map,
                        causal, normalize, eps);
  };
  return route_linear_attention(
      key_padding_mask, causal, log_decay, cu_seqlens,
      [&] { return varlen_forward_cpu(q, k, v, *cu_seqlens, log_decay, initial_state, feature_map, causal, normalize, eps); },
      chunked, chunked);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens) {
  const auto chunked = [&] {
    return backward_impl(grad_out, grad_final_state, q, k, v, log_decay.value_or(at::Tensor()), out, normalizer,
                         initial_state, key_padding_mask, feature_map, causal, normalize, final_state);
  };
  return route_linear_attention(
      key_padding_mask, causal, log_decay, cu_seqlens,
      [&] {
        return varlen_backward_cpu(grad_out, grad_final_state, q, k, v, *cu_seqlens, log_decay, out, normalizer,
                                   initial_state, feature_map, causal, normalize, final_state);
      },
      chunked, chunked);
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) {
  m.impl("linear_attn_fwd", &forward_cpu);
  m.impl("linear_attn_bwd", &backward_cpu);
}

}  // namespace linattn
