// Device-generic linear attention with a fading state (log_decay: decay and gates) and over packed
// sequences (cu_seqlens), forward and backward, in ATen ops (docs/methods.md §1, "Decay and
// gates" and "Packed sequences"). generic.cpp registers them under the family's one schema for
// every device without a kernel of its own, and under the *_generic names for the tests.
//
// One primitive does the work, `decayed_scan`: with c = cumsum(a) along the sequence,
//   O_t = Q_t (e^{c_t} S0 + Σ_{s ≤ t} e^{c_t − c_s} K_s V_sᵀ),   S_T = e^{c_T} S0 + Σ_s e^{c_T − c_s} K_s V_sᵀ,
// evaluated in chunks of C rows, all at once in batched products (no host loop):
// - inside a chunk, b = the cumulative factors from its first row: key s reaches query r with
//   weight e^{b_r − b_s}, masked to −inf above the diagonal before exp (only exponents <= 0);
// - a chunk's own state U_c = Σ_s e^{b_last − b_s} K_s V_sᵀ;
// - the state entering chunk c is Σ_{c' < c} e^{A_{c−1} − A_{c'}} U_{c'} + e^{A_{c−1}} S0, with A
//   the cumulative chunk totals: one (chunks × chunks) lower-triangular product, again with only
//   exponents <= 0. Its cost, chunks²·m·dv, is why long sequences take longer chunks.
// With `segments` (per-row sequence ids) nothing crosses a sequence start: pairs, a chunk's own
// state and the carried states are masked to the rows of one sequence, so each sequence is
// computed as if alone, with no host synchronisation and no large reset factor.
//
// The backward is the same primitive four times (the gradients of such a scan are scans, the
// ones over keys running backwards in time), and dL/dc_t = G_t·O_t − K_t·dK_t (+ ⟨dS_T, S_T⟩ at
// the last row): row t's factor scales the sums it reads as a query and fades the keys it wrote.
// Values are augmented with a ones column throughout, so the normalizer comes out of the same sums.
#include "generic.h"
#include "op_checks.h"

#include <ATen/ATen.h>

#include <limits>
#include <vector>

namespace linattn {
namespace {

constexpr double kMinusInfinity = -std::numeric_limits<double>::infinity();

int64_t chunk_length(int64_t T) { return T <= 16384 ? 64 : 128; }

struct ScanResult {
  at::Tensor out;          // (B, H, T, dv)
  at::Tensor final_state;  // (B, H, m, dv); undefined with segments
};

// Q, K (B, H, T, m), V (B, H, T, dv), a (B, H, T) log factors (<= 0), S0 (B, H, m, dv) or
// undefined, segments (T,) int64 or undefined (then no S0 and no final state).
ScanResult decayed_scan(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& a,
                        const at::Tensor& S0, const at::Tensor& segments) {
  const int64_t B = K.size(0), H = K.size(1), T = K.size(2), m = K.size(3), dv = V.size(3);
  const bool segmented = segments.defined();
  if (T == 0) {
    at::Tensor S;
    if (!segmented) S = S0.defined() ? S0.clone() : at::zeros({B, H, m, dv}, V.options());
    return {at::zeros({B, H, 0, dv}, V.options()), S};
  }
  const int64_t C = chunk_length(T), n = (T + C - 1) / C, pad = n * C - T;
  // Padded rows: no key, no fading, outputs dropped; with segments they join the last sequence.
  auto chunked = [&](const at::Tensor& x) {
    return at::constant_pad_nd(x, {0, 0, 0, pad}).view({B, H, n, C, x.size(3)});
  };
  const at::Tensor q_c = chunked(Q), k_c = chunked(K), v_c = chunked(V);
  const at::Tensor b = at::constant_pad_nd(a, {0, pad}).view({B, H, n, C}).cumsum(-1);  // <= 0
  at::Tensor seg;
  at::Tensor hidden = at::ones({C, C}, a.options().dtype(at::kBool)).triu(1);
  if (segmented) {
    seg = at::cat({segments, segments.narrow(0, T - 1, 1).expand({pad})}).view({n, C});
    hidden = hidden.logical_or(seg.unsqueeze(-1) != seg.unsqueeze(-2));  // (n, C, C): other sequences too
  }
  const at::Tensor pair_decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(hidden, kMinusInfinity).exp();
  at::Tensor O = at::matmul(at::matmul(q_c, k_c.transpose(-1, -2)) * pair_decay, v_c);  // (B, H, n, C, dv)

  // Chunk states and the state entering each chunk.
  at::Tensor to_end = (b.narrow(-1, C - 1, 1) - b).exp().unsqueeze(-1);  // e^{b_last − b_s}
  if (segmented) to_end = to_end * (seg == seg.narrow(1, C - 1, 1)).unsqueeze(-1);  // the last row's sequence
  const at::Tensor U = at::matmul((k_c * to_end).transpose(-1, -2), v_c);  // (B, H, n, m, dv)
  const at::Tensor A = b.select(-1, C - 1).cumsum(-1);                     // (B, H, n), <= 0
  const at::Tensor A_before = at::constant_pad_nd(A.narrow(-1, 0, n - 1), {1, 0});  // A_{c−1}, A_{−1} = 0
  at::Tensor earlier = at::ones({n, n}, hidden.options()).tril(-1);
  if (segmented)  // chunk c' reaches chunk c only within one sequence
    earlier = earlier.logical_and(seg.narrow(1, 0, 1) == seg.select(1, C - 1).unsqueeze(0));
  const at::Tensor carry =
      (A_before.unsqueeze(-1) - A.unsqueeze(-2)).masked_fill(earlier.logical_not(), kMinusInfinity).exp();
  at::Tensor S_in = at::matmul(carry, U.reshape({B, H, n, m * dv})).view({B, H, n, m, dv});
  if (S0.defined()) S_in = S_in + A_before.exp().unsqueeze(-1).unsqueeze(-1) * S0.unsqueeze(2);
  at::Tensor row_fade = b.exp().unsqueeze(-1);  // e^{b_r}
  if (segmented)  // only rows of the sequence the chunk starts in take the carried state
    row_fade = row_fade * (seg == seg.narrow(1, 0, 1)).unsqueeze(-1);
  O = O + row_fade * at::matmul(q_c, S_in);

  at::Tensor S;
  if (!segmented) {
    // The final state: every chunk's state faded to the end, plus the initial one faded by the
    // whole sequence.
    const at::Tensor to_last = (A.narrow(-1, n - 1, 1) - A).exp();  // (B, H, n)
    S = (to_last.unsqueeze(-1).unsqueeze(-1) * U).sum(2);
    if (S0.defined()) S = S + A.select(-1, n - 1).exp().unsqueeze(-1).unsqueeze(-1) * S0;
  }
  return {O.reshape({B, H, n * C, dv}).narrow(2, 0, T), S};
}

at::Tensor flip_rows(const at::Tensor& x) { return x.flip(2); }

// The log factors of the reversed sequence: reversed row u adds a_{T−u} (u >= 1), so that
// c'_u − c'_{u'} = c_t − c_s for the original rows t = T−1−u' >= s = T−1−u.
at::Tensor reversed_factors(const at::Tensor& a) {
  const int64_t T = a.size(-1);
  if (T == 0) return a;
  return at::constant_pad_nd(a.flip(-1).narrow(-1, 0, T - 1), {1, 0});
}

// Σ over the last dim of x·y, for rows.
at::Tensor row_dot(const at::Tensor& x, const at::Tensor& y) { return (x * y).sum(-1); }

struct ScanGrads {
  at::Tensor dQ, dK, dV, dc, dS0;  // dS0 undefined with segments
};

// The gradients of decayed_scan's output (cotangent G) and final state (dSN, undefined = 0);
// O and S_T are the forward's (dc needs them). With segments, S0 and dSN are not used.
ScanGrads decayed_scan_backward(const at::Tensor& G, const at::Tensor& dSN, const at::Tensor& Q, const at::Tensor& K,
                                const at::Tensor& V, const at::Tensor& a, const at::Tensor& S0,
                                const at::Tensor& segments, const at::Tensor& O, const at::Tensor& S_T) {
  const bool segmented = segments.defined();
  const at::Tensor a_r = reversed_factors(a);
  const at::Tensor seg_r = segmented ? segments.flip(0) : at::Tensor();
  const at::Tensor dSN_or_none = segmented ? at::Tensor() : dSN;
  ScanGrads g;
  // dQ_t = Σ_{s<=t} e^{c_t−c_s} (G_t·V_s) K_s + e^{c_t} G_t S0ᵀ.
  g.dQ = decayed_scan(G, V, K, a, segmented || !S0.defined() ? at::Tensor() : S0.transpose(-1, -2), segments).out;
  // dK_s = Σ_{t>=s} e^{c_t−c_s} (G_t·V_s) Q_t + e^{c_T−c_s} dSN V_s.
  g.dK = flip_rows(decayed_scan(flip_rows(V), flip_rows(G), flip_rows(Q), a_r,
                                dSN_or_none.defined() ? dSN_or_none.transpose(-1, -2) : at::Tensor(), seg_r)
                       .out);
  // dV_s = Σ_{t>=s} e^{c_t−c_s} (Q_t·K_s) G_t + e^{c_T−c_s} dSNᵀ K_s; the reversed scan's final
  // state is e^{−c_0} dS0.
  const ScanResult values = decayed_scan(flip_rows(K), flip_rows(Q), flip_rows(G), a_r, dSN_or_none, seg_r);
  g.dV = flip_rows(values.out);
  if (!segmented) {
    const int64_t T = a.size(-1);
    g.dS0 = T == 0 ? values.final_state
                   : a.narrow(-1, 0, 1).exp().unsqueeze(-1) * values.final_state;
  }
  g.dc = row_dot(G, O) - row_dot(K, g.dK);
  if (!segmented && dSN.defined() && a.size(-1) > 0) {
    const int64_t T = a.size(-1);
    g.dc = g.dc.index_add(-1, at::full({1}, T - 1, a.options().dtype(at::kLong)),
                          (dSN * S_T).sum({-2, -1}).unsqueeze(-1));
  }
  return g;
}

// (total,) int64: the sequence of each packed position, on the device (no host synchronisation).
at::Tensor sequence_ids(const at::Tensor& cu_seqlens, int64_t total) {
  const at::Tensor positions = at::arange(total, cu_seqlens.options());
  return at::bucketize(positions, cu_seqlens.slice(0, 1), /*out_int32=*/false, /*right=*/true);
}

// The packing with 2m extra rows per sequence, so that per-sequence states need no host loop: m
// key rows before it (φ(k) = e_i, value = row i of its initial state, no fading) put the state into
// the sums as if it were keys, and m query rows after it (φ(q) = e_i, no key) read row i of its
// state at the end. Sequence n's block starts at cu_seqlens[n] + 2mn.
struct StateRows {
  at::Tensor real;        // (total,) positions of the packed rows in the expanded sequence
  at::Tensor key_rows;    // (N·m,) the initial-state rows, sequence-major
  at::Tensor state_rows;  // (N·m,) the final-state rows
  at::Tensor ids;         // (expanded,) sequence ids
  int64_t expanded = 0, sequences = 0, m = 0;

  StateRows(const at::Tensor& cu_seqlens, int64_t total, int64_t feature_dim) : m(feature_dim) {
    sequences = cu_seqlens.size(0) - 1;
    expanded = total + 2 * m * sequences;
    const auto index = cu_seqlens.options().dtype(at::kLong);
    const at::Tensor n = at::arange(sequences, index), i = at::arange(m, index);
    const at::Tensor offsets = cu_seqlens.to(at::kLong);
    key_rows = ((offsets.narrow(0, 0, sequences) + 2 * m * n).unsqueeze(1) + i).flatten();
    state_rows = ((offsets.narrow(0, 1, sequences) + 2 * m * n + m).unsqueeze(1) + i).flatten();
    const at::Tensor packed_ids = sequence_ids(cu_seqlens, total);
    real = at::arange(total, index) + 2 * m * packed_ids + m;
    const at::Tensor row_ids = n.repeat_interleave(m);
    ids = at::zeros({expanded}, index).index_copy(0, real, packed_ids).index_copy(0, key_rows, row_ids)
              .index_copy(0, state_rows, row_ids);
  }

  // (1, H, expanded, w): the packed rows (1, H, total, w) in place, the key and state rows set to
  // the given (1, H, N·m, w) tensors (undefined: 0).
  at::Tensor place(const at::Tensor& packed, const at::Tensor& at_keys, const at::Tensor& at_states) const {
    at::Tensor out = at::zeros({1, packed.size(1), expanded, packed.size(3)}, packed.options());
    out = out.index_copy(2, real, packed);
    if (at_keys.defined()) out = out.index_copy(2, key_rows, at_keys);
    if (at_states.defined()) out = out.index_copy(2, state_rows, at_states);
    return out;
  }
  // (1, H, expanded) log factors: the packed ones, 0 on the extra rows.
  at::Tensor place_factors(const at::Tensor& a) const {
    return at::zeros({1, a.size(1), expanded}, a.options()).index_copy(2, real, a);
  }
  // The identity rows e_i of every sequence, (1, H, N·m, m).
  at::Tensor one_hot(int64_t heads, const at::TensorOptions& options) const {
    return at::eye(m, options).repeat({sequences, 1}).expand({1, heads, sequences * m, m});
  }
  // Per-sequence states (N, H, m, w) <-> rows in key_rows/state_rows order (1, H, N·m, w).
  at::Tensor as_rows(const at::Tensor& states) const {
    return states.transpose(0, 1).reshape({1, states.size(1), sequences * m, states.size(3)});
  }
  at::Tensor as_states(const at::Tensor& rows) const {
    return rows.view({rows.size(1), sequences, m, rows.size(3)}).transpose(0, 1);
  }
};

// Σ over every key of the query's sequence: the causal sum, the reversed causal sum, minus the
// query's own key (counted by both).
at::Tensor whole_sequence_sums(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& ids) {
  const at::Tensor zero = at::zeros({Q.size(0), Q.size(1), Q.size(2)}, Q.options());
  const at::Tensor forward = decayed_scan(Q, K, V, zero, at::Tensor(), ids).out;
  const at::Tensor backward =
      flip_rows(decayed_scan(flip_rows(Q), flip_rows(K), flip_rows(V), zero, at::Tensor(), ids.flip(0)).out);
  return forward + backward - row_dot(Q, K).unsqueeze(-1) * V;
}

// The inputs of a packed call in the accumulation dtype, expanded with the state rows.
struct PackedInputs {
  at::Tensor q_acc, k_acc, Q, K, Vp, a;  // a: log factors on the expanded rows (zeros without)
  StateRows rows;

  PackedInputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
               const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& initial_state,
               FeatureMap map)
      : rows(cu_seqlens, q.size(2), q.size(3)) {
    const auto acc = accumulate_type(q.scalar_type());
    q_acc = q.to(acc);
    k_acc = k.to(acc);
    const int64_t heads = q.size(1);
    const at::Tensor one_hot = rows.one_hot(heads, q_acc.options());
    const std::vector<at::Tensor> phi = query_key_features(q_acc, k_acc, map, acc);
    Q = rows.place(phi[0], at::Tensor(), one_hot);
    K = rows.place(phi[1], one_hot, at::Tensor());
    Vp = rows.place(augmented_values(v, std::nullopt, acc),
                    initial_state.has_value() ? rows.as_rows(*initial_state) : at::Tensor(), at::Tensor());
    a = log_decay.has_value() ? rows.place_factors(*log_decay)
                              : at::zeros({1, heads, rows.expanded}, q_acc.options());
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_fading_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool normalize, double eps) {
  const LinearAttentionSizes sizes =
      check_forward_inputs(q, k, v, initial_state, key_padding_mask, feature_map, true, eps);
  check_log_decay(log_decay, q, sizes);
  const auto acc = accumulate_type(q.scalar_type());
  const auto map = static_cast<FeatureMap>(feature_map);
  const std::vector<at::Tensor> phi = query_key_features(q, k, map, acc);
  const at::Tensor K = mask_padded_keys(phi[1], k, key_padding_mask);
  const at::Tensor Vp = augmented_values(v, key_padding_mask, acc);
  const ScanResult r = decayed_scan(phi[0], K, Vp, log_decay, initial_state.value_or(at::Tensor()), at::Tensor());
  const bool may_vanish = !normalizer_cannot_vanish(map, initial_state.has_value(), eps, acc);
  const auto [out, normalizer] = normalized_output(r.out, v.size(3), normalize, eps, q.scalar_type(), may_vanish);
  return {out, r.final_state.contiguous(), normalizer.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_fading_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool normalize) {
  const LinearAttentionSizes sizes =
      check_backward_inputs(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state, key_padding_mask,
                            feature_map, true, std::nullopt);
  check_log_decay(log_decay, q, sizes);
  const auto acc = accumulate_type(q.scalar_type());
  const auto map = static_cast<FeatureMap>(feature_map);
  const at::Tensor q_acc = q.to(acc), k_acc = k.to(acc);
  const at::Tensor Q = features(q_acc, map);
  const at::Tensor K = key_features(k_acc, key_padding_mask, map);
  const at::Tensor Vp = augmented_values(v, key_padding_mask, acc);
  const at::Tensor S0 = initial_state.has_value()
                            ? *initial_state
                            : at::zeros({q.size(0), q.size(1), q.size(3), v.size(3) + 1}, Q.options());
  const at::Tensor dSN = grad_final_state.value_or(at::Tensor());
  const ScanResult forward = decayed_scan(Q, K, Vp, log_decay, S0, at::Tensor());
  const at::Tensor G = augmented_cotangent(grad_out.to(acc), out, normalizer, normalize);
  ScanGrads g = decayed_scan_backward(G, dSN, Q, K, Vp, log_decay, S0, at::Tensor(), forward.out,
                                      forward.final_state);
  if (map != kFeatureIdentity) {
    g.dQ = g.dQ * feature_derivative(q_acc, map);
    g.dK = g.dK * feature_derivative(k_acc, map);
  }
  at::Tensor dv = g.dV.narrow(-1, 0, v.size(3));
  if (key_padding_mask.has_value()) {  // padded keys got φ(k) := 0 and [v | 1] := 0
    const at::Tensor padded = key_padding_mask->unsqueeze(1).unsqueeze(-1);
    g.dK = g.dK.masked_fill(padded, 0);
    dv = dv.masked_fill(padded, 0);
  }
  const auto dtype = q.scalar_type();
  return {g.dQ.to(dtype).contiguous(), g.dK.to(dtype).contiguous(), dv.to(dtype).contiguous(),
          g.dS0.contiguous(), g.dc.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_packed_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& initial_state,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  check_varlen_forward_inputs(q, k, v, cu_seqlens, log_decay, initial_state, feature_map, causal, eps);
  if (cu_seqlens.is_cpu()) read_sequence_offsets(cu_seqlens, q.size(2));  // value checks where they cost no sync
  const PackedInputs in(q, k, v, cu_seqlens, log_decay, initial_state, static_cast<FeatureMap>(feature_map));
  const at::Tensor sums = causal ? decayed_scan(in.Q, in.K, in.Vp, in.a, at::Tensor(), in.rows.ids).out
                                 : whole_sequence_sums(in.Q, in.K, in.Vp, in.rows.ids);
  const at::Tensor final_state = in.rows.as_states(sums.index_select(2, in.rows.state_rows));
  const bool may_vanish = !normalizer_cannot_vanish(static_cast<FeatureMap>(feature_map), initial_state.has_value(),
                                                    eps, accumulate_type(q.scalar_type()));
  const auto [out, normalizer] =
      normalized_output(sums.index_select(2, in.rows.real), v.size(3), normalize, eps, q.scalar_type(), may_vanish);
  return {out, final_state.contiguous(), normalizer.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_packed_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& log_decay,
    const at::Tensor& out, const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    int64_t feature_map, bool causal, bool normalize) {
  check_varlen_backward_inputs(grad_out, grad_final_state, q, k, v, cu_seqlens, log_decay, out, normalizer,
                               initial_state, feature_map, causal);
  const auto map = static_cast<FeatureMap>(feature_map);
  const PackedInputs in(q, k, v, cu_seqlens, log_decay, initial_state, map);
  const StateRows& rows = in.rows;
  const at::Tensor G_packed = augmented_cotangent(grad_out.to(in.q_acc.scalar_type()), out, normalizer, normalize);
  // The final states' cotangents enter as the state rows' output cotangents.
  const at::Tensor G = rows.place(G_packed, at::Tensor(),
                                  grad_final_state.has_value() ? rows.as_rows(*grad_final_state) : at::Tensor());
  at::Tensor dQ, dK, dV, dc;
  if (causal) {
    const at::Tensor O = decayed_scan(in.Q, in.K, in.Vp, in.a, at::Tensor(), rows.ids).out;
    const ScanGrads g =
        decayed_scan_backward(G, at::Tensor(), in.Q, in.K, in.Vp, in.a, at::Tensor(), rows.ids, O, at::Tensor());
    dQ = g.dQ;
    dK = g.dK;
    dV = g.dV;
    if (log_decay.has_value()) {
      // A state row reads its sequence's state after the last packed row: its term belongs to
      // that row (an empty sequence has none, and no factor to differentiate).
      const at::Tensor last = (cu_seqlens.narrow(0, 1, rows.sequences).to(at::kLong) - 1).repeat_interleave(rows.m);
      const at::Tensor nonempty = (cu_seqlens.narrow(0, 1, rows.sequences) > cu_seqlens.narrow(0, 0, rows.sequences))
                                      .repeat_interleave(rows.m);
      const at::Tensor state_terms = at::where(nonempty, g.dc.index_select(2, rows.state_rows), 0);
      dc = g.dc.index_select(2, rows.real).index_add(2, last.clamp_min(0), state_terms);
    }
  } else {
    // The sums over the whole sequence are symmetric in the pairs: each gradient is such a sum.
    dQ = whole_sequence_sums(G, in.Vp, in.K, rows.ids);
    dK = whole_sequence_sums(in.Vp, G, in.Q, rows.ids);
    dV = whole_sequence_sums(in.K, in.Q, G, rows.ids);
  }
  dQ = dQ.index_select(2, rows.real);
  dK = dK.index_select(2, rows.real);
  const at::Tensor d_initial = rows.as_states(dV.index_select(2, rows.key_rows));
  dV = dV.index_select(2, rows.real).narrow(-1, 0, v.size(3));
  if (map != kFeatureIdentity) {
    dQ = dQ * feature_derivative(in.q_acc, map);
    dK = dK * feature_derivative(in.k_acc, map);
  }
  const auto dtype = q.scalar_type();
  return {dQ.to(dtype).contiguous(), dK.to(dtype).contiguous(), dV.to(dtype).contiguous(), d_initial.contiguous(),
          dc.defined() ? dc.contiguous() : at::empty({0}, normalizer.options())};
}

}  // namespace linattn
