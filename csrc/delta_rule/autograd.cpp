// Autograd of the delta-rule operators, in C++ (common/autograd_support.h says why): one Function
// for delta_rule_fwd and its generic and fused twins (each with its backward); the backward
// operators are first-order only.
#include "../common/autograd_support.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace {

using Optional = std::optional<at::Tensor>;
using Forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const Optional&, const Optional&,
                                                   const Optional&, bool, double, bool);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const Optional&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const Optional&, const Optional&, const Optional&, bool, double, bool);

constexpr char kForward[] = "linattn::delta_rule_fwd";
constexpr char kBackward[] = "linattn::delta_rule_bwd";
constexpr char kForwardGeneric[] = "linattn::delta_rule_fwd_generic";
constexpr char kBackwardGeneric[] = "linattn::delta_rule_bwd_generic";
constexpr char kForwardFused[] = "linattn::delta_rule_fwd_fused";
constexpr char kBackwardFused[] = "linattn::delta_rule_bwd_fused";

template <const char* ForwardName, const char* BackwardName>
struct DeltaRule : torch::autograd::Function<DeltaRule<ForwardName, BackwardName>> {
  static const c10::TypedOperatorHandle<Forward>& op() {
    static const auto handle = linattn_op<Forward>(ForwardName);
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& beta, const Optional& log_gate, const Optional& initial_state,
                               const Optional& cu_seqlens, bool causal, double scale, bool normalize_qk) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, final_state] =
        op().call(q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale, normalize_qk);
    // The backward recomputes the chunks' states from the inputs: nothing of size T · dk · dv is kept.
    ctx->save_for_backward({q, k, v, beta, saved_of(log_gate), saved_of(initial_state), saved_of(cu_seqlens)});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["normalize_qk"] = normalize_qk;
    ctx->set_materialize_grads(false);
    return {out, final_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = linattn_op<Backward>(BackwardName);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &v = saved[2], &log_gate = saved[4], &initial = saved[5];
    if (!grads[0].defined() && !grads[1].defined()) return {{}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(v);
    auto [grad_q, grad_k, grad_v, grad_beta, grad_gate, grad_initial] =
        op.call(grad_out, optional_of(grads[1]), q, saved[1], v, saved[3], optional_of(log_gate),
                optional_of(initial), optional_of(saved[6]), ctx->saved_data["causal"].toBool(),
                ctx->saved_data["scale"].toDouble(), ctx->saved_data["normalize_qk"].toBool());
    return {grad_q, grad_k, grad_v, grad_beta, log_gate.defined() ? grad_gate : at::Tensor(),
            initial.defined() ? grad_initial : at::Tensor(), {}, {}, {}, {}};
  }
};

template <const char* ForwardName, const char* BackwardName>
std::tuple<at::Tensor, at::Tensor> delta_rule_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& beta, const Optional& log_gate,
                                                       const Optional& initial_state, const Optional& cu_seqlens,
                                                       bool causal, double scale, bool normalize_qk) {
  using Function = DeltaRule<ForwardName, BackwardName>;
  if (!needs_graph(q, k, v, beta, log_gate, initial_state)) {
    return call_below_autograd(Function::op(), q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale,
                               normalize_qk);
  }
  auto r = Function::apply(q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale, normalize_qk);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, Autograd, m) {
  m.impl("delta_rule_fwd", &delta_rule_autograd<kForward, kBackward>);
  m.impl("delta_rule_fwd_generic", &delta_rule_autograd<kForwardGeneric, kBackwardGeneric>);
  m.impl("delta_rule_fwd_fused", &delta_rule_autograd<kForwardFused, kBackwardFused>);
  m.impl("delta_rule_bwd", &FirstOrderOnly<kBackward, Backward>::call);
  m.impl("delta_rule_bwd_generic", &FirstOrderOnly<kBackwardGeneric, Backward>::call);
  m.impl("delta_rule_bwd_fused", &FirstOrderOnly<kBackwardFused, Backward>::call);
}

}  // namespace linattn
