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
// Per-channel factors (log_decay (B, H, T, m), GLA) weight each feature channel of a pair on its own:
// a chunk's pairs are then summed in halves (ChannelHalves), and each channel carries its own
// chunk-to-chunk matrix; everything else takes the factors element by element.
// With `segments` (per-row sequence ids) nothing crosses a sequence start: pairs, a chunk's own
// state and the carried states are masked to the rows of one sequence, so each sequence is
// computed as if alone, with no host synchronisation and no large reset factor.
//
// The backward (`decayed_scan_backward`) works on the same chunks with the same weights: the
// gradients of such a scan are scans, the ones over keys running backwards in time, which the
// transposed in-chunk and chunk-to-chunk weights give without reversing any input; and dL/dc_t =
// G_t·O_t − K_t·dK_t (+ ⟨dS_T, S_T⟩ at the last row): row t's factor scales the sums it reads as a
// query and fades the keys it wrote. Values are augmented with a ones column throughout, so the
// normalizer comes out of the same sums.
#include "generic.h"
#include "op_checks.h"
#include "../common/channel_halves.h"

#include <ATen/ATen.h>

#include <limits>
#include <vector>

namespace linattn {
namespace {

constexpr double kMinusInfinity = -std::numeric_limits<double>::infinity();

// Per-channel factors carry one (n × n) chunk-to-chunk matrix per channel: longer chunks keep it small.
int64_t chunk_length(int64_t T, bool per_channel) {
  if (per_channel) return T <= 4096 ? 64 : T <= 16384 ? 128 : 256;
  return T <= 16384 ? 64 : 128;
}

struct ScanResult {
  at::Tensor out;          // (B, H, T, dv)
  at::Tensor final_state;  // (B, H, m, dv); undefined with segments
};

// What every scan over the same rows shares, forwards or backwards in time: the rows (B, H, T) in
// chunks of C with their log factors a (<= 0) — (B, H, T) one per row, or (B, H, T, m) one per row
// and feature channel — and segments ((T,) int64 sequence ids, or undefined). All weights are
// exponentials of differences that are <= 0. Below, w is 1 for per-row factors and m per channel.
struct DecayedChunks {
  int64_t B = 0, H = 0, T = 0, C = 0, n = 0, pad = 0;
  bool per_channel = false;
  at::Tensor pair_decay;  // per row: (B, H, n, C, C), e^{b_r − b_s} for key s <= query r of one sequence, else 0
  ChannelHalves halves;   // per channel: the pairs' weights in halves
  at::Tensor to_end;      // (B, H, n, C, w): e^{b_last − b_s}, what key s is worth at its chunk's end
  at::Tensor row_fade;    // (B, H, n, C, w): e^{b_r}, what the state entering the chunk is worth at row r
  at::Tensor A;           // (B, H, n, w): the cumulative chunk totals, A_c = c at chunk c's last row
  at::Tensor A_before;    // (B, H, n, w): A_{c−1}, A_{−1} = 0
  at::Tensor carry;       // e^{A_{c−1} − A_{c'}} from chunk c' to a later chunk c, else 0: (B, H, n, n) per row,
                          // (B, H, m, n, n) per channel
  at::Tensor apart;       // with segments: (n, C, C), whether rows r and s are of different sequences

  // T > 0.
  DecayedChunks(const at::Tensor& a, const at::Tensor& segments)
      : B(a.size(0)), H(a.size(1)), T(a.size(2)), C(chunk_length(T, a.dim() == 4)), n((T + C - 1) / C),
        pad(n * C - T), per_channel(a.dim() == 4) {
    // b (B, H, n, C, w), <= 0.
    const at::Tensor rows = per_channel ? a : a.unsqueeze(-1);
    const at::Tensor b = (pad ? at::constant_pad_nd(rows, {0, 0, 0, pad}) : rows).reshape({B, H, n, C, -1}).cumsum(3);
    at::Tensor seg;
    at::Tensor hidden = at::ones({C, C}, a.options().dtype(at::kBool)).triu(1);
    if (segments.defined()) {
      // Padded rows join the last sequence (no key, no fading, outputs dropped).
      seg = at::cat({segments, segments.narrow(0, T - 1, 1).expand({pad})}).view({n, C});
      apart = seg.unsqueeze(-1) != seg.unsqueeze(-2);
      hidden = hidden.logical_or(apart);  // (n, C, C): other sequences too
    }
    if (per_channel) {
      halves = ChannelHalves(b);
    } else {
      const at::Tensor b1 = b.squeeze(-1);
      pair_decay = (b1.unsqueeze(-1) - b1.unsqueeze(-2)).masked_fill(hidden, kMinusInfinity).exp();
    }
    to_end = (b.narrow(3, C - 1, 1) - b).exp();
    if (seg.defined()) to_end = to_end * (seg == seg.narrow(1, C - 1, 1)).unsqueeze(-1);  // the last row's sequence
    A = b.select(3, C - 1).cumsum(2);
    A_before = at::constant_pad_nd(A.narrow(2, 0, n - 1), {0, 0, 1, 0});
    at::Tensor earlier = at::ones({n, n}, hidden.options()).tril(-1);
    if (seg.defined())  // chunk c' reaches chunk c only within one sequence
      earlier = earlier.logical_and(seg.narrow(1, 0, 1) == seg.select(1, C - 1).unsqueeze(0));
    // Per channel the channels lead: one (n × n) matrix each.
    const at::Tensor A_lead = per_channel ? A.movedim(-1, 2) : A.squeeze(-1);
    const at::Tensor A_before_lead = per_channel ? A_before.movedim(-1, 2) : A_before.squeeze(-1);
    carry = (A_before_lead.unsqueeze(-1) - A_lead.unsqueeze(-2)).masked_fill(earlier.logical_not(), kMinusInfinity)
                .exp();
    row_fade = b.exp();
    if (seg.defined())  // only rows of the sequence the chunk starts in take the carried state
      row_fade = row_fade * (seg == seg.narrow(1, 0, 1)).unsqueeze(-1);
  }

  // (B, H, T, w) rows as (B, H, n, C, w) chunks, zero rows past T (a view without padding:
  // constant_pad_nd would copy).
  at::Tensor chunked(const at::Tensor& x) const {
    return (pad ? at::constant_pad_nd(x, {0, 0, 0, pad}) : x).reshape({B, H, n, C, x.size(3)});
  }
  // And back.
  at::Tensor rows(const at::Tensor& x) const {
    const at::Tensor y = x.reshape({B, H, n * C, x.size(-1)});
    return pad ? y.narrow(2, 0, T) : y;
  }

  // Inside each chunk, chunked operands: the scores P_rs = x_r · y_s weighted by the factors between key s
  // and query r, for s <= r of one sequence, else 0 (B, H, n, C, C).
  at::Tensor scores(const at::Tensor& x, const at::Tensor& y) const {
    if (!per_channel) return at::matmul(x, y.transpose(-1, -2)) * pair_decay;
    const at::Tensor P = halves.scores(x, y);
    return apart.defined() ? P.masked_fill(apart, 0) : P;
  }
  // For pair cotangents D (B, H, n, C, C): what they send back to the queries through keys y, and to the
  // keys through queries x (the transposed weights), (B, H, n, C, m).
  at::Tensor to_queries(const at::Tensor& D, const at::Tensor& y) const {
    if (!per_channel) return at::matmul(D * pair_decay, y);
    return halves.to_queries(apart.defined() ? D.masked_fill(apart, 0) : D, y);
  }
  at::Tensor to_keys(const at::Tensor& D, const at::Tensor& x) const {
    if (!per_channel) return at::matmul((D * pair_decay).transpose(-1, -2), x);
    return halves.to_keys(apart.defined() ? D.masked_fill(apart, 0) : D, x);
  }

  // Σ_{c'} M_{c c'} X_{c'} for chunk-to-chunk weights M (carry or its transpose) and per-chunk states X
  // (B, H, n, m, w'): per channel, row i of the states takes channel i's weights.
  at::Tensor across_chunks(const at::Tensor& M, const at::Tensor& X) const {
    if (!per_channel)
      return at::matmul(M, X.reshape({B, H, n, X.size(3) * X.size(4)})).view(X.sizes());
    return at::matmul(M, X.transpose(2, 3)).transpose(2, 3);
  }
  // The states entering each chunk, Σ_{c' < c} carry · U_{c'} (+ e^{A_{c−1}} S0): U (B, H, n, m, w').
  at::Tensor entering(const at::Tensor& U, const at::Tensor& S0) const {
    const at::Tensor S = across_chunks(carry, U);
    return S0.defined() ? S + A_before.exp().unsqueeze(-1) * S0.unsqueeze(2) : S;
  }
  // What the later chunks read from chunk c' (the scan backwards in time): Σ_{c > c'} carry_{c c'} Y_c.
  at::Tensor leaving(const at::Tensor& Y) const { return across_chunks(carry.transpose(-1, -2), Y); }
  // e^{A_last − A_c} (B, H, n, w, 1): from chunk c's end to the last row, for states (B, H, n, m, w').
  at::Tensor to_last() const { return (A.narrow(2, n - 1, 1) - A).exp().unsqueeze(-1); }
  // e^{A_last} (B, H, w, 1), for a state (B, H, m, w').
  at::Tensor whole_fade() const { return A.select(2, n - 1).exp().unsqueeze(-1); }
  // The state after the last row: every chunk's state faded to the end (+ e^{A_last} S0).
  at::Tensor final_state(const at::Tensor& U, const at::Tensor& S0) const {
    const at::Tensor S = (to_last() * U).sum(2);
    return S0.defined() ? S + whole_fade() * S0 : S;
  }
};

// decayed_scan's terms in chunks, which its backward recomputes: the decayed pair scores P (B, H, n, C, C),
// the chunk states U (B, H, n, m, dv), the states entering each chunk, and the output O (B, H, n, C, dv).
struct ScanTerms {
  at::Tensor q_c, k_c, v_c, P, U, S_in, O;

  ScanTerms(const DecayedChunks& ch, const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
            const at::Tensor& S0)
      : q_c(ch.chunked(Q)), k_c(ch.chunked(K)), v_c(ch.chunked(V)) {
    P = ch.scores(q_c, k_c);
    U = at::matmul((k_c * ch.to_end).transpose(-1, -2), v_c);
    S_in = ch.entering(U, S0);
    // Per row the fade scales the output row, per channel the query's channels.
    O = at::matmul(P, v_c) +
        (ch.per_channel ? at::matmul(q_c * ch.row_fade, S_in) : ch.row_fade * at::matmul(q_c, S_in));
  }
};

// Q, K (B, H, T, m), V (B, H, T, dv), a (B, H, T) or (B, H, T, m) log factors (<= 0), S0 (B, H, m, dv) or
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
  const DecayedChunks ch(a, segments);
  const ScanTerms f(ch, Q, K, V, S0);
  return {ch.rows(f.O), segmented ? at::Tensor() : ch.final_state(f.U, S0)};
}

// Σ over the last dim of x·y, for rows.
at::Tensor row_dot(const at::Tensor& x, const at::Tensor& y) { return (x * y).sum(-1); }

struct ScanGrads {
  at::Tensor dQ, dK, dV, dc, dS0;  // dS0 undefined with segments
};

// The gradients of decayed_scan(Q, K, V, a, S0, segments) for the cotangent G of its output and
// dSN of its final state (undefined = 0); with segments, S0 and dSN are not used. With w_ts =
// e^{c_t − c_s} for key s <= query t of one sequence:
//   dQ_t = Σ_s w_ts (G_t·V_s) K_s + e^{c_t} G_t S0ᵀ
//   dK_s = Σ_t w_ts (G_t·V_s) Q_t + e^{c_T − c_s} V_s dSNᵀ,   dV_s = Σ_t w_ts (Q_t·K_s) G_t + e^{c_T − c_s} K_s dSN
//   dc_t = G_t·O_t − K_t·dK_t (+ ⟨dSN, S_T⟩ at the last row): row t's factor scales the sums it
//          reads as a query and fades the keys it wrote.
// All on the forward's chunks, no reversed copy: inside a chunk the pair weights W = (G Vᵀ) ⊙ decay
// serve dQ (W K) and dK (Wᵀ Q), the forward's scores P = (Q Kᵀ) ⊙ decay serve O (P V) and dV
// (Pᵀ G); across chunks the states entering each chunk (the forward's) serve O and dQ, and what the
// later chunks' queries read, Σ_{c > c'} carry_{c c'} Y_c with Y_c = (e^b ⊙ Q_c)ᵀ G_c (the same
// carry matrix, transposed), serves dK and dV.
ScanGrads decayed_scan_backward(const at::Tensor& G, const at::Tensor& dSN, const at::Tensor& Q, const at::Tensor& K,
                                const at::Tensor& V, const at::Tensor& a, const at::Tensor& S0,
                                const at::Tensor& segments) {
  const bool segmented = segments.defined();
  const int64_t T = a.size(2);
  ScanGrads g;
  if (T == 0) {
    g.dQ = at::zeros_like(Q), g.dK = at::zeros_like(K), g.dV = at::zeros_like(V), g.dc = at::zeros_like(a);
    if (!segmented) g.dS0 = dSN.defined() ? dSN.clone() : at::zeros({K.size(0), K.size(1), K.size(3), V.size(3)},
                                                                     V.options());
    return g;
  }
  const at::Tensor S0_used = segmented ? at::Tensor() : S0, dSN_used = segmented ? at::Tensor() : dSN;
  const DecayedChunks ch(a, segments);
  // The forward, recomputed in the accumulation dtype (dc reads O and S_T).
  const ScanTerms f(ch, Q, K, V, S0_used);
  const at::Tensor &q_c = f.q_c, &k_c = f.k_c, &v_c = f.v_c, &P = f.P, &U = f.U, &S_in = f.S_in;
  const at::Tensor g_c = ch.chunked(G);
  // Inside each chunk: the pairs' cotangents G Vᵀ, weighted as the scores were.
  const at::Tensor GV = at::matmul(g_c, v_c.transpose(-1, -2));
  at::Tensor dQ, dK;
  if (ch.per_channel) {
    dQ = ch.to_queries(GV, k_c) + at::matmul(g_c, S_in.transpose(-1, -2)) * ch.row_fade;
    dK = ch.to_keys(GV, q_c);
  } else {
    const at::Tensor W = GV * ch.pair_decay;  // one weighting for both
    dQ = at::matmul(W, k_c) + ch.row_fade * at::matmul(g_c, S_in.transpose(-1, -2));
    dK = at::matmul(W.transpose(-1, -2), q_c);
  }
  at::Tensor dV = at::matmul(P.transpose(-1, -2), g_c);
  // What the later chunks' queries read from chunk c' (and dSN, faded from the end to its end).
  const at::Tensor Y = at::matmul((q_c * ch.row_fade).transpose(-1, -2), g_c);  // (B, H, n, m, dv)
  at::Tensor after = ch.leaving(Y);
  if (dSN_used.defined()) after = after + ch.to_last() * dSN_used.unsqueeze(2);
  dK = dK + ch.to_end * at::matmul(v_c, after.transpose(-1, -2));
  dV = dV + at::matmul(k_c * ch.to_end, after);
  g.dQ = ch.rows(dQ);
  g.dK = ch.rows(dK);
  g.dV = ch.rows(dV);
  if (!segmented) {
    // S0 enters chunk c faded by e^{A_{c−1}} and the final state by e^{A_last}.
    g.dS0 = (ch.A_before.exp().unsqueeze(-1) * Y).sum(2);
    if (dSN_used.defined()) g.dS0 = g.dS0 + ch.whole_fade() * dSN_used;
  }
  // Per channel, channel i of row t's factor scales channel i of what it reads and fades channel i of
  // what it wrote; per row, the channels' sum.
  g.dc = ch.per_channel ? Q * g.dQ - K * g.dK : row_dot(G, ch.rows(f.O)) - row_dot(K, g.dK);
  if (!segmented && dSN_used.defined()) {
    const at::Tensor dS_S = dSN_used * ch.final_state(U, S0_used);  // (B, H, m, dv)
    g.dc = g.dc.index_add(2, at::full({1}, T - 1, a.options().dtype(at::kLong)),
                          ch.per_channel ? dS_S.sum(-1).unsqueeze(2) : dS_S.sum({-2, -1}).unsqueeze(-1));
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
  // (1, H, expanded[, m]) log factors: the packed ones, 0 on the extra rows.
  at::Tensor place_factors(const at::Tensor& a) const {
    std::vector<int64_t> sizes = a.sizes().vec();
    sizes[2] = expanded;
    return at::zeros(sizes, a.options()).index_copy(2, real, a);
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

// Q·Kᵀ within each chunk (chunked operands), pairs of different sequences 0.
at::Tensor chunk_pairs(const DecayedChunks& ch, const at::Tensor& q_c, const at::Tensor& k_c) {
  return at::matmul(q_c, k_c.transpose(-1, -2)).masked_fill_(ch.apart, 0);
}

// Σ over every key of the query's sequence, Q_t · Σ_{s in seq(t)} K_sᵀ V_s (B, H, T, dv), on the
// chunks of packed rows without fading (`ch`: zero factors, segments): the pairs of one sequence
// inside a chunk, the earlier chunks' states as the causal scan carries them (into the rows of
// the sequence a chunk starts in, from the keys of the one a chunk ends in), and the later chunks'
// states by the same carry transposed (into the rows of the sequence a chunk ends in, from the
// keys of the one a chunk starts in). No reversed copy.
// Operands in chunks (ch.chunked), and their `pairs` = chunk_pairs(ch, q_c, k_c) (a backward has one
// as the transpose of another's).
at::Tensor whole_sequence_sums(const DecayedChunks& ch, const at::Tensor& q_c, const at::Tensor& k_c,
                               const at::Tensor& v_c, const at::Tensor& pairs) {
  at::Tensor O = at::matmul(pairs, v_c);
  const at::Tensor earlier = at::matmul((k_c * ch.to_end).transpose(-1, -2), v_c);  // (B, H, n, m, dv)
  O = O + ch.row_fade * at::matmul(q_c, ch.entering(earlier, at::Tensor()));
  const at::Tensor later = at::matmul((k_c * ch.row_fade).transpose(-1, -2), v_c);
  const int64_t m = later.size(3), dv = later.size(4);
  const at::Tensor from_later =
      at::matmul(ch.carry.transpose(-1, -2), later.reshape({ch.B, ch.H, ch.n, m * dv})).view(later.sizes());
  O = O + ch.to_end * at::matmul(q_c, from_later);
  return ch.rows(O);
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
  const bool in_place = !any_tracked({q, k, v, grad_out, out});
  const BackwardFeatures phi = backward_features(q, q_acc, k_acc, map, in_place);
  const at::Tensor& Q = phi.Q;
  const at::Tensor K = mask_padded_keys(phi.K, k, key_padding_mask);
  const at::Tensor Vp = augmented_values(v, key_padding_mask, acc);
  const at::Tensor S0 = initial_state.has_value()
                            ? *initial_state
                            : at::zeros({q.size(0), q.size(1), q.size(3), v.size(3) + 1}, Q.options());
  const at::Tensor dSN = grad_final_state.value_or(at::Tensor());
  const at::Tensor G = augmented_cotangent(grad_out.to(acc), out, normalizer, normalize);
  const ScanGrads g = decayed_scan_backward(G, dSN, Q, K, Vp, log_decay, S0, at::Tensor());
  const auto dtype = q.scalar_type();
  at::Tensor dq = through_features(g.dQ, phi.dphi_q, dtype, in_place);
  at::Tensor dk = through_features(g.dK, phi.dphi_k, dtype, in_place);
  at::Tensor dv = g.dV.narrow(-1, 0, v.size(3)).to(dtype).contiguous();
  if (key_padding_mask.has_value()) {  // padded keys got φ(k) := 0 and [v | 1] := 0
    const at::Tensor padded = key_padding_mask->unsqueeze(1).unsqueeze(-1);
    dk = dk.masked_fill(padded, 0);
    dv = dv.masked_fill(padded, 0);
  }
  return {dq, dk, dv, g.dS0.contiguous(), g.dc.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_packed_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& initial_state,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  check_varlen_forward_inputs(q, k, v, cu_seqlens, log_decay, initial_state, feature_map, causal, eps);
  if (cu_seqlens.is_cpu()) read_sequence_offsets(cu_seqlens, q.size(2));  // value checks where they cost no sync
  const PackedInputs in(q, k, v, cu_seqlens, log_decay, initial_state, static_cast<FeatureMap>(feature_map));
  at::Tensor sums;
  if (causal) {
    sums = decayed_scan(in.Q, in.K, in.Vp, in.a, at::Tensor(), in.rows.ids).out;
  } else {
    const DecayedChunks ch(in.a, in.rows.ids);
    const at::Tensor q_c = ch.chunked(in.Q), k_c = ch.chunked(in.K);
    sums = whole_sequence_sums(ch, q_c, k_c, ch.chunked(in.Vp), chunk_pairs(ch, q_c, k_c));
  }
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
    const ScanGrads g = decayed_scan_backward(G, at::Tensor(), in.Q, in.K, in.Vp, in.a, at::Tensor(), rows.ids);
    dQ = g.dQ;
    dK = g.dK;
    dV = g.dV;
    if (log_decay.has_value()) {
      // A state row reads its sequence's state after the last packed row: its term belongs to
      // that row (an empty sequence has none, and no factor to differentiate).
      const at::Tensor last = (cu_seqlens.narrow(0, 1, rows.sequences).to(at::kLong) - 1).repeat_interleave(rows.m);
      const at::Tensor nonempty = (cu_seqlens.narrow(0, 1, rows.sequences) > cu_seqlens.narrow(0, 0, rows.sequences))
                                      .repeat_interleave(rows.m);
      const at::Tensor state_terms = at::where(per_channel_factors(log_decay) ? nonempty.unsqueeze(-1) : nonempty,
                                               g.dc.index_select(2, rows.state_rows), 0);
      dc = g.dc.index_select(2, rows.real).index_add(2, last.clamp_min(0), state_terms);
    }
  } else {
    // The sums over the whole sequence are symmetric in the pairs: each gradient is such a sum.
    const DecayedChunks ch(in.a, rows.ids);
    const at::Tensor g_c = ch.chunked(G), vp_c = ch.chunked(in.Vp), k_c = ch.chunked(in.K), q_c = ch.chunked(in.Q);
    const at::Tensor G_Vp = chunk_pairs(ch, g_c, vp_c);
    dQ = whole_sequence_sums(ch, g_c, vp_c, k_c, G_Vp);
    dK = whole_sequence_sums(ch, vp_c, g_c, q_c, G_Vp.transpose(-1, -2));
    dV = whole_sequence_sums(ch, k_c, q_c, g_c, chunk_pairs(ch, k_c, q_c));
  }
  dQ = dQ.index_select(2, rows.real);
  dK = dK.index_select(2, rows.real);
  const at::Tensor d_initial = rows.as_states(dV.index_select(2, rows.key_rows));
  dV = dV.index_select(2, rows.real).narrow(-1, 0, v.size(3));
  const auto dtype = q.scalar_type();
  const bool in_place = !any_tracked({q, k, v, grad_out, out});
  const bool mapped = map != kFeatureIdentity;
  return {through_features(dQ, mapped ? feature_derivative(in.q_acc, map) : at::Tensor(), dtype, in_place),
          through_features(dK, mapped ? feature_derivative(in.k_acc, map) : at::Tensor(), dtype, in_place),
          dV.to(dtype).contiguous(), d_initial.contiguous(),
          dc.defined() ? dc.contiguous() : at::empty({0}, normalizer.options())};
}

}  // namespace linattn
