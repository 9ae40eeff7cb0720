// One decoding step of the delta rule (docs/methods.md §11): S' = e^g S, then
// S'' = S' + β k (v − S'ᵀ k)ᵀ and out = scale · S''ᵀ q. O(dk · dv) per head in ATen operations,
// registered CompositeImplicitAutograd: every device runs it and autograd differentiates it.
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor> delta_rule_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                                   const at::Tensor& state, double scale) {
  const char* op = "linattn.delta_rule_step";
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
    check_shape(op, "log_gate", *log_gate, heads, "(B, H)");
  }
  const auto acc = accumulate_type(q.scalar_type());
  check_same_device(op, "state", state, "q", q);
  TORCH_CHECK(state.scalar_type() == acc, op, ": state must be ", acc, " for ", q.scalar_type(), " inputs, got ",
              state.scalar_type());
  check_shape(op, "state", state, {q.sym_size(0), q.sym_size(1), q.sym_size(2), v.sym_size(2)}, "(B, H, dk, dv)");
  at::Tensor S = state;
  if (log_gate.has_value()) S = S * log_gate->to(acc).exp().unsqueeze(-1).unsqueeze(-1);
  const at::Tensor kk = k.to(acc), qq = q.to(acc);
  const at::Tensor predicted = at::matmul(kk.unsqueeze(-2), S).squeeze(-2);                     // S'ᵀ k
  const at::Tensor correction = beta.to(acc).unsqueeze(-1) * (v.to(acc) - predicted);           // β (v − S'ᵀ k)
  const at::Tensor S_new = S + kk.unsqueeze(-1) * correction.unsqueeze(-2);
  const at::Tensor out = at::matmul(qq.unsqueeze(-2), S_new).squeeze(-2) * scale;
  return {out.to(q.scalar_type()), S_new};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CompositeImplicitAutograd, m) { m.impl("delta_rule_step", &delta_rule_step); }

}  // namespace linattn
