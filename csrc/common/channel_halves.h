// Pair weights that differ channel by channel inside a chunk (per-channel gates: GLA in linear
// attention, Kimi Delta Attention in the delta rule), in ATen operations for every chunk at once:
// the device-generic paths of both families use it (linear_attention/fading_generic.cpp,
// delta_rule/generic.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace linattn {

// Per-channel factors inside a chunk (GLA-style gates): key s reaches query r with weight e^{b_r − b_s}
// in each feature channel, so a pair's score is no longer a product of two numbers. The chunk is cut in
// halves, recursively: the queries of a second half meet the keys of its first half through the factors
// at the first half's last row, ref, as (x_r ⊙ e^{b_r − ref}) · (y_s ⊙ e^{ref − b_s}), both exponents
// <= 0; the remaining pairs lie in the halves, down to the diagonal (weight 1). log2(C) levels of
// batched products cover every pair s <= r once, and nothing overflows whatever the gates.
struct ChannelHalves {
  struct Level {
    int64_t h = 0;                    // half length: the level's blocks are 2h rows
    at::Tensor query_fade, key_fade;  // (B, H, n, C / 2h, h, m): e^{b_r − ref}, e^{ref − b_s}
  };
  std::vector<Level> levels;
  int64_t C = 0;

  ChannelHalves() = default;
  // b (B, H, n, C, m): the cumulative factors inside each chunk, C a power of two.
  explicit ChannelHalves(const at::Tensor& b) : C(b.size(3)) {
    for (int64_t h = 1; h < C; h *= 2) {
      const at::Tensor halves = split(b, h);
      const at::Tensor lo = halves.select(4, 0), hi = halves.select(4, 1);
      const at::Tensor ref = lo.narrow(-2, h - 1, 1);
      levels.push_back({h, (hi - ref).exp(), (ref - lo).exp()});
    }
  }

  // Rows (B, H, n, C, w) as (B, H, n, C / 2h, 2, h, w): each block's two halves.
  static at::Tensor split(const at::Tensor& x, int64_t h) {
    return x.reshape({x.size(0), x.size(1), x.size(2), x.size(3) / (2 * h), 2, h, x.size(4)});
  }
  // The (first half's keys, second half's queries) block of each 2h block of pairs D (B, H, n, C, C).
  static at::Tensor lower_block(const at::Tensor& D, int64_t h) {
    const int64_t blocks = D.size(3) / (2 * h);
    return D.reshape({D.size(0), D.size(1), D.size(2), blocks, 2 * h, blocks, 2 * h})
        .diagonal(0, 3, 5)
        .movedim(-1, 3)
        .narrow(-2, h, h)
        .narrow(-1, 0, h);
  }
  // Half blocks (B, H, n, C / 2h, h, w) placed in the second (or first) halves of rows (B, H, n, C, w).
  static at::Tensor as_rows(const at::Tensor& half, bool second) {
    const at::Tensor padded = at::constant_pad_nd(half.unsqueeze(4), {0, 0, 0, 0, second ? 1 : 0, second ? 0 : 1});
    // (Sizes spelled out: an empty batch leaves a -1 ambiguous.)
    const int64_t rows = 2 * half.size(3) * half.size(4);
    return padded.reshape({half.size(0), half.size(1), half.size(2), rows, half.size(-1)});
  }

  // P_rs = Σ_c x_rc y_sc e^{b_rc − b_sc} for s <= r, else 0: (B, H, n, C, C).
  at::Tensor scores(const at::Tensor& x, const at::Tensor& y) const {
    at::Tensor P = (x * y).sum(-1).unsqueeze(-1).unsqueeze(-1);  // (B, H, n, C, 1, 1): the diagonal
    for (const Level& l : levels) {
      const at::Tensor blocks = P.reshape({P.size(0), P.size(1), P.size(2), C / (2 * l.h), 2, l.h, l.h});
      const at::Tensor first = blocks.select(4, 0), second = blocks.select(4, 1);
      const at::Tensor across = at::matmul(split(x, l.h).select(4, 1) * l.query_fade,
                                           (split(y, l.h).select(4, 0) * l.key_fade).transpose(-1, -2));
      P = at::cat({at::cat({first, at::zeros_like(first)}, -1), at::cat({across, second}, -1)}, -2);
    }
    return P.reshape({P.size(0), P.size(1), P.size(2), C, C});
  }
  // Σ_{s <= r} D_rs y_s ⊙ e^{b_r − b_s}: (B, H, n, C, m) for pair weights D (B, H, n, C, C).
  at::Tensor to_queries(const at::Tensor& D, const at::Tensor& y) const {
    at::Tensor out = D.diagonal(0, -2, -1).unsqueeze(-1) * y;
    for (const Level& l : levels)
      out = out + as_rows(at::matmul(lower_block(D, l.h), split(y, l.h).select(4, 0) * l.key_fade) * l.query_fade,
                          true);
    return out;
  }
  // Σ_{r >= s} D_rs x_r ⊙ e^{b_r − b_s}: (B, H, n, C, m).
  at::Tensor to_keys(const at::Tensor& D, const at::Tensor& x) const {
    at::Tensor out = D.diagonal(0, -2, -1).unsqueeze(-1) * x;
    for (const Level& l : levels)
      out = out + as_rows(at::matmul(lower_block(D, l.h).transpose(-1, -2),
                                     split(x, l.h).select(4, 1) * l.query_fade) * l.key_fade,
                          false);
    return out;
  }
};

}  // namespace linattn
