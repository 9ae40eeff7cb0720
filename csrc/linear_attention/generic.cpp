// Device-generic linear attention: the same operators written with ATen ops only (batched
// matmuls and a cumulative sum over chunk states), so that CUDA and every other backend get
// a correct implementation without a fused kernel. It is registered as the
// CompositeExplicitAutograd kernel of the main operators, and under the *_generic names so
// the tests can run it on CPU tensors; the plain forward is in generic_forward.cpp, the fading
// and packed forms in fading_generic.cpp.
#include "generic.h"
#include "../common/causal_product.h"
#include "op_checks.h"
#include "plain_entry.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace linattn {

bool tracked(const at::Tensor& x) { return x.defined() && at::GradMode::is_enabled() && x.requires_grad(); }
bool any_tracked(std::initializer_list<at::Tensor> xs) {
  return std::any_of(xs.begin(), xs.end(), [](const at::Tensor& x) { return tracked(x); });
}

at::Tensor plus_state(const at::Tensor& x, const at::Tensor& state) { return state.defined() ? x + state : x; }

at::Tensor features(const at::Tensor& x, FeatureMap map) {
  switch (map) {
    case kFeatureElu:
      // elu(x) + 1 as exp(x) for x <= 0 (exactly, as the CPU kernel): elu's expm1(x) + 1 is
      // 0 in float32 for x below about -17. It is its derivative exp(min(x, 0)) plus max(x, 0):
      // two temporaries instead of where's four (x > 0 gives 1 + x; NaN and ±inf as where gave).
      if (tracked(x)) return feature_derivative(x, map) + at::relu(x);
      return feature_derivative(x, map).add_(at::relu(x));
    case kFeatureRelu:
      return at::relu(x);
    default:
      return x;
  }
}

at::Tensor feature_derivative(const at::Tensor& x, FeatureMap map) {
  switch (map) {
    case kFeatureElu:  // 1 for x > 0, else exp(x): exp(min(x, 0)), one temporary
      return tracked(x) ? at::clamp_max(x, 0).exp() : at::clamp_max(x, 0).exp_();
    default:  // relu
      return (x > 0).to(x.scalar_type());
  }
}

// The state entering each chunk: S0 (or 0) before the first, then S0 plus the prefix sums of the
// chunks' own states (B, H, n, a, b); and the final state. Written in place unless autograd records.
std::tuple<at::Tensor, at::Tensor> entering_states(const at::Tensor& chunk_states, const at::Tensor& S0) {
  const int64_t n = chunk_states.size(2);
  at::Tensor before, last;
  if (tracked(chunk_states) || tracked(S0)) {  // out of place, for autograd
    const at::Tensor inclusive = chunk_states.cumsum(2);
    before = at::cat({at::zeros_like(chunk_states.narrow(2, 0, 1)), inclusive.narrow(2, 0, n - 1)}, 2);
    if (S0.defined()) before = before + S0.unsqueeze(2);
    last = inclusive.select(2, n - 1);
  } else {
    before = at::empty_like(chunk_states);
    if (n > 1) {
      at::Tensor after_first = before.narrow(2, 1, n - 1);
      at::cumsum_out(after_first, chunk_states.narrow(2, 0, n - 1), 2);
    }
    last = n > 1 ? before.select(2, n - 1) + chunk_states.select(2, n - 1) : chunk_states.select(2, 0).clone();
    if (S0.defined()) {
      before.select(2, 0).copy_(S0);
      if (n > 1) before.narrow(2, 1, n - 1).add_(S0.unsqueeze(2));
    } else {
      before.select(2, 0).zero_();
    }
  }
  return {before, S0.defined() ? S0 + last : last};
}

namespace {

// The causal gradients in chunks of C rows, with no reversed copy of an input (B, H, T, ·):
//   dQ_i  = G'_i (S0 + Σ_{j≤i} K_jᵀ Vp_j)ᵀ        = G'_i S0ᵀ + Σ_{j≤i} (G'_i·Vp_j) K_j
//   dK_j  = Vp_j U_jᵀ,  dVp_j = K_j U_j,  U_j = dS_N + Σ_{i≥j} Q_iᵀ G'_i,  dS0 = U_0.
// Inside a chunk, the pair weights are two score blocks shared by the three gradients: A = G' Vpᵀ
// (dQ: tril(A) K; dK: tril(A)ᵀ Q) and P = Q Kᵀ (dVp: tril(P)ᵀ G'). Across chunks, the states
// before each chunk (K_cᵀ Vp_c, prefix sums from S0) give dQ, and the states after it (Q_cᵀ G'_c,
// suffix sums from dS_N: the chunks' sums in reverse order, a copy of the states only) give dK and
// dVp. The chunk is at least min(a, b) long, so the chunk states held at once take no more memory
// than T·max(a, b) per batch·head, as much as one input.
struct CausalGradients {
  at::Tensor dq, dk, dvp, d_initial;
};
CausalGradients causal_gradients(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& Vp,
                                 const at::Tensor& Gp, const at::Tensor& S0, const at::Tensor& dSN) {
  const int64_t B = Q.size(0), H = Q.size(1), T = Q.size(2), a = Q.size(3), b = Vp.size(3);
  if (T == 0) {  // no rows: the initial state's gradient is the final state's
    const at::Tensor d_initial = dSN.defined() ? dSN.clone() : Q.new_zeros({B, H, a, b});
    return {Q.new_zeros({B, H, 0, a}), Q.new_zeros({B, H, 0, a}), Q.new_zeros({B, H, 0, b}), d_initial};
  }
  const int64_t C = std::max<int64_t>(64, std::min(a, b));
  const int64_t n = (T + C - 1) / C;
  const at::Tensor Qc = in_chunks(Q, n, C), Kc = in_chunks(K, n, C), Vc = in_chunks(Vp, n, C),
                   Gc = in_chunks(Gp, n, C);
  const at::Tensor A = at::bmm(Gc, Vc.transpose(-1, -2)).tril_();
  at::Tensor dq = causal_product(A, Kc);
  at::Tensor dk = anticausal_product(A, Qc);
  at::Tensor dvp = anticausal_product(at::bmm(Qc, Kc.transpose(-1, -2)).tril_(), Gc);
  // Before each chunk: S0 + the earlier chunks' K_cᵀ Vp_c.
  const at::Tensor before =
      std::get<0>(entering_states(at::bmm(Kc.transpose(-1, -2), Vc).view({B, H, n, a, b}), S0));
  dq.baddbmm_(Gc, before.view({B * H * n, a, b}).transpose(-1, -2));
  // After each chunk: dS_N + the later chunks' Q_cᵀ G'_c, summed from the last chunk back.
  const at::Tensor later = at::bmm(Qc.transpose(-1, -2), Gc).view({B, H, n, a, b}).flip(2);
  const auto [after_reversed, d_initial] = entering_states(later, dSN);
  const at::Tensor after = after_reversed.flip(2).view({B * H * n, a, b});
  dk.baddbmm_(Vc, after.transpose(-1, -2));
  dvp.baddbmm_(Kc, after);
  auto rows = [&](const at::Tensor& x) {
    const at::Tensor y = x.view({B, H, n * C, x.size(-1)});
    return n * C > T ? y.narrow(2, 0, T) : y;
  };
  return {rows(dq), rows(dk), rows(dvp), d_initial};
}

}  // namespace

// [v | 1] in `acc`, with a padded key's row all 0: its value is never read, so a NaN there stays
// out. Untracked, v is widened as it is copied into place (one fresh tensor, not a widened copy
// and then a padded one).
at::Tensor augmented_values(const at::Tensor& v, const std::optional<at::Tensor>& mask,
                            at::ScalarType acc) {
  at::Tensor augmented;  // a fresh tensor: masked in place
  if (tracked(v)) {
    augmented = at::constant_pad_nd(v.to(acc), {0, 1}, 1.0);
  } else {
    auto sizes = v.sizes().vec();
    sizes.back() += 1;
    augmented = at::empty(sizes, v.options().dtype(acc));
    augmented.narrow(-1, 0, v.size(-1)).copy_(v);
    augmented.select(-1, v.size(-1)).fill_(1);
  }
  return mask.has_value() ? augmented.masked_fill_(mask->unsqueeze(1).unsqueeze(-1), 0) : augmented;
}

// φ(k) with padded keys zeroed: they then leave the state and every sum. In place, unless φ is k
// itself (the identity map) or autograd may keep it (relu's backward reads it): a copy then.
at::Tensor mask_padded_keys(const at::Tensor& phi, const at::Tensor& k, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return phi;
  const at::Tensor padded = mask->unsqueeze(1).unsqueeze(-1);
  return phi.is_same(k) || tracked(phi) ? phi.masked_fill(padded, 0) : phi.masked_fill_(padded, 0);
}

at::Tensor key_features(const at::Tensor& k, const std::optional<at::Tensor>& mask, FeatureMap map) {
  return mask_padded_keys(features(k, map), k, mask);
}

// A normalizer that is 0 or subnormal (eps underflowed, no key matched): the row is 0 and
// passes no gradient, as in the CPU kernel. NaN is not vanished.
at::Tensor vanished(const at::Tensor& normalizer) {
  const double tiny = normalizer.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                              : std::numeric_limits<float>::min();
  return normalizer.abs() < tiny;
}

namespace {

// 1 / normalizer, 0 where it vanished (the row is 0 and passes no gradient); (…, 1).
at::Tensor inverse_normalizer(const at::Tensor& normalizer) {
  return at::where(vanished(normalizer), 0, normalizer.reciprocal()).unsqueeze(-1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> normalized_output(const at::Tensor& O, int64_t value_dim, bool normalize,
                                                     double eps, at::ScalarType out_dtype, bool may_vanish,
                                                     const at::Tensor& marks) {
  const at::Tensor numerator = O.narrow(-1, 0, value_dim);
  const at::Tensor normalizer = O.select(-1, value_dim) + eps;
  // numerator / normalizer; a vanished normalizer divides by +inf, so the row is 0 (still NaN where
  // it saw a NaN or an inf). The marks are added (0, or the non-finite value a row met).
  at::Tensor divisor;
  if (normalize) {
    divisor = may_vanish ? at::where(vanished(normalizer), std::numeric_limits<double>::infinity(), normalizer)
                         : normalizer;
    divisor = divisor.unsqueeze(-1);
  }
  if (tracked(numerator) || tracked(normalizer)) {
    at::Tensor out = normalize ? numerator / divisor : numerator;
    if (marks.defined()) out = out + marks;
    return {out.to(out_dtype).contiguous(), normalizer};
  }
  // Written straight into the output dtype, rounded once.
  at::Tensor out = at::empty(numerator.sizes(), numerator.options().dtype(out_dtype));
  if (normalize) {
    marks.defined() ? at::addcdiv_out(out, marks, numerator, divisor) : at::div_out(out, numerator, divisor);
  } else {
    marks.defined() ? at::add_out(out, numerator, marks) : out.copy_(numerator);
  }
  return {out, normalizer};
}

at::Tensor augmented_cotangent(const at::Tensor& G, const at::Tensor& out, const at::Tensor& normalizer,
                               bool normalize) {
  // A zero cotangent contributes nothing (not 0·out, NaN for a non-finite output): a row whose
  // cotangent is all 0, or whose normalizer is 0 (zero output), passes no gradient.
  if (!normalize) return at::constant_pad_nd(G, {0, 1});  // the normalizer's cotangent: 0
  const at::Tensor inv = inverse_normalizer(normalizer);
  const at::Tensor zero = G == 0;
  const bool recorded = tracked(G) || tracked(out);
  // G·o in G's dtype (o promoted exactly within the product: no widened copy), 0 where G is 0.
  const at::Tensor products = G * out;
  const at::Tensor g_dot_out = (recorded ? at::where(zero, 0, products) : products.masked_fill_(zero, 0)).sum(-1, true);
  const at::Tensor d_normalizer = -g_dot_out * inv;
  const at::Tensor no_cotangent = zero.all(-1, true);
  if (recorded) return at::where(no_cotangent, 0, at::cat({G * inv, d_normalizer}, -1));
  // [G·inv | d_normalizer] written into one tensor, rows without a cotangent zeroed in place.
  auto sizes = G.sizes().vec();
  sizes.back() += 1;
  at::Tensor Gp = at::empty(sizes, G.options());
  at::Tensor numerator_part = Gp.narrow(-1, 0, G.size(-1));
  at::mul_out(numerator_part, G, inv);
  Gp.narrow(-1, G.size(-1), 1).copy_(d_normalizer);
  return Gp.masked_fill_(no_cotangent, 0);
}

BackwardFeatures backward_features(const at::Tensor& q, const at::Tensor& q_acc, const at::Tensor& k_acc,
                                   FeatureMap map, bool in_place) {
  BackwardFeatures f;
  if (map == kFeatureElu && in_place) {
    // φ built from its derivative: elu+1's is exp(min(x, 0)), and φ = that + relu(x), for the
    // queries and the keys as one list (one launch for both on CUDA).
    const std::vector<at::Tensor> inputs{q_acc, k_acc};
    const std::vector<at::Tensor> derivatives = at::_foreach_clamp_max(inputs, 0);
    at::_foreach_exp_(derivatives);
    // Widened inputs are the operator's own copies: φ takes their place.
    std::vector<at::Tensor> phi = inputs;
    if (q.scalar_type() != q_acc.scalar_type()) {
      at::_foreach_clamp_min_(phi, 0);
    } else {
      phi = at::_foreach_clamp_min(inputs, 0);
    }
    at::_foreach_add_(phi, derivatives);
    f.dphi_q = derivatives[0], f.dphi_k = derivatives[1], f.Q = phi[0], f.K = phi[1];
    return f;
  }
  if (map != kFeatureIdentity) {
    f.dphi_q = feature_derivative(q_acc, map);
    f.dphi_k = feature_derivative(k_acc, map);
  }
  f.Q = features(q_acc, map), f.K = features(k_acc, map);
  return f;
}

at::Tensor through_features(const at::Tensor& grad, const at::Tensor& derivative, at::ScalarType dtype,
                            bool in_place) {
  if (!derivative.defined()) return grad.to(dtype).contiguous();
  if (!in_place) return (grad * derivative).to(dtype).contiguous();
  at::Tensor result = at::empty(grad.sizes(), grad.options().dtype(dtype));
  return at::mul_out(result, grad, derivative);  // rounded once, into the input dtype
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state) {
  check_backward_inputs(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                        key_padding_mask, feature_map, causal, final_state);
  const LinearAttentionShape s = kernel_shape(q, k, v, feature_map, causal, normalize, 1.0);
  const auto acc = accumulate_type(q.scalar_type());
  const at::Tensor q_acc = q.to(acc), k_acc = k.to(acc);
  const bool in_place = !any_tracked({q, k, v, grad_out, out});
  const BackwardFeatures phi = backward_features(q, q_acc, k_acc, s.feature_map, in_place);
  const at::Tensor& Q = phi.Q;
  at::Tensor K = phi.K;
  K = mask_padded_keys(K, k, key_padding_mask);  // (k: φ may be k itself, never a copy of ours)
  const at::Tensor Vp = augmented_values(v, key_padding_mask, acc);
  const at::Tensor G = grad_out.to(acc);
  // Gradient with respect to the augmented output [numerator | normalizer].
  const at::Tensor Gp = augmented_cotangent(G, out, normalizer, normalize);
  const at::Tensor S0 = state_or_none(initial_state);
  const at::Tensor dSN = state_or_none(grad_final_state);
  at::Tensor dq, dk, dvp, d_initial;
  if (causal) {
    CausalGradients g = causal_gradients(Q, K, Vp, Gp, S0, dSN);
    dq = std::move(g.dq), dk = std::move(g.dk), dvp = std::move(g.dvp), d_initial = std::move(g.d_initial);
  } else {
    // Every query saw the final state: the forward's when handed over, else recomputed.
    const at::Tensor state =
        final_state.has_value() ? *final_state : plus_state(at::matmul(K.transpose(-1, -2), Vp), S0);
    d_initial = plus_state(at::matmul(Q.transpose(-1, -2), Gp), dSN);
    dq = at::matmul(Gp, state.transpose(-1, -2));
    dk = at::matmul(Vp, d_initial.transpose(-1, -2));
    dvp = at::matmul(K, d_initial);
  }
  // Back through φ; padded keys got φ(k) := 0, so their gradient is 0.
  const auto dtype = q.scalar_type();
  dq = through_features(dq, phi.dphi_q, dtype, in_place);
  dk = through_features(dk, phi.dphi_k, dtype, in_place);
  at::Tensor dv = dvp.narrow(-1, 0, s.value_dim).to(dtype).contiguous();
  if (key_padding_mask.has_value()) {
    const at::Tensor padded = key_padding_mask->unsqueeze(1).unsqueeze(-1);
    dk = dk.masked_fill(padded, 0);
    dv = dv.masked_fill(padded, 0);
  }
  return {dq, dk, dv, d_initial.contiguous()};
}


namespace {

constexpr char kGenericPath[] = "device-generic kernel";

// The family's one schema on the generic path: packed, fading or plain, routed as the CPU and Meta
// kernels route it (op_checks.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal, bool normalize, double eps,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& cu_seqlens) {
  return route_linear_attention(
      key_padding_mask, causal, log_decay, cu_seqlens,
      [&] {
        return forward_packed_generic(q, k, v, *cu_seqlens, log_decay, initial_state, feature_map, causal,
                                      normalize, eps);
      },
      [&] {
        return forward_fading_generic(q, k, v, *log_decay, initial_state, key_padding_mask, feature_map, normalize,
                                      eps);
      },
      [&] { return forward_generic(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& normalizer,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, const std::optional<at::Tensor>& final_state,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& cu_seqlens) {
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  return route_linear_attention(
      key_padding_mask, causal, log_decay, cu_seqlens,
      [&]() -> Grads {
        return backward_packed_generic(grad_out, grad_final_state, q, k, v, *cu_seqlens, log_decay, out, normalizer,
                                       initial_state, feature_map, causal, normalize);
      },
      [&]() -> Grads {
        return backward_fading_generic(grad_out, grad_final_state, q, k, v, *log_decay, out, normalizer,
                                       initial_state, key_padding_mask, feature_map, normalize);
      },
      [&]() -> Grads {
        return plain_backward<&backward_generic, kGenericPath>(
            grad_out, grad_final_state, q, k, v, out, normalizer, initial_state, key_padding_mask, feature_map,
            causal, normalize, final_state, std::nullopt, std::nullopt);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CompositeExplicitAutograd, m) {
  for (const char* name : {"linear_attn_fwd", "linear_attn_fwd_generic"}) m.impl(name, &linear_forward_generic);
  for (const char* name : {"linear_attn_bwd", "linear_attn_bwd_generic"}) m.impl(name, &linear_backward_generic);
}

TORCH_LIBRARY_IMPL(linattn, CompositeImplicitAutograd, m) {
  m.impl("linear_attn_fwd_decomposed", &plain_forward<&forward_generic, kGenericPath>);
}

}  // namespace linattn
