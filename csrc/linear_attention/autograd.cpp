// Autograd of the linear-attention operators (docs/methods.md §1), in C++: one Function per
// operator family, registered for the Autograd key, so that a call never passes through Python
// (common/autograd_support.h says why). Each forward saves what its backward operator reads; the
// backward operators are first-order only.
#include "../common/autograd_support.h"
#include "generic.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

namespace linattn {
namespace {

using Optional = std::optional<at::Tensor>;
using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const Optional&, const Optional&, int64_t, bool, bool,
    double, const Optional&, const Optional&);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const Optional&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const Optional&, const Optional&, int64_t, bool, bool, const Optional&, const Optional&,
    const Optional&);

// The three implementations of linear_attn_fwd/bwd (the CPU kernel with the generic path for other
// devices, the generic path under its own name, the fused kernels) share one Function.
constexpr char kForward[] = "linattn::linear_attn_fwd";
constexpr char kBackward[] = "linattn::linear_attn_bwd";
constexpr char kForwardGeneric[] = "linattn::linear_attn_fwd_generic";
constexpr char kBackwardGeneric[] = "linattn::linear_attn_bwd_generic";
constexpr char kForwardFused[] = "linattn::linear_attn_fwd_fused";
constexpr char kBackwardFused[] = "linattn::linear_attn_bwd_fused";

// dL/dlog_decay_t = Σ_{i >= t} dL/dc_i for c = cumsum(log_decay): the operators hand back dL/dc.
at::Tensor reverse_cumsum(const at::Tensor& x) {
  return at::flip(at::cumsum(at::flip(x, {-1}), -1), {-1});
}

// The same sum restarting at every sequence end of a packing (cu_seqlens offsets): the suffix sum
// at t minus the one at its sequence's end. Written on symbolic sizes (it also runs while
// torch.compile traces the backward).
at::Tensor segment_reverse_cumsum(const at::Tensor& x, const at::Tensor& cu_seqlens) {
  const at::Tensor ends = cu_seqlens.slice(0, 1).to(at::kLong);
  const at::Tensor positions = at::ones_like(x.flatten(0, -2).select(0, 0), ends.options()).cumsum(0) - 1;
  const at::Tensor sequence = at::bucketize(positions, ends, /*out_int32=*/false, /*right=*/true);
  const at::Tensor end_of = ends.index_select(0, sequence.clamp_max(at::Scalar(ends.sym_numel() - 1)));
  const at::Tensor suffix = at::constant_pad_nd(reverse_cumsum(x), {0, 1});  // a 0 after the last row
  return suffix.slice(-1, 0, -1) - suffix.index_select(-1, end_of);
}

template <const char* ForwardName, const char* BackwardName>
struct LinearAttention : torch::autograd::Function<LinearAttention<ForwardName, BackwardName>> {
  static const c10::TypedOperatorHandle<Forward>& op() {
    static const auto handle = linattn_op<Forward>(ForwardName);
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const Optional& initial_state, const Optional& key_padding_mask,
                               int64_t feature_map, bool causal, bool normalize, double eps,
                               const Optional& log_decay, const Optional& cu_seqlens) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, final_state, normalizer] = op().call(q, k, v, initial_state, key_padding_mask, feature_map, causal,
                                                    normalize, eps, log_decay, cu_seqlens);
    // Without causality every query saw the final state: the backward reuses it instead of
    // recomputing it from the keys (one GEMM pass and one feature-map pass fewer).
    ctx->save_for_backward({q, k, v, out, normalizer, saved_of(initial_state), saved_of(key_padding_mask),
                            causal ? at::Tensor() : final_state, saved_of(log_decay), saved_of(cu_seqlens)});
    ctx->saved_data["options"] = c10::List<int64_t>({feature_map, causal, normalize});
    ctx->mark_non_differentiable({normalizer});
    ctx->set_materialize_grads(false);
    return {out, final_state, normalizer};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = linattn_op<Backward>(BackwardName);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &out = saved[3], &initial = saved[5], &log_decay = saved[8], &cu_seqlens = saved[9];
    const auto options = ctx->saved_data["options"].toIntList();
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    auto [grad_q, grad_k, grad_v, grad_initial, grad_cumulative] =
        op.call(grad_out, optional_of(grads[1]), saved[0], saved[1], saved[2], out, saved[4], optional_of(initial),
                optional_of(saved[6]), options[0], options[1] != 0, options[2] != 0, optional_of(saved[7]),
                optional_of(log_decay), optional_of(cu_seqlens));
    if (!initial.defined()) grad_initial = at::Tensor();
    at::Tensor grad_log_decay;
    if (log_decay.defined()) {
      // Per-channel factors (B, H, T, m) sum along T as the channels' rows.
      const bool per_channel = grad_cumulative.dim() == 4;
      const at::Tensor rows = per_channel ? grad_cumulative.movedim(3, 2) : grad_cumulative;
      grad_log_decay = cu_seqlens.defined() ? segment_reverse_cumsum(rows, cu_seqlens) : reverse_cumsum(rows);
      if (per_channel) grad_log_decay = grad_log_decay.movedim(2, 3);
    }
    return {grad_q, grad_k, grad_v, grad_initial, {}, {}, {}, {}, {}, grad_log_decay, {}};
  }
};

template <const char* ForwardName, const char* BackwardName>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Optional& initial_state,
    const Optional& key_padding_mask, int64_t feature_map, bool causal, bool normalize, double eps,
    const Optional& log_decay, const Optional& cu_seqlens) {
  using Function = LinearAttention<ForwardName, BackwardName>;
  if (!needs_graph(q, k, v, initial_state, log_decay)) {
    return call_below_autograd(Function::op(), q, k, v, initial_state, key_padding_mask, feature_map, causal,
                               normalize, eps, log_decay, cu_seqlens);
  }
  auto r = Function::apply(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps, log_decay,
                           cu_seqlens);
  return {r[0], r[1], r[2]};
}

// φ(x) and φ'(x) of a fused feature map (kernel.h's codes), with the generic path's formulas.
std::pair<at::Tensor, at::Tensor> feature_and_slope(const at::Tensor& x, int64_t code) {
  const auto map = static_cast<FeatureMap>(code);
  if (map == kFeatureIdentity) return {x, at::ones_like(x)};
  return {features(x, map), feature_derivative(x, map)};
}

// One decoding step's backward, in ATen ops (the step is O(m·dv), and so is its gradient):
// out = num/den with num = φ(q)ᵀS', den = φ(q)·z' + eps, S' = f·S + φ(k)vᵀ, z' = f·z + φ(k).
template <const char* StepName>
struct LinearAttentionStep : torch::autograd::Function<LinearAttentionStep<StepName>> {
  static const auto& op() {
    static const auto handle = linattn_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const std::optional<at::Tensor>&, int64_t, bool, double)>(StepName);
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& S, const at::Tensor& z,
                               const std::optional<at::Tensor>& factor, int64_t feature_map,
                               bool normalize, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, S_new, z_new] = op().call(q, k, v, S, z, factor, feature_map, normalize, eps);
    ctx->save_for_backward({q, k, v, S, z, saved_of(factor), S_new, z_new});
    ctx->saved_data["options"] = c10::List<int64_t>({feature_map, normalize});
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    return {out, S_new, z_new};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &S = saved[3], &z = saved[4];
    const at::Tensor &factor = saved[5], &S_new = saved[6], &z_new = saved[7];
    const auto options = ctx->saved_data["options"].toIntList();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto acc = S.scalar_type();
    auto [phi_q, slope_q] = feature_and_slope(q.to(acc), options[0]);
    auto [phi_k, slope_k] = feature_and_slope(k.to(acc), options[0]);
    const at::Tensor values = v.to(acc);
    at::Tensor grad_S = grads[1].defined() ? grads[1] : at::zeros_like(S_new);
    at::Tensor grad_z = grads[2].defined() ? grads[2] : at::zeros_like(z_new);
    at::Tensor grad_phi_q = at::zeros_like(phi_q);
    if (grads[0].defined()) {
      at::Tensor grad_num = grads[0].to(acc), grad_den;
      if (options[1] != 0) {
        const at::Tensor numerator = at::matmul(phi_q.unsqueeze(-2), S_new).squeeze(-2);
        const at::Tensor den = (phi_q * z_new).sum(-1, true) + eps;
        const double tiny = acc == at::kDouble ? std::numeric_limits<double>::min()
                                               : std::numeric_limits<float>::min();
        const at::Tensor vanished = den.abs() < tiny;  // such rows are 0: no gradient
        const at::Tensor safe = at::where(vanished, at::ones_like(den), den);
        const at::Tensor zero = at::zeros_like(den);
        grad_den = at::where(vanished, zero, -(grad_num * numerator).sum(-1, true) / safe.square());
        grad_num = at::where(vanished, zero, grad_num / safe);
      }
      grad_S = grad_S + phi_q.unsqueeze(-1) * grad_num.unsqueeze(-2);
      grad_phi_q = at::matmul(S_new, grad_num.unsqueeze(-1)).squeeze(-1);
      if (grad_den.defined()) {
        grad_z = grad_z + phi_q * grad_den;
        grad_phi_q = grad_phi_q + z_new * grad_den;
      }
    }
    const at::Tensor grad_phi_k = at::matmul(grad_S, values.unsqueeze(-1)).squeeze(-1) + grad_z;
    const at::Tensor grad_v = at::matmul(phi_k.unsqueeze(-2), grad_S).squeeze(-2);
    at::Tensor grad_factor;
    if (factor.defined()) {
      // (B, H) scales the whole state, (B, H, m) each feature channel's row of it.
      const bool per_channel = factor.dim() == 3;
      const at::Tensor row_factor = per_channel ? factor : factor.unsqueeze(-1);
      grad_factor = (grad_S * S).sum(-1) + grad_z * z;
      if (!per_channel) grad_factor = grad_factor.sum(-1);
      grad_S = grad_S * row_factor.unsqueeze(-1);
      grad_z = grad_z * row_factor;
    }
    return {(grad_phi_q * slope_q).to(q.scalar_type()), (grad_phi_k * slope_k).to(k.scalar_type()),
            grad_v.to(v.scalar_type()), grad_S, grad_z, grad_factor, {}, {}, {}};
  }
};

template <const char* StepName>
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& S,
    const at::Tensor& z, const std::optional<at::Tensor>& factor, int64_t feature_map, bool normalize,
    double eps) {
  using Function = LinearAttentionStep<StepName>;
  if (!needs_graph(q, k, v, S, z, factor)) {
    return call_below_autograd(Function::op(), q, k, v, S, z, factor, feature_map, normalize, eps);
  }
  auto r = Function::apply(q, k, v, S, z, factor, feature_map, normalize, eps);
  return {r[0], r[1], r[2]};
}

constexpr char kStep[] = "linattn::linear_attn_step";
constexpr char kStepGeneric[] = "linattn::linear_attn_step_generic";

}  // namespace

TORCH_LIBRARY_IMPL(linattn, Autograd, m) {
  m.impl("linear_attn_fwd", &linear_attention_autograd<kForward, kBackward>);
  m.impl("linear_attn_fwd_generic", &linear_attention_autograd<kForwardGeneric, kBackwardGeneric>);
  m.impl("linear_attn_fwd_fused", &linear_attention_autograd<kForwardFused, kBackwardFused>);
  m.impl("linear_attn_bwd", &FirstOrderOnly<kBackward, Backward>::call);
  m.impl("linear_attn_bwd_generic", &FirstOrderOnly<kBackwardGeneric, Backward>::call);
  m.impl("linear_attn_bwd_fused", &FirstOrderOnly<kBackwardFused, Backward>::call);
  m.impl("linear_attn_step", &step_autograd<kStep>);
  m.impl("linear_attn_step_generic", &step_autograd<kStepGeneric>);
}

}  // namespace linattn
