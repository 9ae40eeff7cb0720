// Autograd of the restricted-softmax operator (docs/methods.md §5–7), in C++ as for linear
// attention (common/autograd_support.h says why). The forward saves the per-row logsumexp; the
// backward operator recomputes probabilities from it and is first-order only. lse is
// differentiable: callers combine attentions by it (Reformer's rounds).
#include "../common/autograd_support.h"
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace {

using Optional = std::optional<at::Tensor>;
using Forward = RestrictedForwardSignature;
using Backward = RestrictedBackwardSignature;

constexpr char kForward[] = "linattn::restricted_softmax_fwd";
constexpr char kBackward[] = "linattn::restricted_softmax_bwd";
constexpr char kForwardGeneric[] = "linattn::restricted_softmax_fwd_generic";
constexpr char kBackwardGeneric[] = "linattn::restricted_softmax_bwd_generic";
constexpr char kForwardFused[] = "linattn::restricted_softmax_fwd_fused";
constexpr char kBackwardFused[] = "linattn::restricted_softmax_bwd_fused";

// The pattern's tensors, in the order they are saved after q, k, v, out, lse.
constexpr int kSavedPattern = 5;

template <const char* ForwardName, const char* BackwardName>
struct RestrictedSoftmax : torch::autograd::Function<RestrictedSoftmax<ForwardName, BackwardName>> {
  static const c10::TypedOperatorHandle<Forward>& op() {
    static const auto handle = linattn_op<Forward>(ForwardName);
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = op().call(q, k, v, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
    ctx->save_for_backward({q, k, v, out, lse, saved_of(layout), saved_of(global_mask), saved_of(key_padding_mask),
                            saved_of(q_segments), saved_of(k_segments), saved_of(positions), saved_of(bias),
                            saved_of(alibi_slopes), saved_of(dropout_seed), saved_of(forget_cumsum)});
    ctx->saved_data["options"] =
        c10::List<int64_t>({window_left, window_right, dilation, causal, block_size});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = linattn_op<Backward>(BackwardName);
    const auto saved = ctx->get_saved_variables();
    const auto options = ctx->saved_data["options"].toIntList();
    const at::Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(saved[3]);
    const Optional grad_lse = grads[1].defined() ? Optional(grads[1].contiguous()) : std::nullopt;
    auto pattern = [&](int i) { return optional_of(saved[kSavedPattern + i]); };
    const at::Tensor& bias = saved[kSavedPattern + 6];
    const at::Tensor& forget_cumsum = saved[kSavedPattern + 9];
    auto [grad_q, grad_k, grad_v, grad_bias, grad_forget] =
        op.call(grad_out, grad_lse, saved[0], saved[1], saved[2], saved[3], saved[4],
                ctx->saved_data["scale"].toDouble(), options[0], options[1], options[2], options[3] != 0, pattern(0),
                options[4], pattern(1), pattern(2), pattern(3), pattern(4), pattern(5), pattern(6),
                ctx->saved_data["softcap"].toDouble(), pattern(7), ctx->saved_data["dropout_p"].toDouble(),
                pattern(8), pattern(9));
    if (!bias.defined()) grad_bias = at::Tensor();
    if (!forget_cumsum.defined()) grad_forget = at::Tensor();
    // Gradients for q, k, v, then scale and the pattern's arguments: the bias and the forget gates
    // only (softcap is a constant of the model, as scale; the backward draws the forward's dropout
    // mask again).
    return {grad_q, grad_k, grad_v, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, grad_bias, {}, {}, {}, {},
            grad_forget};
  }
};

template <const char* ForwardName, const char* BackwardName>
std::tuple<at::Tensor, at::Tensor> restricted_softmax_autograd(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, double scale,
                                                               LINATTN_RESTRICTED_PATTERN_PARAMS) {
  using Function = RestrictedSoftmax<ForwardName, BackwardName>;
  if (!needs_graph(q, k, v, bias, forget_cumsum))
    return call_below_autograd(Function::op(), q, k, v, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
  auto r = Function::apply(q, k, v, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, Autograd, m) {
  m.impl("restricted_softmax_fwd", &restricted_softmax_autograd<kForward, kBackward>);
  m.impl("restricted_softmax_fwd_generic", &restricted_softmax_autograd<kForwardGeneric, kBackwardGeneric>);
  m.impl("restricted_softmax_fwd_fused", &restricted_softmax_autograd<kForwardFused, kBackwardFused>);
  m.impl("restricted_softmax_bwd_fused", &FirstOrderOnly<kBackwardFused, Backward>::call);
  m.impl("restricted_softmax_bwd", &FirstOrderOnly<kBackward, Backward>::call);
  m.impl("restricted_softmax_bwd_generic", &FirstOrderOnly<kBackwardGeneric, Backward>::call);
}

}  // namespace linattn
