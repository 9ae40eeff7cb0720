// Argument checks of the linear attention operators, shared by the CPU kernel, the
// device-generic implementation and the Meta kernels (what torch.compile traces), so all of
// them refuse exactly the same inputs. Sizes are compared as SymInts (see common/checks.h).
#pragma once

#include <vector>

#include "../common/checks.h"
#include "kernel.h"

#include <cmath>

namespace linattn {

constexpr const char* kLinearAttentionOp = "linattn.linear_attention";

// The sizes every output is built from, symbolic under fake tensors.
struct LinearAttentionSizes {
  c10::SymInt batch, heads, q_len, k_len, feature_dim, value_dim;

  std::vector<c10::SymInt> state() const { return {batch, heads, feature_dim, value_dim + 1}; }
};

inline void check_feature_map_code(const char* op, int64_t feature_map) {
  TORCH_CHECK(feature_map == kFeatureIdentity || feature_map == kFeatureElu ||
                  feature_map == kFeatureRelu,
              op, ": feature_map code must be 0 (identity), 1 (elu+1) or 2 (relu), got ", feature_map);
}

// eps > 0: with eps = 0 a query whose features miss every key would divide 0 by 0.
inline void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite number > 0, got ", eps);
}

// Checks shared by the forward and the backward operator (everything but eps).
inline LinearAttentionSizes check_inputs(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v,
                                         const std::optional<at::Tensor>& initial_state,
                                         const std::optional<at::Tensor>& key_padding_mask,
                                         int64_t feature_map, bool causal) {
  const char* op = kLinearAttentionOp;
  check_qkv(op, q, k, v);
  TORCH_CHECK(!causal || q.sym_size(2) == k.sym_size(2), op,
              ": causal attention needs as many queries as keys, got q ", shape_str(q), " and k ",
              shape_str(k));
  check_feature_map_code(op, feature_map);
  LinearAttentionSizes s{q.sym_size(0), q.sym_size(1), q.sym_size(2),
                         k.sym_size(2), q.sym_size(3), v.sym_size(3)};
  check_key_mask(op, "key_padding_mask", key_padding_mask, q, k, "True = padded key");
  if (initial_state.has_value()) check_state(op, "initial_state", *initial_state, q, s.state());
  return s;
}

inline LinearAttentionSizes check_forward_inputs(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& initial_state,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 int64_t feature_map, bool causal, double eps) {
  check_eps(kLinearAttentionOp, eps);
  return check_inputs(q, k, v, initial_state, key_padding_mask, feature_map, causal);
}

// What a backward gets of its forward: grad_out and out (B, H, T_q, dv) like q, and the
// normalizer (B, H, T_q) in the accumulation dtype.
inline void check_saved_outputs(const at::Tensor& grad_out, const at::Tensor& out,
                                const at::Tensor& normalizer, const at::Tensor& q,
                                const LinearAttentionSizes& s) {
  const char* op = kLinearAttentionOp;
  const std::vector<c10::SymInt> out_shape{s.batch, s.heads, s.q_len, s.value_dim};
  check_same_device_dtype(op, "grad_out", grad_out, "q", q);
  check_shape(op, "grad_out", grad_out, out_shape, "(B, H, T_q, dv)");
  check_same_device_dtype(op, "out", out, "q", q);
  check_shape(op, "out", out, out_shape, "(B, H, T_q, dv)");
  check_same_device(op, "normalizer", normalizer, "q", q);
  TORCH_CHECK(normalizer.scalar_type() == accumulate_type(q.scalar_type()), op,
              ": normalizer must be ", accumulate_type(q.scalar_type()), " for ", q.scalar_type(),
              " inputs, got ", normalizer.scalar_type());
  check_shape(op, "normalizer", normalizer, {s.batch, s.heads, s.q_len}, "(B, H, T_q)");
}

inline LinearAttentionSizes check_backward_inputs(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    const std::optional<at::Tensor>& final_state = std::nullopt) {
  const char* op = kLinearAttentionOp;
  const LinearAttentionSizes s =
      check_inputs(q, k, v, initial_state, key_padding_mask, feature_map, causal);
  check_saved_outputs(grad_out, out, normalizer, q, s);
  if (grad_final_state.has_value())
    check_state(op, "grad_final_state", *grad_final_state, q, s.state());
  if (final_state.has_value()) check_state(op, "final_state", *final_state, q, s.state());
  return s;
}

// log_decay of the decayed operators: (B, H, T) one factor per token (decay and scalar gates), or
// (B, H, T, m) one per token and feature channel (GLA-style gates, docs/methods.md §1); `rows` is
// {B, H, T} ({1, H, total} when packed). The accumulation dtype, on q's device.
inline void check_log_decay_rows(const at::Tensor& log_decay, const at::Tensor& q, const LinearAttentionSizes& s,
                                 std::vector<c10::SymInt> rows, const char* layout, const char* channel_layout) {
  const char* op = kLinearAttentionOp;
  check_same_device(op, "log_decay", log_decay, "q", q);
  TORCH_CHECK(log_decay.scalar_type() == accumulate_type(q.scalar_type()), op,
              ": log_decay must be ", accumulate_type(q.scalar_type()), " for ", q.scalar_type(),
              " inputs, got ", log_decay.scalar_type());
  if (log_decay.dim() == 4) {
    rows.push_back(s.feature_dim);
    check_shape(op, "log_decay", log_decay, rows, channel_layout);
  } else {
    check_shape(op, "log_decay", log_decay, rows, layout);
  }
}

inline void check_log_decay(const at::Tensor& log_decay, const at::Tensor& q, const LinearAttentionSizes& s) {
  check_log_decay_rows(log_decay, q, s, {s.batch, s.heads, s.q_len}, "(B, H, T)", "(B, H, T, m)");
}

// Whether the factors are per feature channel, (B, H, T, m), rather than per token.
inline bool per_channel_factors(const std::optional<at::Tensor>& log_decay) {
  return log_decay.has_value() && log_decay->dim() == 4;
}

// The operator's extensions, checked where a kernel takes them (CPU and Meta).
inline void check_no_padding_when_packed(const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(!key_padding_mask.has_value(), kLinearAttentionOp,
              ": with cu_seqlens there is no padding to mask; pass key_padding_mask=None");
}

inline void check_fading_is_causal(bool causal) {
  TORCH_CHECK(causal, kLinearAttentionOp, ": decay and gates (log_decay) fade a causal state; need causal=True");
}

// A call of the family's one schema, routed to its packed, fading or plain form (the CPU and
// Meta kernels share the routing, and so refuse the same calls).
template <typename Packed, typename Fading, typename Plain>
auto route_linear_attention(const std::optional<at::Tensor>& key_padding_mask, bool causal,
                            const std::optional<at::Tensor>& log_decay,
                            const std::optional<at::Tensor>& cu_seqlens, Packed packed, Fading fading,
                            Plain plain) {
  if (cu_seqlens.has_value()) {
    check_no_padding_when_packed(key_padding_mask);
    return packed();
  }
  if (log_decay.has_value()) {
    check_fading_is_causal(causal);
    return fading();
  }
  return plain();
}

// The concrete shape a kernel runs on (after the checks above have passed).
// Packed variable-length batches (the *_varlen operators): q, k, v (1, H, total, ·) hold N
// sequences back to back, sequence n in rows [cu_seqlens[n], cu_seqlens[n + 1]); cu_seqlens
// (N + 1,) int32 on q's device (its values are checked by the CPU kernel, which reads them).
// States are per sequence: (N, H, m, dv + 1); log_decay (1, H, total).
inline LinearAttentionSizes check_varlen_inputs(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                const std::optional<at::Tensor>& log_decay,
                                                const std::optional<at::Tensor>& initial_state,
                                                int64_t feature_map, bool causal) {
  const char* op = kLinearAttentionOp;
  const LinearAttentionSizes s = check_inputs(q, k, v, std::nullopt, std::nullopt, feature_map, false);
  TORCH_CHECK(q.sym_size(0) == 1, op, ": with cu_seqlens, q, k and v hold the packed sequences as ",
              "(1, H, total, D), got batch ", q.sym_size(0), " in q ", shape_str(q));
  TORCH_CHECK(q.sym_size(2) == k.sym_size(2), op, ": with cu_seqlens, queries and keys are the same ",
              "packed positions, got q ", shape_str(q), " and k ", shape_str(k));
  const c10::SymInt sequences = check_cu_seqlens(op, cu_seqlens, q);
  if (initial_state.has_value())
    check_state(op, "initial_state", *initial_state, q, {sequences, s.heads, s.feature_dim, s.value_dim + 1});
  if (log_decay.has_value()) {
    TORCH_CHECK(causal, op, ": decay and gates need causal=True");
    check_log_decay_rows(*log_decay, q, s, {1, s.heads, s.q_len}, "(1, H, total)", "(1, H, total, m)");
  }
  return s;
}

inline LinearAttentionSizes check_varlen_forward_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& initial_state,
    int64_t feature_map, bool causal, double eps) {
  check_eps(kLinearAttentionOp, eps);
  return check_varlen_inputs(q, k, v, cu_seqlens, log_decay, initial_state, feature_map, causal);
}

inline LinearAttentionSizes check_varlen_backward_inputs(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const at::Tensor& out, const at::Tensor& normalizer,
    const std::optional<at::Tensor>& initial_state, int64_t feature_map, bool causal,
    const std::optional<at::Tensor>& final_state = std::nullopt) {
  const LinearAttentionSizes s =
      check_varlen_inputs(q, k, v, cu_seqlens, log_decay, initial_state, feature_map, causal);
  check_saved_outputs(grad_out, out, normalizer, q, s);
  const std::vector<c10::SymInt> states{cu_seqlens.sym_size(0) - 1, s.heads, s.feature_dim, s.value_dim + 1};
  if (grad_final_state.has_value())
    check_state(kLinearAttentionOp, "grad_final_state", *grad_final_state, q, states);
  if (final_state.has_value()) check_state(kLinearAttentionOp, "final_state", *final_state, q, states);
  return s;
}

// The offsets of a packing (host tensor), checked. Kernels that read them on the host check them;
// the device-generic one does on CPU tensors only (no sync).
inline std::vector<int64_t> read_sequence_offsets(const at::Tensor& cu_seqlens, int64_t total) {
  return read_packed_offsets(kLinearAttentionOp, cu_seqlens, total);
}

inline LinearAttentionShape kernel_shape(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, int64_t feature_map, bool causal,
                                         bool normalize, double eps) {
  LinearAttentionShape s;
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.q_len = q.size(2);
  s.k_len = k.size(2);
  s.feature_dim = q.size(3);
  s.value_dim = v.size(3);
  s.feature_map = static_cast<FeatureMap>(feature_map);
  s.causal = causal;
  s.normalize = normalize;
  s.eps = eps;
  s.q_pitch = s.q_len;
  s.k_pitch = s.k_len;
  return s;
}

}  // namespace linattn
