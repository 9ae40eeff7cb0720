// Meta kernels of the delta-rule operators: the real kernels' checks (op_checks.h) on symbolic
// sizes, outputs in the real kernels' layouts — what torch.compile's fake tensors trace.
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                                const std::optional<at::Tensor>& initial_state,
                                                const std::optional<at::Tensor>& cu_seqlens, bool causal,
                                                double scale, bool normalize_qk) {
  const DeltaRuleSizes s = check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  return {at::empty_symint(v.sym_sizes(), q.options()), at::empty_symint(s.state(), acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens, bool causal,
    double scale, bool normalize_qk) {
  const DeltaRuleSizes s = check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  check_delta_rule_grads(grad_out, grad_final_state, q, v, s);
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint(v.sym_sizes(), q.options()),
          at::empty_symint(beta.sym_sizes(), beta.options()),
          log_gate.has_value() ? at::empty_symint(log_gate->sym_sizes(), log_gate->options())
                               : at::empty({0}, acc),
          at::empty_symint(s.state(), acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, Meta, m) {
  for (const char* name : {"delta_rule_fwd", "delta_rule_fwd_generic", "delta_rule_fwd_fused"}) {
    m.impl(name, &forward_meta);
  }
  for (const char* name : {"delta_rule_bwd", "delta_rule_bwd_generic", "delta_rule_bwd_fused"}) {
    m.impl(name, &backward_meta);
  }
}

}  // namespace linattn
