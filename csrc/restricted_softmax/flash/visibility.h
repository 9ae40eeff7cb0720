// Which keys a query sees in the flash engine (docs/methods.md §5–§7; the same rule as the CPU
// engine's patterns in cpu_kernel_impl.h and Pattern.dense_mask in linattn/ops/restricted.py):
// per pair, for key tiles only partly visible, and per tile, for the window's band.
#pragma once

#include "problem.h"
#include "../kernel.h"

#include <cmath>

namespace linattn {
namespace flash {

// What the pattern says about the pair (query i, key j) of batch entry b, head h, both in range.
struct Pair {
  bool visible;
  bool fixed;  // a visible token's own key under shared QK: its score is kSelfScore
};

// Token t of entry (b, h) in a (B, 1 or H, len) per-token tensor.
LINATTN_HD inline int64_t token_index(int64_t b, int64_t h, int64_t heads, int64_t len, int64_t t) {
  return (b * heads + (heads == 1 ? 0 : h)) * len + t;
}

template <typename scalar_t>
LINATTN_HD inline Pair pair_of(const FlashProblem<scalar_t>& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t aligned = i + (p.k_len - p.q_len);
  bool visible;
  if (p.layout != nullptr) {
    const int64_t lh = p.layout_heads == 1 ? 0 : h;
    visible = p.layout[(lh * p.q_blocks + i / p.block) * p.k_blocks + j / p.block];
    if (p.causal && p.positions != nullptr) {
      visible = visible && p.positions[token_index(b, h, p.position_heads, p.k_len, j)] <=
                               p.positions[token_index(b, h, p.position_heads, p.q_len, i)];
    } else if (p.causal) {
      visible = visible && j <= aligned;
    }
  } else {
    const int64_t d = aligned - j;
    visible = (p.left < 0 || d <= p.left) && (p.right < 0 || d >= -p.right) && (p.dilation == 1 || d % p.dilation == 0);
    if (p.global_mask != nullptr) visible = visible || p.global_mask[b * p.q_len + i] || p.global_mask[b * p.k_len + j];
  }
  if (visible && p.q_segments != nullptr) {
    visible = p.q_segments[token_index(b, h, p.segment_heads, p.q_len, i)] ==
              p.k_segments[token_index(b, h, p.segment_heads, p.k_len, j)];
  }
  if (visible && p.key_padding != nullptr) visible = !p.key_padding[b * p.k_len + j];
  const bool fixed = visible && p.positions != nullptr &&
                     p.positions[token_index(b, h, p.position_heads, p.q_len, i)] ==
                         p.positions[token_index(b, h, p.position_heads, p.k_len, j)];
  return {visible, fixed};
}

// The score of the pair (i, j) as softmax sees it, from its scaled product `scaled`: −inf when
// hidden (or out of range), kSelfScore when fixed, else with the bias added. `gradient`: whether
// the pair passes a score gradient (visible and not fixed). Per pair only in partial tiles.
struct Score {
  float value;
  bool gradient;
};

template <typename scalar_t>
LINATTN_HD inline Score score_of(const WarpContext& w, const FlashProblem<scalar_t>& p, int64_t b, int64_t h,
                                 int64_t i, int64_t j, TileKind kind, float scaled) {
  if (i >= p.q_len || j >= p.k_len) return {-INFINITY, false};
  if (kind == kPartial) {
    const Pair pair = pair_of(p, b, h, i, j);
    if (!pair.visible) return {-INFINITY, false};
    if (pair.fixed) return {static_cast<float>(kSelfScore), false};
  }
  if (p.bias != nullptr) {
    const int64_t head = p.bias_heads == 1 ? 0 : h;
    scaled += static_cast<float>(warp::load_global(w, p.bias + (head * p.q_len + i) * p.k_len + j));
  }
  return {scaled, true};
}

// The window's band for the query rows [i0, i1): key tiles [first, last] (none when last < first),
// and whether key tile t is seen whole by every one of those rows (no per-pair mask needed).
template <typename scalar_t>
struct Band {
  const FlashProblem<scalar_t>& p;
  int64_t i0, i1;

  LINATTN_HD int64_t begin() const {
    if (p.left < 0) return 0;
    const int64_t b = i0 + (p.k_len - p.q_len) - p.left;
    return b < 0 ? 0 : (b > p.k_len ? p.k_len : b);
  }
  LINATTN_HD int64_t end() const {
    if (p.right < 0) return p.k_len;
    const int64_t e = i1 - 1 + (p.k_len - p.q_len) + p.right + 1;
    return e < 0 ? 0 : (e > p.k_len ? p.k_len : e);
  }
  LINATTN_HD int64_t first() const { return begin() / kKeys; }
  LINATTN_HD int64_t last() const { return end() <= begin() ? first() - 1 : (end() - 1) / kKeys; }

  LINATTN_HD TileKind kind(int64_t tile) const {
    const int64_t j0 = tile * kKeys, j1 = j0 + kKeys;
    if (j1 > p.k_len || p.dilation != 1 || p.key_padding != nullptr || p.q_segments != nullptr) return kPartial;
    // d = aligned row − key over the tile: every pair inside [−right, left]?
    const int64_t offset = p.k_len - p.q_len;
    const int64_t d_min = i0 + offset - (j1 - 1), d_max = i1 - 1 + offset - j0;
    const bool inside = (p.left < 0 || d_max <= p.left) && (p.right < 0 || d_min >= -p.right);
    return inside ? kWhole : kPartial;
  }
};

// The transposed band: query tiles [first, last] whose rows see keys [j0, j1) through the window
// (the tiles whose band holds the key tile).
template <typename scalar_t>
LINATTN_HD inline void seen_by(const FlashProblem<scalar_t>& p, int64_t j0, int64_t j1, int64_t& first, int64_t& last) {
  const int64_t offset = p.k_len - p.q_len;
  auto clamp = [&](int64_t i) { return i < 0 ? 0 : (i > p.q_len ? p.q_len : i); };
  const int64_t begin = p.right < 0 ? 0 : clamp(j0 - p.right - offset);
  const int64_t end = p.left < 0 ? p.q_len : clamp(j1 - 1 + p.left - offset + 1);
  first = begin / kRows;
  last = end <= begin ? first - 1 : (end - 1) / kRows;
}

}  // namespace flash
}  // namespace linattn
