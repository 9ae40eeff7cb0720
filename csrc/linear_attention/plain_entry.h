// The operators' entry for implementations of plain linear attention only (no fading state, no
// packed sequences): the device-generic kernel. The schema's log_decay and cu_seqlens
// (csrc/linear_attention/schema.cpp) are refused with a message, and the backward returns an empty
// grad_log_decay, so that every implementation registers under one schema. The fused operators'
// entry (fused_forward, fused_backward) runs those calls too.
#pragma once

#include "op_checks.h"
#include "../common/autograd_support.h"

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace linattn {

using PlainForward = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, bool, bool, double);
using PlainBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, bool, bool, const std::optional<at::Tensor>&);

inline void check_plain_only(const char* implementation, const std::optional<at::Tensor>& log_decay,
                             const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(!log_decay.has_value() && !cu_seqlens.has_value(), kLinearAttentionOp, ": the ",
              implementation, " runs neither a fading state (log_decay) nor packed sequences (cu_seqlens); "
              "linattn.linear_attention runs those on this device through the device-generic formulation");
}

template <PlainForward Forward, const char* Implementation>
std::tuple<at::Tensor, at::Tensor, at::Tensor> plain_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens) {
  check_plain_only(Implementation, log_decay, cu_seqlens);
  return Forward(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps);
}

template <PlainBackward Backward, const char* Implementation>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plain_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& normalizer,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, const std::optional<at::Tensor>& final_state,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& cu_seqlens) {
  check_plain_only(Implementation, log_decay, cu_seqlens);
  auto [grad_q, grad_k, grad_v, grad_initial] = Backward(grad_out, grad_final_state, q, k, v, out, normalizer,
                                                         initial_state, key_padding_mask, feature_map, causal,
                                                         normalize, final_state);
  return {grad_q, grad_k, grad_v, grad_initial, at::empty({0}, normalizer.options())};
}

// The fused operators' entry: plain calls run `Forward` / `Backward`; a fading state (log_decay)
// or packed sequences (cu_seqlens) run `Extended` / `ExtendedBackward` where they take the call
// (the tensor cores) and otherwise the operators linattn::linear_attn_fwd / linear_attn_bwd on the
// same device, what the other backends run for those calls (fading_generic.cpp on CUDA, the CPU
// kernel on CPU tensors), whose inputs and outputs (out, the normalizer with eps, the final state,
// dL/dc) mean the same whichever implementation made them: a forward of one and the backward of
// another meet.
using ExtendedForward = std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, bool, bool, double, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);

template <PlainForward Forward, ExtendedForward Extended>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens) {
  if (!log_decay.has_value() && !cu_seqlens.has_value()) {
    return Forward(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps);
  }
  auto result = Extended(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps, log_decay,
                         cu_seqlens);
  if (result.has_value()) return *result;
  static const auto op = linattn_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, int64_t, bool, bool, double, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&)>("linattn::linear_attn_fwd");
  return call_below_autograd(op, q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps,
                             log_decay, cu_seqlens);
}

using ExtendedBackward = std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>> (*)(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    int64_t, bool, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);

template <PlainBackward Backward, ExtendedBackward Extended, const char* Implementation>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& normalizer,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, const std::optional<at::Tensor>& final_state,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& cu_seqlens) {
  if (!log_decay.has_value() && !cu_seqlens.has_value()) {
    return plain_backward<Backward, Implementation>(grad_out, grad_final_state, q, k, v, out, normalizer,
                                                    initial_state, key_padding_mask, feature_map, causal, normalize,
                                                    final_state, log_decay, cu_seqlens);
  }
  auto result = Extended(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state, key_padding_mask,
                         feature_map, causal, normalize, final_state, log_decay, cu_seqlens);
  if (result.has_value()) return *result;
  static const auto op = linattn_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      int64_t, bool, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&)>("linattn::linear_attn_bwd");
  return call_below_autograd(op, grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                             key_padding_mask, feature_map, causal, normalize, final_state, log_decay, cu_seqlens);
}

}  // namespace linattn
