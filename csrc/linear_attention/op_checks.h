// Argument checks of the linear attention operators, shared by the CPU kernel and the
// device-generic implementation so both refuse exactly the same inputs.
#pragma once

#include "../common/checks.h"
#include "kernel.h"

#include <cmath>

namespace linattn {

constexpr const char* kLinearAttentionOp = "linattn.linear_attention";

inline LinearAttentionShape check_forward_inputs(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& initial_state,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 int64_t feature_map, bool causal, bool normalize,
                                                 double eps) {
  const char* op = kLinearAttentionOp;
  check_dim(op, "q", q, 4, "(B, H, T, D)");
  check_dim(op, "k", k, 4, "(B, H, T, D)");
  check_dim(op, "v", v, 4, "(B, H, T, D)");
  check_floating(op, "q", q);
  check_same_device_dtype(op, "k", k, "q", q);
  check_same_device_dtype(op, "v", v, "q", q);
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.size(0) == v.size(0) &&
                  k.size(1) == v.size(1),
              op, ": q, k and v must share batch and head dims, got q ", shape_str(q), ", k ",
              shape_str(k), " and v ", shape_str(v));
  TORCH_CHECK(q.size(3) == k.size(3), op, ": q and k must have the same head dim, got q ",
              shape_str(q), " and k ", shape_str(k));
  TORCH_CHECK(k.size(2) == v.size(2), op, ": k and v must have the same length, got k ",
              shape_str(k), " and v ", shape_str(v));
  TORCH_CHECK(!causal || q.size(2) == k.size(2), op,
              ": causal attention needs as many queries as keys, got q ", shape_str(q), " and k ",
              shape_str(k));
  TORCH_CHECK(std::isfinite(eps), op, ": eps must be finite, got ", eps);
  TORCH_CHECK(feature_map == kFeatureIdentity || feature_map == kFeatureElu ||
                  feature_map == kFeatureRelu,
              op, ": feature_map code must be 0 (identity), 1 (elu+1) or 2 (relu), got ", feature_map);
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.device() == q.device(), op,
                ": key_padding_mask must be a bool tensor on ", q.device(), ", got ",
                mask.scalar_type(), " on ", mask.device());
    check_shape(op, "key_padding_mask", mask, {k.size(0), k.size(2)}, "(B, T_k)");
  }

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
  if (initial_state.has_value())
    check_state(op, "initial_state", *initial_state, q,
                {s.batch, s.heads, s.feature_dim, s.value_dim + 1});
  return s;
}

inline LinearAttentionShape check_backward_inputs(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize) {
  const char* op = kLinearAttentionOp;
  LinearAttentionShape s = check_forward_inputs(q, k, v, initial_state, key_padding_mask,
                                                feature_map, causal, normalize, 0.0);
  const std::vector<int64_t> out_shape{s.batch, s.heads, s.q_len, s.value_dim};
  check_same_device_dtype(op, "grad_out", grad_out, "q", q);
  check_shape(op, "grad_out", grad_out, out_shape, "(B, H, T_q, dv)");
  check_same_device_dtype(op, "out", out, "q", q);
  check_shape(op, "out", out, out_shape, "(B, H, T_q, dv)");
  TORCH_CHECK(normalizer.device() == q.device() &&
                  normalizer.scalar_type() == accumulate_type(q.scalar_type()),
              op, ": normalizer must be ", accumulate_type(q.scalar_type()), " on ", q.device(),
              ", got ", normalizer.scalar_type(), " on ", normalizer.device());
  check_shape(op, "normalizer", normalizer, {s.batch, s.heads, s.q_len}, "(B, H, T_q)");
  if (grad_final_state.has_value())
    check_state(op, "grad_final_state", *grad_final_state, q,
                {s.batch, s.heads, s.feature_dim, s.value_dim + 1});
  return s;
}

}  // namespace linattn
