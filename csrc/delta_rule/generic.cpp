// The device-generic delta rule (docs/methods.md §11): the chunkwise algorithm of the CPU kernel
// (cpu_kernel_impl.h says it step by step) in ATen operations, so every device runs it. All that
// does not depend on the state is computed for every chunk at once — Γ, A, the UT transform by a
// batched unit-triangular solve, the intra-chunk scores — and only the state's walk over the
// chunks is a loop (T / 64 steps of a few batched products). The backward recomputes those
// quantities, walks the chunks in reverse for the state's gradient, then assembles every other
// gradient for all chunks at once. Registered as CompositeExplicitAutograd for delta_rule_fwd/bwd
// (every device without a kernel of its own) and their *_generic twins (what the tests run on
// CPU tensors). Packed batches loop over their sequences: cu_seqlens is read on the host.
#include "generic.h"
#include "op_checks.h"
#include "../common/causal_product.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace linattn {
namespace delta_generic {

constexpr int64_t kChunk = 64;

at::Tensor to_chunks(const at::Tensor& x, int64_t chunk, int64_t count, int64_t pad) {
  at::Tensor padded = x.dim() == 4 ? at::constant_pad_nd(x, {0, 0, 0, pad}) : at::constant_pad_nd(x, {0, pad});
  std::vector<int64_t> shape{x.size(0), x.size(1), count, chunk};
  if (x.dim() == 4) shape.push_back(x.size(3));
  return padded.reshape(shape);
}

at::Tensor from_chunks(const at::Tensor& x, int64_t length) {
  return x.flatten(2, 3).slice(2, 0, length);
}

// Per-channel gates: the chunk a power of two (ChannelHalves halves it down to single rows).
int64_t chunk_length(int64_t T, bool per_channel) {
  if (!per_channel || T >= kChunk) return std::min<int64_t>(kChunk, T);
  int64_t C = 1;
  while (C < T) C *= 2;
  return C;
}

Chunks prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
               const Optional& log_gate, bool causal) {
  const auto acc = accumulate_type(q.scalar_type());
  Chunks c;
  c.per_channel = log_gate.has_value() && log_gate->dim() == 4;
  c.length = q.size(2);
  c.chunk = chunk_length(c.length, c.per_channel);
  c.count = (c.length + c.chunk - 1) / c.chunk;
  const int64_t pad = c.count * c.chunk - c.length;
  c.q = to_chunks(q.to(acc), c.chunk, c.count, pad);
  c.k = to_chunks(k.to(acc), c.chunk, c.count, pad);
  c.v = to_chunks(v.to(acc), c.chunk, c.count, pad);
  c.beta = to_chunks(beta.to(acc), c.chunk, c.count, pad);
  const at::Tensor g = log_gate.has_value() ? to_chunks(log_gate->to(acc), c.chunk, c.count, pad)
                                            : at::zeros_like(c.beta);
  const int64_t row_dim = c.per_channel ? -2 : -1;
  c.G = g.cumsum(row_dim);
  c.eG = c.G.exp();
  const at::Tensor idx = at::arange(c.chunk, q.options().dtype(at::kLong));
  c.lower = idx.unsqueeze(1) >= idx.unsqueeze(0);
  c.strict = idx.unsqueeze(1) > idx.unsqueeze(0);
  const at::Tensor zero = at::zeros({}, c.G.options());
  if (c.per_channel) {  // pair (i, j) weighs channel x by e^{G_ix − G_jx}: inside the dot products
    c.halves = ChannelHalves(c.G);
    c.Bkk = at::where(c.strict, c.halves.scores(c.k, c.k), zero);
    if (causal) c.P = c.halves.scores(c.q, c.k);
  } else {
    // Γ_ij = e^{G_i − G_j} for j ≤ i: the exponent is masked before exp, never after (it is > 0 above).
    const at::Tensor minus_inf = at::full({}, -std::numeric_limits<double>::infinity(), c.G.options());
    c.gamma = at::where(c.lower, c.G.unsqueeze(-1) - c.G.unsqueeze(-2), minus_inf).exp();
    c.Bkk = at::where(c.strict, at::matmul(c.k, c.k.transpose(-1, -2)) * c.gamma, zero);
    if (causal) c.P = at::where(c.lower, at::matmul(c.q, c.k.transpose(-1, -2)) * c.gamma, zero);
  }
  c.A = c.beta.unsqueeze(-1) * c.Bkk;
  c.M = c.A + at::eye(c.chunk, c.G.options());
  const at::Tensor rhs = at::cat({c.beta.unsqueeze(-1) * c.rows(c.eG) * c.k, c.beta.unsqueeze(-1) * c.v}, -1);
  const at::Tensor solved = at::linalg_solve_triangular(c.M, rhs, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  c.W = solved.narrow(-1, 0, k.size(3));
  c.U = solved.narrow(-1, k.size(3), v.size(3));
  const at::Tensor last = c.G.narrow(row_dim, c.chunk - 1, 1);
  c.last_fade = last.exp();  // (B, H, n, 1) or (B, H, n, 1, dk)
  c.state_fade = c.per_channel ? c.last_fade.transpose(-1, -2) : c.last_fade.unsqueeze(-1);
  c.decay = (last - c.G).exp();
  c.Kt = c.rows(c.decay) * c.k;
  return c;
}

std::pair<at::Tensor, at::Tensor> normalized(const at::Tensor& x) {
  const at::Tensor wide = x.to(accumulate_type(x.scalar_type()));
  const at::Tensor r = at::rsqrt(wide.square().sum(-1, true) + 1e-6);
  return {wide * r, r};
}

at::Tensor unnormalized_gradient(const at::Tensor& grad, const at::Tensor& xhat, const at::Tensor& r) {
  const at::Tensor g = grad.to(xhat.scalar_type());
  return r * (g - xhat * (xhat * g).sum(-1, true));
}

Gradients assemble_gradients(const Chunks& c, const Walks& walks, const at::Tensor& dO, at::Tensor grad_q,
                             bool causal, const Optional& log_gate, at::ScalarType out_type,
                             at::ScalarType beta_type, const at::Tensor& grad_initial) {
  const int64_t dk = c.k.size(-1), row_dim = c.per_channel ? -2 : -1;
  const at::Tensor &du = walks.du, &dS1 = walks.leaving, &S0 = walks.entering;
  const at::Tensor zero = at::zeros({}, c.G.options());
  // dG (the gates' shape, per chunk) collects dL/dG_i; the gates' gradient is its reverse cumsum.
  // S1 = e^{G_last} S0 + Ktᵀ u
  const at::Tensor dKt = at::matmul(walks.u, dS1.transpose(-1, -2));
  at::Tensor dK = c.rows(c.decay) * dKt;
  const at::Tensor r = c.to_gates(c.k * dK);
  at::Tensor dG = -r;
  const at::Tensor state_term = c.per_channel ? (dS1 * S0).sum(-1).unsqueeze(-2) : (dS1 * S0).sum({-1, -2}).unsqueeze(-1);
  const at::Tensor carried = r.sum(row_dim, true) + c.last_fade * state_term;
  dG = dG + at::constant_pad_nd(carried, c.per_channel ? std::vector<int64_t>{0, 0, c.chunk - 1, 0}
                                                       : std::vector<int64_t>{c.chunk - 1, 0});
  at::Tensor dQ;
  if (causal) {  // O = (e^G ⊙ Q) S0 + P u
    const at::Tensor dP = at::where(c.lower, at::matmul(dO, walks.u.transpose(-1, -2)), zero);
    dQ = c.rows(c.eG) * at::matmul(dO, S0.transpose(-1, -2));
    dG = dG + c.to_gates(dQ * c.q);
    if (c.per_channel) {  // ∂P_ij/∂G_ix = q_ix k_jx e^{G_ix − G_jx} = −∂P_ij/∂G_jx
      const at::Tensor dQp = c.halves.to_queries(dP, c.k), dKp = c.halves.to_keys(dP, c.q);
      dG = dG + c.q * dQp - c.k * dKp;
      dQ = dQ + dQp;
      dK = dK + dKp;
    } else {
      const at::Tensor E = dP * c.P;
      dG = dG + E.sum(-1) - E.sum(-2);
      const at::Tensor dZ = dP * c.gamma;
      dQ = dQ + at::matmul(dZ, c.k);
      dK = dK + at::matmul(dZ.transpose(-1, -2), c.q);
    }
  }
  // u = U − W S0, then the solves' adjoints.
  const at::Tensor dW = -at::matmul(du, S0.transpose(-1, -2));
  const at::Tensor adj = at::linalg_solve_triangular(c.M.transpose(-1, -2), at::cat({dW, du}, -1), /*upper=*/true,
                                                     /*left=*/true, /*unitriangular=*/true);
  const at::Tensor dWh = adj.narrow(-1, 0, dk), dVh = adj.narrow(-1, dk, c.v.size(-1));
  const at::Tensor dA = at::where(c.strict, -(at::matmul(dVh, c.U.transpose(-1, -2)) + at::matmul(dWh, c.W.transpose(-1, -2))), zero);
  const at::Tensor dV = c.beta.unsqueeze(-1) * dVh;
  const at::Tensor kw = c.to_gates(c.k * dWh * c.rows(c.eG));  // (e^G ⊙ k) · dŴ, per channel or summed
  at::Tensor dbeta = (c.v * dVh).sum(-1) + (c.per_channel ? kw.sum(-1) : kw) + (dA * c.Bkk).sum(-1);
  dK = dK + c.beta.unsqueeze(-1) * c.rows(c.eG) * dWh;
  dG = dG + (c.per_channel ? c.beta.unsqueeze(-1) : c.beta) * kw;
  const at::Tensor F = dA * c.beta.unsqueeze(-1);  // the gradient of Bkk (strictly lower)
  if (c.per_channel) {
    const at::Tensor to_rows = c.halves.to_queries(F, c.k), to_columns = c.halves.to_keys(F, c.k);
    dG = dG + c.k * (to_rows - to_columns);
    dK = dK + to_rows + to_columns;
  } else {
    const at::Tensor D = dA * c.A;
    dG = dG + D.sum(-1) - D.sum(-2);
    const at::Tensor Fg = F * c.gamma;
    dK = dK + at::matmul(Fg, c.k) + at::matmul(Fg.transpose(-1, -2), c.k);
  }
  at::Tensor grad_gate = at::empty({0}, c.G.options());
  if (log_gate.has_value()) {  // g_l enters every G_i with i ≥ l of its chunk
    const at::Tensor suffix = dG.flip(row_dim).cumsum(row_dim).flip(row_dim);
    grad_gate = (c.per_channel ? from_chunks(suffix, c.length)
                               : from_chunks(suffix.unsqueeze(-1), c.length).squeeze(-1))
                    .to(log_gate->scalar_type())
                    .contiguous();
  }
  if (causal) grad_q = from_chunks(dQ, c.length);
  return {grad_q.to(out_type).contiguous(), from_chunks(dK, c.length).to(out_type).contiguous(),
          from_chunks(dV, c.length).to(out_type).contiguous(),
          from_chunks(dbeta.unsqueeze(-1), c.length).squeeze(-1).to(beta_type).contiguous(), grad_gate, grad_initial};
}

}  // namespace delta_generic

namespace {

using namespace delta_generic;

at::Tensor state_or_zeros(const Optional& state, const at::Tensor& q, const at::Tensor& v) {
  if (state.has_value()) return *state;
  return at::zeros({q.size(0), q.size(1), q.size(3), v.size(3)}, q.options().dtype(accumulate_type(q.scalar_type())));
}

// The states entering every chunk (B, H, n, dk, dv), the pseudo-values u (B, H, n, C, dv), the
// causal outputs' chunks, and the final state.
struct Walk {
  at::Tensor entering, u, out, final_state;
};

Walk walk(const Chunks& c, at::Tensor S, bool causal, double scale) {
  std::vector<at::Tensor> entering, us;
  for (int64_t n = 0; n < c.count; ++n) {
    entering.push_back(S);
    const at::Tensor u = c.U.select(2, n) - at::matmul(c.W.select(2, n), S);
    us.push_back(u);
    S = c.state_fade.select(2, n) * S + at::matmul(c.Kt.select(2, n).transpose(-1, -2), u);
  }
  Walk w;
  w.entering = at::stack(entering, 2);
  w.u = at::stack(us, 2);
  w.final_state = S;
  if (causal) {
    // Every chunk's outputs at once (a few launches, not a few per chunk), from the states entering
    // them; P·u with the masked pairs left out: a later row's Inf or NaN never reaches an earlier one.
    w.out = (at::matmul(c.rows(c.eG) * c.q, w.entering) + causal_product(c.P, w.u)) * scale;
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor> forward_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& beta, const Optional& log_gate,
                                               const Optional& initial_state, bool causal, double scale) {
  at::Tensor S = state_or_zeros(initial_state, q, v);
  if (q.size(2) == 0) return {at::empty_like(v, at::MemoryFormat::Contiguous), S.clone()};
  const Chunks c = prepare(q, k, v, beta, log_gate, causal);
  const Walk w = walk(c, S, causal, scale);
  const at::Tensor out = causal ? from_chunks(w.out, c.length)
                                : at::matmul(q.to(w.final_state.scalar_type()), w.final_state) * scale;
  return {out.to(q.scalar_type()).contiguous(), w.final_state};
}

Gradients backward_one(const at::Tensor& grad_out, const Optional& grad_final_state, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const Optional& log_gate,
                       const Optional& initial_state, bool causal, double scale) {
  const auto acc = accumulate_type(q.scalar_type());
  at::Tensor dS = grad_final_state.has_value() ? grad_final_state->clone() : at::zeros_like(state_or_zeros(initial_state, q, v));
  const at::Tensor gate_grad_empty = at::empty({0}, q.options().dtype(acc));
  if (q.size(2) == 0) {
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v), at::zeros_like(beta),
            log_gate.has_value() ? at::zeros_like(*log_gate) : gate_grad_empty, dS};
  }
  const Chunks c = prepare(q, k, v, beta, log_gate, causal);
  const Walk w = walk(c, state_or_zeros(initial_state, q, v), false, scale);
  const int64_t pad = c.count * c.chunk - c.length;
  at::Tensor dO = grad_out.to(acc) * scale;  // every use of dO carries the scale
  at::Tensor grad_q;
  if (!causal) {  // out = scale · Q S_T
    grad_q = at::matmul(dO, w.final_state.transpose(-1, -2));
    dS = dS + at::matmul(q.to(acc).transpose(-1, -2), dO);
  } else {
    dO = to_chunks(dO, c.chunk, c.count, pad);
  }
  // The reverse walk: dL/du per chunk and dL/d(state after each chunk).
  std::vector<at::Tensor> dus(c.count), leaving(c.count);
  for (int64_t n = c.count - 1; n >= 0; --n) {
    leaving[n] = dS;
    at::Tensor du = at::matmul(c.Kt.select(2, n), dS);
    if (causal) du = du + at::matmul(c.P.select(2, n).transpose(-1, -2), dO.select(2, n));
    dus[n] = du;
    dS = c.state_fade.select(2, n) * dS - at::matmul(c.W.select(2, n).transpose(-1, -2), du);
    if (causal) dS = dS + at::matmul((c.rows(c.eG).select(2, n) * c.q.select(2, n)).transpose(-1, -2), dO.select(2, n));
  }
  const Walks walks{w.entering, w.u, at::stack(leaving, 2), at::stack(dus, 2)};
  return assemble_gradients(c, walks, dO, grad_q, causal, log_gate, q.scalar_type(), beta.scalar_type(), dS);
}

// Rows [begin, end) of a packed (1, H, total, ·) or (1, H, total) tensor; state n of (N, H, ·, ·).
Optional rows(const Optional& t, int64_t begin, int64_t end) {
  return t.has_value() ? Optional(t->slice(2, begin, end)) : std::nullopt;
}
Optional state_of(const Optional& t, int64_t n) { return t.has_value() ? Optional(t->slice(0, n, n + 1)) : std::nullopt; }

std::tuple<at::Tensor, at::Tensor> forward_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& beta, const Optional& log_gate,
                                                  const Optional& initial_state, const Optional& cu_seqlens,
                                                  bool causal, double scale) {
  if (!cu_seqlens.has_value()) return forward_one(q, k, v, beta, log_gate, initial_state, causal, scale);
  const std::vector<int64_t> offsets = read_packed_offsets(kDeltaRuleOp, *cu_seqlens, q.size(2));
  std::vector<at::Tensor> outs, finals;
  for (size_t n = 0; n + 1 < offsets.size(); ++n) {
    const int64_t a = offsets[n], b = offsets[n + 1];
    auto [out, final_state] = forward_one(q.slice(2, a, b), k.slice(2, a, b), v.slice(2, a, b), beta.slice(2, a, b),
                                          rows(log_gate, a, b), state_of(initial_state, n), causal, scale);
    outs.push_back(out);
    finals.push_back(final_state);
  }
  at::Tensor final_state = finals.empty() ? at::empty({0, q.size(1), q.size(3), v.size(3)}, q.options().dtype(accumulate_type(q.scalar_type())))
                                          : at::cat(finals, 0);
  return {at::cat(outs, 2), final_state};
}

Gradients backward_packed(const at::Tensor& grad_out, const Optional& grad_final_state, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const Optional& log_gate,
                          const Optional& initial_state, const Optional& cu_seqlens, bool causal, double scale) {
  if (!cu_seqlens.has_value())
    return backward_one(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state, causal, scale);
  const std::vector<int64_t> offsets = read_packed_offsets(kDeltaRuleOp, *cu_seqlens, q.size(2));
  std::vector<at::Tensor> gq, gk, gv, gb, gg, gs;
  for (size_t n = 0; n + 1 < offsets.size(); ++n) {
    const int64_t a = offsets[n], b = offsets[n + 1];
    auto [dq, dk, dv, db, dg, dS] =
        backward_one(grad_out.slice(2, a, b), state_of(grad_final_state, n), q.slice(2, a, b), k.slice(2, a, b),
                     v.slice(2, a, b), beta.slice(2, a, b), rows(log_gate, a, b), state_of(initial_state, n), causal, scale);
    gq.push_back(dq), gk.push_back(dk), gv.push_back(dv), gb.push_back(db), gg.push_back(dg), gs.push_back(dS);
  }
  if (offsets.size() == 1) {  // no sequence at all
    const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v), at::zeros_like(beta),
            log_gate.has_value() ? at::zeros_like(*log_gate) : at::empty({0}, acc),
            at::empty({0, q.size(1), q.size(3), v.size(3)}, acc)};
  }
  return {at::cat(gq, 2), at::cat(gk, 2), at::cat(gv, 2), at::cat(gb, 2),
          log_gate.has_value() ? at::cat(gg, 2) : gg.front(), at::cat(gs, 0)};
}

std::tuple<at::Tensor, at::Tensor> forward_generic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& beta, const Optional& log_gate,
                                                   const Optional& initial_state, const Optional& cu_seqlens,
                                                   bool causal, double scale, bool normalize_qk) {
  check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  if (!normalize_qk) return forward_packed(q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale);
  auto [out, final_state] = forward_packed(normalized(q).first, normalized(k).first, v, beta, log_gate, initial_state,
                                           cu_seqlens, causal, scale);
  return {out.to(q.scalar_type()), final_state};
}

Gradients backward_generic(const at::Tensor& grad_out, const Optional& grad_final_state, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const Optional& log_gate,
                           const Optional& initial_state, const Optional& cu_seqlens, bool causal, double scale,
                           bool normalize_qk) {
  const DeltaRuleSizes s = check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  check_delta_rule_grads(grad_out, grad_final_state, q, v, s);
  if (!normalize_qk) {
    return backward_packed(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale);
  }
  const auto [qhat, rq] = normalized(q);
  const auto [khat, rk] = normalized(k);
  auto [grad_q, grad_k, grad_v, grad_beta, grad_gate, grad_initial] =
      backward_packed(grad_out.to(qhat.scalar_type()), grad_final_state, qhat, khat, v.to(qhat.scalar_type()), beta,
                      log_gate, initial_state, cu_seqlens, causal, scale);
  return {unnormalized_gradient(grad_q, qhat, rq).to(q.scalar_type()).contiguous(),
          unnormalized_gradient(grad_k, khat, rk).to(q.scalar_type()).contiguous(), grad_v.to(q.scalar_type()),
          grad_beta, grad_gate, grad_initial};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CompositeExplicitAutograd, m) {
  for (const char* name : {"delta_rule_fwd", "delta_rule_fwd_generic"}) m.impl(name, &forward_generic);
  for (const char* name : {"delta_rule_bwd", "delta_rule_bwd_generic"}) m.impl(name, &backward_generic);
}

}  // namespace linattn
