// The chunked linear-attention kernel of one thread (docs/methods.md §1): passes over row ranges of
// one (batch, head) — forward, dq, dk/dv, partial states — that the drivers in
// cpu_kernel_impl.h and sequence_parallel.h run. Part of each instruction-set build.
#pragma once

#include "chunk_math.h"
#include "../common/channel_pairs.h"

namespace linattn {
namespace LINATTN_ISA {
namespace {

// Everything an operator call hands the kernels (the forward's or the backward's fields).
template <typename scalar_t, typename acc_t>
struct Operands {
  Strided4<const scalar_t> q, k, v, grad_out, out;
  const bool* mask = nullptr;           // key padding (B, M)
  const acc_t* initial = nullptr;       // (B, H, m, dv + 1) or null
  const acc_t* grad_final = nullptr;    // (B, H, m, dv + 1) or null
  // Non-causal backward: the forward's final state, which every query saw (B, H, m, dv + 1),
  // or null (then recomputed from initial and the keys).
  const acc_t* seen_state = nullptr;
  scalar_t* o = nullptr;                // forward output (B, H, N, dv)
  acc_t* final_state = nullptr;
  acc_t* den = nullptr;                 // normalizers (B, H, N): written forward, read backward
  scalar_t *dq = nullptr, *dk = nullptr, *dv = nullptr;
  acc_t* grad_initial = nullptr;
  const acc_t* log_decay = nullptr;     // (B, H, N[, m]) log factors of a fading state, causal, or null
  acc_t* grad_log_decay = nullptr;      // (B, H, N[, m]) dL/dc (c = cumsum of log_decay), or null
};

// The state is split while a kernel runs: S (m × dv) multiplies values in GEMMs of width dv,
// and z (m) is handled by vector passes, instead of GEMMs of the odd width dv + 1 over an
// augmented [S | z] (which cost about 20% of the GEMM rate at dv = 64). The operator's
// layout stays augmented, (m, dv + 1).
template <typename scalar_t, typename acc_t>
struct Kernel {
  // Inputs already of the accumulation type are multiplied where they lie when their columns
  // are contiguous and nothing has to be mapped or masked: no copy into scratch.
  static constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;

  const LinearAttentionShape& s;
  int64_t C;    // chunk length
  int64_t m;    // feature dim
  int64_t dv;   // value dim
  int64_t dvp;  // dv + 1: the augmented state width of the operator's layout
  int64_t w;    // log factors per row: 1, or m per channel (LinearAttentionShape::decay_width)

  // Per-thread scratch, every block contiguous with leading dim = its column count.
  std::vector<acc_t> q, k, v, g, gd, a, b, o, dk;
  std::vector<acc_t> S, z, Rs, rz;  // state [S | z] and its gradient [Rs | rz]
  std::vector<acc_t> unit;           // C ones: row sums as dot products
  // A fading state (log_decay): per chunk row r, b_r = Σ_{l<=r} log f (local cumulative),
  // e^{b_r} and e^{b_last − b_r} (all exponents <= 0): cb, eb and et per row, `pairs` (with the
  // chunk's pair weights) per channel; and decayed copies of φ(q) and φ(k).
  std::vector<acc_t> cb, eb, et, qd, kd;
  ChannelPairs<acc_t> pairs;

  Kernel(const LinearAttentionShape& shape, int64_t chunk)
      : s(shape), C(chunk), m(shape.feature_dim), dv(shape.value_dim), dvp(shape.value_dim + 1),
        w(shape.decay_width), pairs(w > 1 ? chunk : 0, w > 1 ? m : 0) {
    q.resize(C * m);
    k.resize(C * m);
    v.resize(C * dv);
    g.resize(C * dv);
    gd.resize(C);
    if (shape.causal) {  // only causal chunks have intra-chunk scores (else 2 × C² for nothing)
      a.resize(C * C);
      b.resize(C * C);
    }
    o.resize(C * std::max(m, dv));
    dk.resize(C * m);
    S.resize(m * dv);
    z.resize(m);
    Rs.resize(m * dv);
    rz.resize(m);
    unit.assign(C, acc_t(1));
    if (!per_channel())
      for (auto* x : {&cb, &eb, &et}) x->resize(C);
    qd.resize(C * m);
    kd.resize(C * m);
  }

  // ---- A fading state (docs/methods.md §1, decay and gates): inside a chunk only differences of
  // the local cumulative log factors b are exponentiated, never a positive sum. ----

  bool per_channel() const { return w > 1; }
  // Where row t's log factors (and their gradients) lie.
  int64_t factor_offset(int64_t bh, int64_t t) const { return (bh * s.q_pitch + t) * w; }

  // Loads the chunk's decays; false when the state does not fade. (flatten: the exponentials
  // inline, so that their loops vectorize.)
  [[gnu::flatten]] bool load_decay(const Operands<scalar_t, acc_t>& x, int64_t bh, int64_t t0, int64_t L) {
    if (!x.log_decay) return false;
    const acc_t* a = x.log_decay + factor_offset(bh, t0);
    if (per_channel()) {
      pairs.load(a, L);
      return true;
    }
    acc_t run = 0;
    for (int64_t r = 0; r < L; ++r) cb[r] = run += a[r];
    for (int64_t r = 0; r < L; ++r) {
      eb[r] = exp_nonpositive(cb[r]);
      et[r] = exp_nonpositive(cb[L - 1] - cb[r]);
    }
    return true;
  }

  // A (L × L, causal, ld C) ⊙= e^{b_r − b_s}: the decay between key s and query r of the chunk.
  void decay_scores(acc_t* A, int64_t L) {
    for (int64_t r = 0; r < L; ++r) {
      acc_t* row = A + r * C;
      for (int64_t c = 0; c <= r; ++c) row[c] *= exp_nonpositive(cb[r] - cb[c]);
    }
  }

  // Rows of x (ld) times w[r].
  static void scale_rows(acc_t* x, int64_t ld, const acc_t* w, int64_t L, int64_t n) {
    for (int64_t r = 0; r < L; ++r)
      for (int64_t c = 0; c < n; ++c) x[r * ld + c] *= w[r];
  }

  // A decayed copy of feature rows: dst_r = w[r]·f_r.
  Rows<acc_t> scaled_copy(std::vector<acc_t>& dst, Rows<acc_t> f, const acc_t* w, int64_t L) {
    for (int64_t r = 0; r < L; ++r)
      for (int64_t c = 0; c < m; ++c) dst[r * m + c] = w[r] * f.row(r)[c];
    return {dst.data(), m};
  }

  // ---- Per-channel factors (GLA: log_decay (B, H, N, m), docs/methods.md §1): row c of the
  // state fades by its own factor, so a pair's weight e^{b_rc − b_sc} lies inside the dot product
  // (common/channel_pairs.h: split GEMMs, or exact pair sums in a chunk that fades too far). ----

  // dst = f ⊙ w element by element (L × m).
  Rows<acc_t> scaled_elementwise(std::vector<acc_t>& dst, Rows<acc_t> f, const acc_t* w_, int64_t L) {
    for (int64_t r = 0; r < L; ++r)
      for (int64_t c = 0; c < m; ++c) dst[r * m + c] = w_[r * m + c] * f.row(r)[c];
    return {dst.data(), m};
  }
  // x (L × m, ld m) ⊙= w element by element.
  void scale_elementwise(acc_t* x, const acc_t* w_, int64_t L) {
    for (int64_t i = 0; i < L * m; ++i) x[i] *= w_[i];
  }
  // The chunk's pair products per channel (see `pairs`) on feature rows.
  void channel_scores(Rows<acc_t> xf, Rows<acc_t> yf, acc_t* A, int64_t L) {
    pairs.scores(xf.data, xf.ld, yf.data, yf.ld, A, L);
  }
  void channel_to_queries(const acc_t* D, Rows<acc_t> yf, acc_t* out, int64_t L) {
    pairs.to_queries(D, yf.data, yf.ld, out, L);
  }
  void channel_to_keys(const acc_t* D, Rows<acc_t> xf, acc_t* out, int64_t L) {
    pairs.to_keys(D, xf.data, xf.ld, out, L);
  }

  // Scales row c of [X | x] (the state or its gradient) by f[c]: per channel, across a chunk.
  void fade_rows(std::vector<acc_t>& X, std::vector<acc_t>& x, const acc_t* f) {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < dv; ++c) X[r * dv + c] *= f[r];
      x[r] *= f[r];
    }
  }

  // The state takes the chunk's keys (forward in time). Fading (load_decay ran for the chunk):
  // [S | z] = e^{b_last} [S | z] + Σ_s e^{b_last − b_s} φ(k_s) [v_s | 1]ᵀ.
  void take_keys(Rows<acc_t> kf, Rows<acc_t> vr, int64_t L, bool decayed) {
    if (!decayed) {
      accumulate_state(kf, vr, L);
      return;
    }
    if (per_channel()) {  // row c by e^{b_last,c}, key s by e^{b_last − b_s} channel by channel
      fade_rows(S, z, pairs.eb.data() + (L - 1) * m);
      accumulate_state(scaled_elementwise(kd, kf, pairs.et.data(), L), vr, L);
      return;
    }
    for (auto& e : S) e *= eb[L - 1];
    for (auto& e : z) e *= eb[L - 1];
    accumulate_state(scaled_copy(kd, kf, et.data(), L), vr, L);
  }

  // The state gradient takes the chunk's queries (backward in time). Fading:
  // [Rs | rz] = e^{b_last} [Rs | rz] + Σ_r e^{b_r} φ(q_r) [g_r | gd_r]ᵀ.
  void take_queries(Rows<acc_t> qf, int64_t L, bool decayed) {
    if (!decayed) {
      add_query_terms(qf, L);
      return;
    }
    if (per_channel()) {
      fade_rows(Rs, rz, pairs.eb.data() + (L - 1) * m);
      add_query_terms(scaled_elementwise(qd, qf, pairs.eb.data(), L), L);
      return;
    }
    for (auto& e : Rs) e *= eb[L - 1];
    for (auto& e : rz) e *= eb[L - 1];
    add_query_terms(scaled_copy(qd, qf, eb.data(), L), L);
  }

  static bool any_padded(const bool* mask, int64_t t0, int64_t L) {
    if (!mask) return false;
    for (int64_t r = 0; r < L; ++r)
      if (mask[t0 + r]) return true;
    return false;
  }

  // A view of rows t0..t0+L of x, in place if allowed (and x's rows are at least `cols`
  // apart, as a GEMM's leading dimension must be).
  static bool in_place(const Strided4<const scalar_t>& x, int64_t cols) {
    return kInPlace && x.stride[3] == 1 && x.stride[2] >= cols;
  }

  // φ(rows t0..t0+L) of q or k; rows of padded keys (mask non-null and true) become 0.
  Rows<acc_t> features(std::vector<acc_t>& dst, const Strided4<const scalar_t>& x, int64_t bi,
                       int64_t hi, int64_t t0, int64_t L, const bool* mask = nullptr) {
    const bool padded = any_padded(mask, t0, L);
    if constexpr (kInPlace) {
      if (s.feature_map == kFeatureIdentity && !padded && in_place(x, m))
        return {x.row(bi, hi, t0), x.stride[2]};
    }
    // Row by row, so that φ is applied while the row is in L1.
    for (int64_t r = 0; r < L; ++r) {
      acc_t* row = dst.data() + r * m;
      load_rows(row, m, x.row(bi, hi, t0 + r), x.stride[2], x.stride[3], 1, m);
      apply_feature_map(s.feature_map, row, 1, m, m);
    }
    if (padded)
      for (int64_t r = 0; r < L; ++r)
        if (mask[t0 + r]) std::fill(dst.data() + r * m, dst.data() + (r + 1) * m, acc_t(0));
    return {dst.data(), m};
  }

  // Value rows; a padded key's row is 0 (its value is never read, so a NaN there stays out of
  // every sum).
  Rows<acc_t> values(const Strided4<const scalar_t>& x, int64_t bi, int64_t hi, int64_t t0,
                     int64_t L, const bool* mask) {
    const bool padded = any_padded(mask, t0, L);
    if constexpr (kInPlace) {
      if (!padded && in_place(x, dv)) return {x.row(bi, hi, t0), x.stride[2]};
    }
    load_rows(v.data(), dv, x.row(bi, hi, t0), x.stride[2], x.stride[3], L, dv);
    if (padded)
      for (int64_t r = 0; r < L; ++r)
        if (mask[t0 + r]) std::fill(v.data() + r * dv, v.data() + (r + 1) * dv, acc_t(0));
    return {v.data(), dv};
  }

  // Stores the gradient with respect to raw q or k rows: dφ ⊙ φ'(x), 0 for padded keys, from
  // the features f of those rows (as `features` returned them). dphi is overwritten.
  void store_feature_grads(scalar_t* dst_bh, acc_t* dphi, Rows<acc_t> f, int64_t t0, int64_t L,
                           const bool* mask = nullptr) {
    for (int64_t r = 0; r < L; ++r) {
      scalar_t* dst = dst_bh + (t0 + r) * m;
      acc_t* src = dphi + r * m;
      if (mask && mask[t0 + r]) {
        std::fill(dst, dst + m, scalar_t(0));
        continue;
      }
      apply_feature_map_derivative(s.feature_map, src, f.row(r), m);
      for (int64_t c = 0; c < m; ++c) dst[c] = static_cast<scalar_t>(src[c]);
    }
  }

  // The gradient with respect to the numerator (g, L × dv) and to the normalizer (gd, L).
  // normalized: o = n / d  =>  dn = g / d,  dd = -(g·o) / d. A zero cotangent contributes
  // nothing (not 0·o, which is NaN for a non-finite output): a row whose cotangent is all 0,
  // or whose d is 0 (zero output), passes no gradient.
  void load_output_grads(const Strided4<const scalar_t>& grad, const Strided4<const scalar_t>& out,
                         const acc_t* den, int64_t bi, int64_t hi, int64_t t0, int64_t L) {
    load_rows(g.data(), dv, grad.row(bi, hi, t0), grad.stride[2], grad.stride[3], L, dv);
    for (int64_t r = 0; r < L; ++r) {
      acc_t* gr = g.data() + r * dv;
      gd[r] = acc_t(0);
      if (!s.normalize) continue;
      const scalar_t* orow = out.row(bi, hi, t0 + r);
      const acc_t d = den[t0 + r];
      const acc_t inv = vanished(d) ? acc_t(0) : acc_t(1) / d;
      const int64_t os = out.stride[3];
      const acc_t dot = os == 1 ? cotangent_dot(gr, orow, 1) : cotangent_dot(gr, orow, os);
      int any_cotangent = 0;
#pragma omp simd reduction(| : any_cotangent)
      for (int64_t c = 0; c < dv; ++c) any_cotangent |= gr[c] != acc_t(0);
      if (!any_cotangent) continue;  // passes no gradient, even when its output is not finite
      for (int64_t c = 0; c < dv; ++c) gr[c] *= inv;
      gd[r] = -dot * inv;
    }
  }

  // g·o over the terms with a non-zero cotangent (0·Inf would be NaN). Inlined with the
  // literal stride 1 as well, where it vectorizes.
  acc_t cotangent_dot(const acc_t* gr, const scalar_t* orow, int64_t os) const {
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < dv; ++c) {
      const acc_t term = gr[c] * static_cast<acc_t>(orow[c * os]);
      dot += gr[c] == acc_t(0) ? acc_t(0) : term;
    }
    return dot;
  }

  // From the operator's augmented (m, dv + 1) layout, or zeros.
  void unpack_state(acc_t* dst_S, acc_t* dst_z, const acc_t* src, int64_t bh) {
    if (!src) {
      std::fill(dst_S, dst_S + m * dv, acc_t(0));
      std::fill(dst_z, dst_z + m, acc_t(0));
      return;
    }
    src += bh * m * dvp;
    for (int64_t r = 0; r < m; ++r) {
      std::copy(src + r * dvp, src + r * dvp + dv, dst_S + r * dv);
      dst_z[r] = src[r * dvp + dv];
    }
  }

  void pack_state(acc_t* dst, const acc_t* src_S, const acc_t* src_z, int64_t bh) {
    dst += bh * m * dvp;
    for (int64_t r = 0; r < m; ++r) {
      std::copy(src_S + r * dv, src_S + (r + 1) * dv, dst + r * dvp);
      dst[r * dvp + dv] = src_z[r];
    }
  }

  // [S | z] += φ(K_c)ᵀ [V_c | 1]
  void accumulate_state(Rows<acc_t> kf, Rows<acc_t> vr, int64_t L) {
    gemm<acc_t>(true, false, m, dv, L, kf.data, kf.ld, vr.data, vr.ld, acc_t(1), S.data(), dv);
    add_weighted_rows(z.data(), kf, static_cast<const acc_t*>(nullptr), L, m);
  }

  // Where a chunk's numerators go: the output itself when of the accumulation type.
  acc_t* numerators(scalar_t* out_bh, int64_t t0) {
    if constexpr (kInPlace) return out_bh + t0 * dv;
    return o.data();
  }

  // Normalizes (and converts) the numerators of rows t0..t0+L: d = φ(q)·z (+ the row sums of
  // the chunk's causal scores `intra`, when given) + eps.
  void finish_output(scalar_t* out_bh, const acc_t* num, acc_t* den_bh, Rows<acc_t> qf,
                     const acc_t* intra, int64_t t0, int64_t L, const acc_t* fade = nullptr) {
    for (int64_t r = 0; r < L; ++r) {
      acc_t d = dot(qf.row(r), z.data(), m);
      if (fade) d *= fade[r];  // e^{b_r}: the state seen by row r faded through the chunk
      if (intra) d += dot(intra + r * C, unit.data(), r + 1);
      d += static_cast<acc_t>(s.eps);
      den_bh[t0 + r] = d;
      const acc_t scale = !s.normalize ? acc_t(1) : vanished(d) ? acc_t(0) : acc_t(1) / d;
      const acc_t* src = num + r * dv;
      scalar_t* dst = out_bh + (t0 + r) * dv;
      for (int64_t c = 0; c < dv; ++c) dst[c] = static_cast<scalar_t>(src[c] * scale);
    }
  }

  // Value gradients; a padded key's is 0 (its value was never read).
  void store_value_grads(scalar_t* dst_bh, const acc_t* src, int64_t t0, int64_t L,
                         const bool* mask) {
    for (int64_t r = 0; r < L; ++r) {
      scalar_t* dst = dst_bh + (t0 + r) * dv;
      if (mask && mask[t0 + r]) {
        std::fill(dst, dst + dv, scalar_t(0));
        continue;
      }
      for (int64_t c = 0; c < dv; ++c) dst[c] = static_cast<scalar_t>(src[r * dv + c]);
    }
  }

  // b (L × L) = tril(G_c V_cᵀ + gd 1ᵀ): the chunk's causal scores of the augmented
  // cotangent against the augmented values; a padded key's column is 0 (its V'_j is 0).
  void cotangent_scores(Rows<acc_t> vr, const bool* mask, int64_t t0, int64_t L) {
    gemm<acc_t>(false, true, L, L, dv, g.data(), dv, vr.data, vr.ld, 0, b.data(), C);
    for (int64_t r = 0; r < L; ++r) {
      acc_t* row = b.data() + r * C;
      if (gd[r] != acc_t(0))
        for (int64_t c = 0; c <= r; ++c) row[c] += gd[r];
    }
    keep_causal(b.data(), L, C);
    if (any_padded(mask, t0, L))
      for (int64_t r = 0; r < L; ++r)
        for (int64_t c = 0; c <= r; ++c)
          if (mask[t0 + c]) b[r * C + c] = acc_t(0);
  }

  // [Rs | rz] += Q_cᵀ [G_c | gd_c]
  void add_query_terms(Rows<acc_t> qf, int64_t L) {
    gemm<acc_t>(true, false, m, dv, L, qf.data, qf.ld, g.data(), dv, acc_t(1), Rs.data(), dv);
    add_weighted_rows(rz.data(), qf, gd.data(), L, m);
  }

  // dk (L × m) = V_c Rsᵀ + 1 rzᵀ and o (L × dv) = φ(K_c) Rs: the terms of the state's gradient.
  void key_grads(Rows<acc_t> kf, Rows<acc_t> vr, int64_t L) {
    gemm<acc_t>(false, true, L, m, dv, vr.data, vr.ld, Rs.data(), dv, 0, dk.data(), m);
    add_outer(dk.data(), m, static_cast<const acc_t*>(nullptr), rz.data(), L, m);
    gemm<acc_t>(false, false, L, dv, m, kf.data, kf.ld, Rs.data(), dv, 0, o.data(), dv);
  }

  // ---- Passes over a range of rows of one (batch, head): the sequential kernel runs each over
  // the whole sequence; the sequence-parallel driver runs them over segments. ----

  // [S | z] += Σ over keys [begin, end) of φ(k_j) [v_j | 1]ᵀ
  void add_key_states(const Operands<scalar_t, acc_t>& x, int64_t bh, int64_t begin, int64_t end) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    const bool* mask = x.mask ? x.mask + bi * s.k_len : nullptr;
    for (int64_t t0 = begin; t0 < end; t0 += C) {
      const int64_t L = std::min(C, end - t0);
      const Rows<acc_t> kf = features(k, x.k, bi, hi, t0, L, mask);
      const Rows<acc_t> vr = values(x.v, bi, hi, t0, L, mask);
      take_keys(kf, vr, L, load_decay(x, bh, t0, L));
    }
  }

  // [Rs | rz] += Σ over queries [begin, end) of φ(q_i) g'_iᵀ: the gradient of the state before
  // `begin` from those queries (a fading state: walked backward, R fading through each chunk).
  void add_query_grad_states(const Operands<scalar_t, acc_t>& x, int64_t bh, int64_t begin, int64_t end) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    if (end <= begin) return;
    const bool backward_in_time = x.log_decay != nullptr;
    const int64_t last = begin + ((end - begin - 1) / C) * C;
    for (int64_t t0 = backward_in_time ? last : begin; t0 >= begin && t0 < end;
         t0 += backward_in_time ? -C : C) {
      const int64_t L = std::min(C, end - t0);
      load_output_grads(x.grad_out, x.out, x.den + bh * s.q_pitch, bi, hi, t0, L);
      take_queries(features(q, x.q, bi, hi, t0, L), L, load_decay(x, bh, t0, L));
    }
  }

  // A fading state's gradient at the last token: <R_N, S'_N> (see backward()); [S | z] must
  // hold the final state and [Rs | rz] the final state's gradient.
  void add_final_state_term(const Operands<scalar_t, acc_t>& x, int64_t bh) {
    if (!x.grad_log_decay || s.q_len == 0 || !x.grad_final) return;
    acc_t* dc = x.grad_log_decay + factor_offset(bh, s.q_len - 1);
    if (!per_channel()) {
      dc[0] += dot(Rs.data(), S.data(), m * dv) + dot(rz.data(), z.data(), m);
      return;
    }
    for (int64_t r = 0; r < m; ++r) dc[r] += dot(Rs.data() + r * dv, S.data() + r * dv, dv) + rz[r] * z[r];
  }

  // Outputs of queries [begin, end) from the state in [S | z] (causal: the state of the keys
  // before `begin`, advanced through the range).
  void forward_rows(const Operands<scalar_t, acc_t>& x, int64_t bh, int64_t begin, int64_t end) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    const bool* mask = x.mask ? x.mask + bi * s.k_len : nullptr;
    scalar_t* out_bh = x.o + bh * s.q_pitch * dv;
    acc_t* den_bh = x.den + bh * s.q_pitch;
    for (int64_t t0 = begin; t0 < end; t0 += C) {
      const int64_t L = std::min(C, end - t0);
      const Rows<acc_t> qf = features(q, x.q, bi, hi, t0, L);
      acc_t* num = numerators(out_bh, t0);
      // O_c = Q_c S + tril(Q_c K_cᵀ) V_c, then the state takes the chunk (with a fading state:
      // row r sees S faded by e^{b_r}, key s by e^{b_r − b_s}; per channel, φ(q_r) ⊙ e^{b_r}
      // reads S).
      const bool decayed = s.causal && load_decay(x, bh, t0, L);
      const bool channels = decayed && per_channel();
      const Rows<acc_t> reader = channels ? scaled_elementwise(qd, qf, pairs.eb.data(), L) : qf;
      gemm<acc_t>(false, false, L, dv, m, reader.data, reader.ld, S.data(), dv, 0, num, dv);
      if (!s.causal) {
        finish_output(out_bh, num, den_bh, qf, nullptr, t0, L);
        continue;
      }
      if (decayed && !channels) scale_rows(num, dv, eb.data(), L, dv);
      const Rows<acc_t> kf = features(k, x.k, bi, hi, t0, L, mask);
      const Rows<acc_t> vr = values(x.v, bi, hi, t0, L, mask);
      if (channels) {
        channel_scores(qf, kf, a.data(), L);
      } else {
        gemm<acc_t>(false, true, L, L, m, qf.data, qf.ld, kf.data, kf.ld, 0, a.data(), C);
        keep_causal(a.data(), L, C);
        if (decayed) decay_scores(a.data(), L);
      }
      add_causal_product(false, L, dv, a.data(), C, vr.data, vr.ld, num, dv);
      finish_output(out_bh, num, den_bh, reader, a.data(), t0, L, decayed && !channels ? eb.data() : nullptr);
      take_keys(kf, vr, L, decayed);
    }
  }

  // dq of queries [begin, end): dq_i = S'_i g'_i = S g_i + gd_i z, with S'_i the state row i
  // sees (causal: advanced through the range, the chunk's own keys by tril(G_c V'_cᵀ) K_c).
  // add_to_r: also [Rs | rz] += Q_cᵀ G'_c (non-causal, when one thread has the whole sequence).
  void query_grads(const Operands<scalar_t, acc_t>& x, int64_t bh, int64_t begin, int64_t end,
                   bool add_to_r = false) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    const bool* mask = x.mask ? x.mask + bi * s.k_len : nullptr;
    scalar_t* dq_bh = x.dq + bh * s.q_pitch * m;
    for (int64_t t0 = begin; t0 < end; t0 += C) {
      const int64_t L = std::min(C, end - t0);
      load_output_grads(x.grad_out, x.out, x.den + bh * s.q_pitch, bi, hi, t0, L);
      gemm<acc_t>(false, true, L, m, dv, g.data(), dv, S.data(), dv, 0, o.data(), m);
      add_outer(o.data(), m, gd.data(), z.data(), L, m);
      const bool decayed = s.causal && load_decay(x, bh, t0, L);
      const bool channels = decayed && per_channel();
      if (channels) scale_elementwise(o.data(), pairs.eb.data(), L);
      else if (decayed) scale_rows(o.data(), m, eb.data(), L, m);
      if (s.causal) {
        const Rows<acc_t> kf = features(k, x.k, bi, hi, t0, L, mask);
        const Rows<acc_t> vr = values(x.v, bi, hi, t0, L, mask);
        cotangent_scores(vr, mask, t0, L);
        if (channels) {
          channel_to_queries(b.data(), kf, o.data(), L);
        } else {
          if (decayed) decay_scores(b.data(), L);
          add_causal_product(false, L, m, b.data(), C, kf.data, kf.ld, o.data(), m);
        }
        take_keys(kf, vr, L, decayed);
      }
      const Rows<acc_t> qf = features(q, x.q, bi, hi, t0, L);
      if (add_to_r) add_query_terms(qf, L);
      // dL/dc_i gets φ(q_i)·dφ(q_i) (see backward()); per channel, φ(q_i) ⊙ dφ(q_i).
      if (x.grad_log_decay)
        for (int64_t r = 0; r < L; ++r) {
          acc_t* dc = x.grad_log_decay + factor_offset(bh, t0 + r);
          if (channels)
            for (int64_t c = 0; c < m; ++c) dc[c] += qf.row(r)[c] * o[r * m + c];
          else
            dc[0] += dot(qf.row(r), o.data() + r * m, m);
        }
      store_feature_grads(dq_bh, o.data(), qf, t0, L);
    }
  }

  // dk, dv of keys [begin, end) from [Rs | rz], the gradient of the state that the range's keys
  // feed: dk_j = Rs v_j + rz, dv_j = Rsᵀ φ(k_j). Causal: R is that of the state after the range,
  // and the range is walked backward in time, R taking each chunk's queries.
  void key_grads_rows(const Operands<scalar_t, acc_t>& x, int64_t bh, int64_t begin, int64_t end) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    const bool* mask = x.mask ? x.mask + bi * s.k_len : nullptr;
    scalar_t* dk_bh = x.dk + bh * s.k_pitch * m;
    scalar_t* dv_bh = x.dv + bh * s.k_pitch * dv;
    if (end <= begin) return;
    const int64_t first = s.causal ? begin + ((end - begin - 1) / C) * C : begin;
    const int64_t step = s.causal ? -C : C;
    for (int64_t t0 = first; s.causal ? t0 >= begin : t0 < end; t0 += step) {
      const int64_t L = std::min(C, end - t0);
      const Rows<acc_t> kf = features(k, x.k, bi, hi, t0, L, mask);
      const Rows<acc_t> vr = values(x.v, bi, hi, t0, L, mask);
      // dK_c += tril(G'_c V'_cᵀ)ᵀ Q_c;  dV_c += tril(Q_c K_cᵀ)ᵀ G_c;  R += Q_cᵀ G'_c
      // (fading: key s reaches the state after the chunk by e^{b_last − b_s}, query r sees
      // the state before it by e^{b_r}, and R fades by e^{b_last} across the chunk; per channel
      // element by element).
      const bool decayed = s.causal && load_decay(x, bh, t0, L);
      const bool channels = decayed && per_channel();
      if (channels) {
        key_grads(scaled_elementwise(kd, kf, pairs.et.data(), L), vr, L);
        scale_elementwise(dk.data(), pairs.et.data(), L);
      } else {
        key_grads(kf, vr, L);
      }
      if (s.causal) {
        if (decayed && !channels) {
          scale_rows(dk.data(), m, et.data(), L, m);
          scale_rows(o.data(), dv, et.data(), L, dv);
        }
        const Rows<acc_t> qf = features(q, x.q, bi, hi, t0, L);
        load_output_grads(x.grad_out, x.out, x.den + bh * s.q_pitch, bi, hi, t0, L);
        cotangent_scores(vr, mask, t0, L);
        if (channels) {
          channel_to_keys(b.data(), qf, dk.data(), L);
          channel_scores(qf, kf, a.data(), L);
        } else {
          if (decayed) decay_scores(b.data(), L);
          add_causal_product(true, L, m, b.data(), C, qf.data, qf.ld, dk.data(), m);
          gemm<acc_t>(false, true, L, L, m, qf.data, qf.ld, kf.data, kf.ld, 0, a.data(), C);
          keep_causal(a.data(), L, C);
          if (decayed) decay_scores(a.data(), L);
        }
        add_causal_product(true, L, dv, a.data(), C, g.data(), dv, o.data(), dv);
        take_queries(qf, L, decayed);
        // dL/dc_j gets −φ(k_j)·dφ(k_j) (see backward()); per channel, −φ(k_j) ⊙ dφ(k_j).
        if (x.grad_log_decay)
          for (int64_t r = 0; r < L; ++r) {
            acc_t* dc = x.grad_log_decay + factor_offset(bh, t0 + r);
            if (channels)
              for (int64_t c = 0; c < m; ++c) dc[c] -= kf.row(r)[c] * dk[r * m + c];
            else
              dc[0] -= dot(kf.row(r), dk.data() + r * m, m);
          }
      }
      store_feature_grads(dk_bh, dk.data(), kf, t0, L, mask);
      store_value_grads(dv_bh, o.data(), t0, L, mask);
    }
  }

  // The whole sequence of one (batch, head), on one thread.
  void forward(const Operands<scalar_t, acc_t>& x, int64_t bh) {
    unpack_state(S.data(), z.data(), x.initial, bh);
    if (!s.causal) add_key_states(x, bh, 0, s.k_len);
    forward_rows(x, bh, 0, s.q_len);
    pack_state(x.final_state, S.data(), z.data(), bh);
  }

  void backward(const Operands<scalar_t, acc_t>& x, int64_t bh) {
    unpack_state(Rs.data(), rz.data(), x.grad_final, bh);
    if (x.seen_state) {
      unpack_state(S.data(), z.data(), x.seen_state, bh);
    } else {
      unpack_state(S.data(), z.data(), x.initial, bh);
      if (!s.causal) add_key_states(x, bh, 0, s.k_len);
    }
    query_grads(x, bh, 0, s.q_len, /*add_to_r=*/!s.causal);
    // A fading state: with c the cumulative log factors, dL/dc_i = φ(q_i)·dφ(q_i) −
    // φ(k_i)·dφ(k_i) (every weight e^{c_i − c_j} is differentiated at both ends), plus, at the
    // last token, <R_N, S'_N> for the final state (now in [S | z] after the forward pass).
    add_final_state_term(x, bh);
    key_grads_rows(x, bh, 0, s.k_len);
    pack_state(x.grad_initial, Rs.data(), rz.data(), bh);
  }
};

// Causal chunks balance the C² intra-chunk products against the m·dv state products; without
// causality the chunk only sets the GEMM block, so it is longer. A sequence shorter than that is
// one chunk of its own length (rounded up to 8): the per-thread scratch a call allocates and
// zeroes is then sized by the call, not by the longest chunk (the whole cost of a small call).
int64_t chunk_length(const LinearAttentionShape& s) {
  const int64_t longest = std::max<int64_t>({s.q_len, s.k_len, 1});
  return std::min<int64_t>(s.causal ? 64 : 256, (longest + 7) / 8 * 8);
}

}  // namespace
}  // namespace LINATTN_ISA
}  // namespace linattn
