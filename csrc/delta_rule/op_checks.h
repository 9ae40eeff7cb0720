// Argument checks of the delta-rule operators, shared by the CPU kernel, the device-generic
// implementation and the Meta kernels, so all of them refuse exactly the same inputs. Sizes are
// compared as SymInts (common/checks.h).
#pragma once

#include "../common/checks.h"
#include "kernel.h"

#include <cmath>
#include <vector>

namespace linattn {

constexpr const char* kDeltaRuleOp = "linattn.delta_rule_attention";

struct DeltaRuleSizes {
  c10::SymInt batch, heads, length, key_dim, value_dim, states;  // states: B, or N when packed

  std::vector<c10::SymInt> state() const { return {states, heads, key_dim, value_dim}; }
};

inline void check_per_token(const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_same_device(kDeltaRuleOp, name, t, "q", q);
  check_floating(kDeltaRuleOp, name, t);
  check_shape(kDeltaRuleOp, name, t, {q.sym_size(0), q.sym_size(1), q.sym_size(2)}, "(B, H, T)");
}

// The log-gates: (B, H, T) one per token (Gated DeltaNet), or (B, H, T, dk) one per key channel
// (Kimi Delta Attention: row c of the state fades by its own gate).
inline void check_log_gate(const at::Tensor& log_gate, const at::Tensor& q) {
  check_same_device(kDeltaRuleOp, "log_gate", log_gate, "q", q);
  check_floating(kDeltaRuleOp, "log_gate", log_gate);
  std::vector<c10::SymInt> rows{q.sym_size(0), q.sym_size(1), q.sym_size(2)};
  if (log_gate.dim() == 4) {
    rows.push_back(q.sym_size(3));
    check_shape(kDeltaRuleOp, "log_gate", log_gate, rows, "(B, H, T, dk)");
  } else {
    check_shape(kDeltaRuleOp, "log_gate", log_gate, rows, "(B, H, T) or (B, H, T, dk)");
  }
}

// Whether the gates are per key channel (B, H, T, dk) rather than per token.
inline bool per_channel_gates(const std::optional<at::Tensor>& log_gate) {
  return log_gate.has_value() && log_gate->dim() == 4;
}

inline DeltaRuleSizes check_delta_rule_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                              const std::optional<at::Tensor>& initial_state,
                                              const std::optional<at::Tensor>& cu_seqlens, double scale) {
  const char* op = kDeltaRuleOp;
  check_qkv(op, q, k, v);
  TORCH_CHECK(q.sym_size(2) == k.sym_size(2), op, ": q and k must have the same length (one query per token), got q ",
              shape_str(q), " and k ", shape_str(k));
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_per_token("beta", beta, q);
  if (log_gate.has_value()) check_log_gate(*log_gate, q);
  DeltaRuleSizes s{q.sym_size(0), q.sym_size(1), q.sym_size(2), q.sym_size(3), v.sym_size(3), q.sym_size(0)};
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(q.sym_size(0) == 1, op, ": packed sequences (cu_seqlens) need q, k, v of batch 1 (1, H, total, D), got q ",
                shape_str(q));
    s.states = check_cu_seqlens(op, *cu_seqlens, q);
  }
  if (initial_state.has_value()) {
    const at::Tensor& state = *initial_state;
    check_same_device(op, "initial_state", state, "q", q);
    const auto acc = accumulate_type(q.scalar_type());
    TORCH_CHECK(state.scalar_type() == acc, op, ": initial_state must be ", acc, " for ", q.scalar_type(),
                " inputs, got ", state.scalar_type());
    check_shape(op, "initial_state", state, s.state(), cu_seqlens.has_value() ? "(N, H, dk, dv)" : "(B, H, dk, dv)");
  }
  return s;
}

inline void check_delta_rule_grads(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
                                   const at::Tensor& q, const at::Tensor& v, const DeltaRuleSizes& s) {
  check_same_device_dtype(kDeltaRuleOp, "grad_out", grad_out, "q", q);
  check_shape(kDeltaRuleOp, "grad_out", grad_out, v.sym_sizes(), "(like v)");
  if (grad_final_state.has_value()) {
    check_same_device(kDeltaRuleOp, "grad_final_state", *grad_final_state, "q", q);
    TORCH_CHECK(grad_final_state->scalar_type() == accumulate_type(q.scalar_type()), kDeltaRuleOp,
                ": grad_final_state must be ", accumulate_type(q.scalar_type()), ", got ",
                grad_final_state->scalar_type());
    check_shape(kDeltaRuleOp, "grad_final_state", *grad_final_state, s.state(), "(like the final state)");
  }
}

// The decoding step's arguments (delta_rule_step and its fused kernels).
constexpr const char* kDeltaStepOp = "linattn.delta_rule_step";

inline void check_delta_step_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                    const at::Tensor& state) {
  const char* op = kDeltaStepOp;
  check_dim(op, "q", q, 3, "(B, H, dk)");
  check_dim(op, "k", k, 3, "(B, H, dk)");
  check_dim(op, "v", v, 3, "(B, H, dv)");
  check_floating(op, "q", q);
  check_same_device_dtype(op, "k", k, "q", q);
  check_same_device_dtype(op, "v", v, "q", q);
  check_shape(op, "k", k, q.sym_sizes(), "(like q)");
  TORCH_CHECK(v.sym_size(0) == q.sym_size(0) && v.sym_size(1) == q.sym_size(1), op,
              ": v must share q's batch and head dims, got q ", shape_str(q), " and v ", shape_str(v));
  const std::vector<c10::SymInt> heads{q.sym_size(0), q.sym_size(1)};
  check_same_device(op, "beta", beta, "q", q);
  check_floating(op, "beta", beta);
  check_shape(op, "beta", beta, heads, "(B, H)");
  if (log_gate.has_value()) {
    check_same_device(op, "log_gate", *log_gate, "q", q);
    check_floating(op, "log_gate", *log_gate);
    if (log_gate->dim() == 3) {
      check_shape(op, "log_gate", *log_gate, q.sym_sizes(), "(B, H, dk)");
    } else {
      check_shape(op, "log_gate", *log_gate, heads, "(B, H) or (B, H, dk)");
    }
  }
  const auto acc = accumulate_type(q.scalar_type());
  check_same_device(op, "state", state, "q", q);
  TORCH_CHECK(state.scalar_type() == acc, op, ": state must be ", acc, " for ", q.scalar_type(), " inputs, got ",
              state.scalar_type());
  check_shape(op, "state", state, {q.sym_size(0), q.sym_size(1), q.sym_size(2), v.sym_size(2)}, "(B, H, dk, dv)");
}

}  // namespace linattn
