// CPU operator entry points of the delta rule: validate, allocate, hand raw views to the chunkwise
// kernels (cpu_kernel_impl.h). Plain, gated and packed batches share one body.
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

DeltaRuleShape kernel_shape(const at::Tensor& q, const at::Tensor& v, const std::optional<at::Tensor>& log_gate,
                            bool causal, double scale, bool normalize_qk) {
  DeltaRuleShape s;
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.length = q.size(2);
  s.key_dim = q.size(3);
  s.value_dim = v.size(3);
  s.causal = causal;
  s.scale = scale;
  s.normalize_qk = normalize_qk;
  s.gate_width = per_channel_gates(log_gate) ? s.key_dim : 1;
  return s;
}

// A per-token (B, H, T[, dk]) tensor or a state, contiguous in the accumulation type.
at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

struct Packing {
  std::vector<int64_t> offsets;
  int64_t sequences = 0;
  const int64_t* data() const { return offsets.empty() ? nullptr : offsets.data(); }
};

Packing packing_of(const std::optional<at::Tensor>& cu_seqlens, int64_t length) {
  Packing p;
  if (cu_seqlens.has_value()) {
    p.offsets = read_packed_offsets(kDeltaRuleOp, *cu_seqlens, length);
    p.sequences = static_cast<int64_t>(p.offsets.size()) - 1;
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                               const std::optional<at::Tensor>& initial_state,
                                               const std::optional<at::Tensor>& cu_seqlens, bool causal,
                                               double scale, bool normalize_qk) {
  const DeltaRuleSizes sizes = check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  const DeltaRuleShape s = kernel_shape(q, v, log_gate, causal, scale, normalize_qk);
  const Packing packing = packing_of(cu_seqlens, s.length);
  const auto acc = accumulate_type(q.scalar_type());
  auto out = at::empty({s.batch, s.heads, s.length, s.value_dim}, q.options());
  auto final_state = at::empty_symint(sizes.state(), q.options().dtype(acc));
  const at::Tensor b = as_acc(beta, acc), g = as_acc(log_gate, acc), initial = as_acc(initial_state, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "delta_rule_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LINATTN_CPU_ISA_DISPATCH(delta_rule_forward_cpu<scalar_t, acc_t>(
        s, packing.data(), packing.sequences, view_of<scalar_t>(q), view_of<scalar_t>(k), view_of<scalar_t>(v),
        b.const_data_ptr<acc_t>(), data_or_null<acc_t>(g), data_or_null<acc_t>(initial),
        out.mutable_data_ptr<scalar_t>(), final_state.mutable_data_ptr<acc_t>()));
  });
  return {out, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens, bool causal,
    double scale, bool normalize_qk) {
  const DeltaRuleSizes sizes = check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  check_delta_rule_grads(grad_out, grad_final_state, q, v, sizes);
  const DeltaRuleShape s = kernel_shape(q, v, log_gate, causal, scale, normalize_qk);
  const Packing packing = packing_of(cu_seqlens, s.length);
  const auto acc = accumulate_type(q.scalar_type());
  auto grad_q = at::empty({s.batch, s.heads, s.length, s.key_dim}, q.options());
  auto grad_k = at::empty({s.batch, s.heads, s.length, s.key_dim}, q.options());
  auto grad_v = at::empty({s.batch, s.heads, s.length, s.value_dim}, q.options());
  auto grad_beta = at::empty({s.batch, s.heads, s.length}, q.options().dtype(acc));
  auto grad_gate = log_gate.has_value() ? at::empty(log_gate->sizes(), q.options().dtype(acc))
                                        : at::empty({0}, q.options().dtype(acc));
  auto grad_initial = at::empty_symint(sizes.state(), q.options().dtype(acc));
  const at::Tensor b = as_acc(beta, acc), g = as_acc(log_gate, acc), initial = as_acc(initial_state, acc);
  const at::Tensor grad_final = as_acc(grad_final_state, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "delta_rule_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LINATTN_CPU_ISA_DISPATCH(delta_rule_backward_cpu<scalar_t, acc_t>(
        s, packing.data(), packing.sequences, view_of<scalar_t>(grad_out), view_of<scalar_t>(q),
        view_of<scalar_t>(k), view_of<scalar_t>(v), b.const_data_ptr<acc_t>(), data_or_null<acc_t>(g),
        data_or_null<acc_t>(initial), data_or_null<acc_t>(grad_final), grad_q.mutable_data_ptr<scalar_t>(),
        grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(), grad_beta.mutable_data_ptr<acc_t>(),
        log_gate.has_value() ? grad_gate.mutable_data_ptr<acc_t>() : nullptr, grad_initial.mutable_data_ptr<acc_t>()));
  });
  return {grad_q, grad_k, grad_v, grad_beta.to(beta.scalar_type()),
          log_gate.has_value() ? grad_gate.to(log_gate->scalar_type()) : grad_gate, grad_initial};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) {
  m.impl("delta_rule_fwd", &forward_cpu);
  m.impl("delta_rule_bwd", &backward_cpu);
}

}  // namespace linattn
