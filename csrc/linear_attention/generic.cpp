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

#include <limits>
#include <vector>

namespace linattn {

bool tracked(const at::Tensor& x) { return x.defined() && at::GradMode::is_enabled() && x.requires_grad(); }

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

// For every row i: O_i = Q_i (S0 + Σ_{j≤i} K_j V_jᵀ); also returns the final state. S0 may be
// undefined (no initial state: nothing to add).
// Q, K: (B, H, T, a); V: (B, H, T, b); S0: (B, H, a, b).
// The chunk is at least min(a, b) long, so the T/C chunk states held at once take no more
// memory than T·max(a, b) per batch·head, as much as one input.
std::tuple<at::Tensor, at::Tensor> causal_scan(const at::Tensor& Q, const at::Tensor& K,
                                               const at::Tensor& V, const at::Tensor& S0) {
  const int64_t B = Q.size(0), H = Q.size(1), T = Q.size(2), a = Q.size(3), b = V.size(3);
  if (T == 0) {
    return {Q.new_zeros({B, H, 0, b}), S0.defined() ? S0.clone() : Q.new_zeros({B, H, a, b})};
  }
  const int64_t C = std::max<int64_t>(64, std::min(a, b));
  const int64_t n = (T + C - 1) / C;
  const int64_t pad = n * C - T;
  const at::Tensor Qc = in_chunks(Q, n, C), Kc = in_chunks(K, n, C), Vc = in_chunks(V, n, C);
  at::Tensor O = causal_product(at::bmm(Qc, Kc.transpose(-1, -2)).tril_(), Vc);
  const at::Tensor chunk_states = at::bmm(Kc.transpose(-1, -2), Vc).view({B, H, n, a, b});
  const auto [before, final_state] = entering_states(chunk_states, S0);
  O.baddbmm_(Qc, before.view({B * H * n, a, b}));
  O = O.view({B, H, n * C, b});
  return {pad ? O.narrow(2, 0, T) : O, final_state};
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
  // Without autograd recording (the usual backward), temporaries are reused in place and φ is
  // built from its derivative: elu+1's is exp(min(x, 0)), and φ = that + relu(x), for the queries
  // and the keys as one list (one launch for both on CUDA).
  const bool in_place = !(tracked(q) || tracked(k) || tracked(v) || tracked(grad_out) || tracked(out));
  at::Tensor Q, K, dphi_q, dphi_k;
  if (s.feature_map == kFeatureElu && in_place) {
    const std::vector<at::Tensor> inputs{q_acc, k_acc};
    const std::vector<at::Tensor> derivatives = at::_foreach_clamp_max(inputs, 0);
    at::_foreach_exp_(derivatives);
    // Widened inputs are the operator's own copies: φ takes their place.
    std::vector<at::Tensor> phi = inputs;
    if (q.scalar_type() != acc) {
      at::_foreach_clamp_min_(phi, 0);
    } else {
      phi = at::_foreach_clamp_min(inputs, 0);
    }
    at::_foreach_add_(phi, derivatives);
    dphi_q = derivatives[0], dphi_k = derivatives[1], Q = phi[0], K = phi[1];
  } else {
    if (s.feature_map != kFeatureIdentity) {
      dphi_q = feature_derivative(q_acc, s.feature_map);
      dphi_k = feature_derivative(k_acc, s.feature_map);
    }
    Q = features(q_acc, s.feature_map), K = features(k_acc, s.feature_map);
  }
  K = mask_padded_keys(K, k, key_padding_mask);  // (k: φ may be k itself, never a copy of ours)
  const at::Tensor Vp = augmented_values(v, key_padding_mask, acc);
  const at::Tensor G = grad_out.to(acc);
  // Gradient with respect to the augmented output [numerator | normalizer].
  const at::Tensor Gp = augmented_cotangent(G, out, normalizer, normalize);
  const at::Tensor S0 = state_or_none(initial_state);
  const at::Tensor dSN = state_or_none(grad_final_state);
  auto transposed = [](const at::Tensor& x) { return x.defined() ? x.transpose(-1, -2) : x; };
  at::Tensor dq, dk, dvp, d_initial;
  if (causal) {
    dq = std::get<0>(causal_scan(Gp, Vp, K, transposed(S0)));
    // The sums over later rows are causal scans of the reversed sequence; each input reversed once.
    const at::Tensor Vr = Vp.flip(2), Gr = Gp.flip(2), Qr = Q.flip(2), Kr = K.flip(2);
    dk = std::get<0>(causal_scan(Vr, Gr, Qr, transposed(dSN))).flip(2);
    std::tie(dvp, d_initial) = causal_scan(Kr, Qr, Gr, dSN);
    dvp = dvp.flip(2);
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
  auto through_features = [&](const at::Tensor& grad, const at::Tensor& derivative) {
    if (!derivative.defined()) return grad.to(dtype).contiguous();
    if (!in_place) return (grad * derivative).to(dtype).contiguous();
    at::Tensor result = at::empty(grad.sizes(), grad.options().dtype(dtype));
    return at::mul_out(result, grad, derivative);  // rounded once, into the input dtype
  };
  dq = through_features(dq, dphi_q);
  dk = through_features(dk, dphi_k);
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
