// Pair weights that differ channel by channel inside a chunk, for the CPU kernels (per-channel
// gates: GLA in linear attention, Kimi Delta Attention in the delta rule). Row r of a chunk has
// cumulative log factors b_r (m channels, b_r = Σ_{l<=r} a_l, each a <= 0), so a key s reaches a
// query r >= s with weight e^{b_rc − b_sc} in channel c: the weight lies inside the dot product.
//
// A chunk whose factors span at most kTameSpan in every channel (b_first − b_last) splits each
// weight through the channel's midpoint ref: x_r ⊙ e^{b_r − ref} times y_s ⊙ e^{ref − b_s}, both
// factors within e^{±kTameSpan / 2} (far from overflow, and from underflow for any operand above
// 1e-20), so the chunk's products stay GEMMs; the pairs above the diagonal, whose true weights
// grow, are never used. A chunk that fades further (a channel closing hard) takes the exact
// pair-by-pair sums, every exponent <= 0. Used by the delta rule's KDA chunks and linear
// attention's GLA chunks (linear_attention/chunk_kernel.h). Part of each instruction-set build
// (cpu_isa.h).
#pragma once

#include "cpu_gemm.h"
#include "fast_math.h"
#include "masked_product.h"

namespace linattn {
namespace LINATTN_ISA {
namespace {

template <typename acc_t>
struct ChannelPairs {
  static constexpr acc_t kTameSpan = 80;

  const int64_t C, m;  // chunk rows (the leading dim of pair matrices), channels
  // L × m each: b, e^{b_r}, e^{b_last − b_r}, the split factors, scratch for split operands.
  std::vector<acc_t> cb, eb, et, fq, fk, xt, yt, tmp;
  bool tame = false;

  ChannelPairs(int64_t chunk, int64_t channels) : C(chunk), m(channels) {
    for (auto* b : {&cb, &eb, &et, &fq, &fk, &xt, &yt, &tmp}) b->resize(chunk * channels);
  }

  // From the log factors a (L × m, contiguous): b, e^b, e^{b_last − b} and, when tame, the split.
  [[gnu::flatten]] void load(const acc_t* a, int64_t L) {
    for (int64_t c = 0; c < m; ++c) cb[c] = a[c];
    for (int64_t r = 1; r < L; ++r)
      for (int64_t c = 0; c < m; ++c) cb[r * m + c] = cb[(r - 1) * m + c] + a[r * m + c];
    const acc_t* last = cb.data() + (L - 1) * m;
    for (int64_t r = 0; r < L; ++r)
      for (int64_t c = 0; c < m; ++c) {
        eb[r * m + c] = exp_nonpositive(cb[r * m + c]);
        et[r * m + c] = exp_nonpositive(last[c] - cb[r * m + c]);
      }
    acc_t span = 0;
    for (int64_t c = 0; c < m; ++c) span = std::max(span, cb[c] - last[c]);
    tame = span <= kTameSpan;  // (NaN factors make NaN outputs either way)
    if (!tame) return;
    for (int64_t r = 0; r < L; ++r)
      for (int64_t c = 0; c < m; ++c) {
        const acc_t x = cb[r * m + c] - acc_t(0.5) * (cb[c] + last[c]);  // in [−span/2, span/2]
        const acc_t down = exp_nonpositive(std::min(x, acc_t(0))), up = exp_nonpositive(std::min(-x, acc_t(0)));
        fq[r * m + c] = x <= acc_t(0) ? down : acc_t(1) / up;
        fk[r * m + c] = x <= acc_t(0) ? acc_t(1) / down : up;
      }
  }

  const acc_t* last_row(const acc_t* f, int64_t L) const { return f + (L - 1) * m; }

  // dst = X ⊙ f element by element (L × m; X with leading dim ldx).
  const acc_t* scaled(std::vector<acc_t>& dst, const acc_t* X, int64_t ldx, const acc_t* f, int64_t L) const {
    for (int64_t r = 0; r < L; ++r)
      for (int64_t c = 0; c < m; ++c) dst[r * m + c] = f[r * m + c] * X[r * ldx + c];
    return dst.data();
  }

  acc_t weight(int64_t r, int64_t s, int64_t c) const { return exp_nonpositive(cb[r * m + c] - cb[s * m + c]); }

  // A (L × L, ld C) = Σ_c x_rc y_sc e^{b_rc − b_sc} for s <= r, 0 above.
  [[gnu::flatten]] void scores(const acc_t* X, int64_t ldx, const acc_t* Y, int64_t ldy, acc_t* A, int64_t L) {
    if (tame) {
      gemm<acc_t>(false, true, L, L, m, scaled(xt, X, ldx, fq.data(), L), m, scaled(yt, Y, ldy, fk.data(), L), m,
                  acc_t(0), A, C);
    } else {
      for (int64_t r = 0; r < L; ++r)
        for (int64_t s = 0; s <= r; ++s) {
          acc_t sum = 0;
          for (int64_t c = 0; c < m; ++c) sum += X[r * ldx + c] * Y[s * ldy + c] * weight(r, s, c);
          A[r * C + s] = sum;
        }
    }
    for (int64_t r = 0; r < L; ++r) std::fill(A + r * C + r + 1, A + r * C + L, acc_t(0));
  }

  // out (L × m, ld m) += Σ_{s <= r} D_rs y_s ⊙ e^{b_r − b_s}, for pair cotangents D (ld C) whose
  // entries above the diagonal are 0 (the split products are GEMMs): the gradient of the scores
  // towards x.
  [[gnu::flatten]] void to_queries(const acc_t* D, const acc_t* Y, int64_t ldy, acc_t* out, int64_t L) {
    if (tame) {
      std::fill(tmp.begin(), tmp.begin() + L * m, acc_t(0));
      add_causal_product(false, L, m, D, C, scaled(yt, Y, ldy, fk.data(), L), m, tmp.data(), m);
      for (int64_t i = 0; i < L * m; ++i) out[i] += tmp[i] * fq[i];
      return;
    }
    for (int64_t r = 0; r < L; ++r)
      for (int64_t s = 0; s <= r; ++s) {
        const acc_t d = D[r * C + s];
        if (d == acc_t(0)) continue;  // adds nothing, not 0·Inf
        for (int64_t c = 0; c < m; ++c) out[r * m + c] += d * Y[s * ldy + c] * weight(r, s, c);
      }
  }

  // out (L × m, ld m) += Σ_{r >= s} D_rs x_r ⊙ e^{b_r − b_s}: the same weights, towards y (D as above).
  [[gnu::flatten]] void to_keys(const acc_t* D, const acc_t* X, int64_t ldx, acc_t* out, int64_t L) {
    if (tame) {
      std::fill(tmp.begin(), tmp.begin() + L * m, acc_t(0));
      add_causal_product(true, L, m, D, C, scaled(xt, X, ldx, fq.data(), L), m, tmp.data(), m);
      for (int64_t i = 0; i < L * m; ++i) out[i] += tmp[i] * fk[i];
      return;
    }
    for (int64_t s = 0; s < L; ++s)
      for (int64_t r = s; r < L; ++r) {
        const acc_t d = D[r * C + s];
        if (d == acc_t(0)) continue;
        for (int64_t c = 0; c < m; ++c) out[s * m + c] += d * X[r * ldx + c] * weight(r, s, c);
      }
  }
};

}  // namespace
}  // namespace LINATTN_ISA
}  // namespace linattn
