// Which keys a query sees in the flash engine (docs/methods.md §5–§7; the same rule as the CPU
// engine's patterns in cpu_kernel_impl.h and Pattern.dense_mask in linattn/ops/restricted.py):
// per pair, for key tiles only partly visible, and per tile, for the window's band.
#pragma once

#include "problem.h"
#include "../kernel.h"

#include <cmath>

namespace linattn {
namespace flash {

// 64 tokens (queries or keys) of one batch entry that a block owns or visits: tokens
// [start, start + 64) of a sequence, or gathered global tokens global_index[b, start ..] (of which
// `count` exist).
// (32-bit: sequences are shorter than 2^31 tokens, and a block keeps these in registers.)
struct TokenTile {
  int32_t start = 0;
  bool gathered = false;
  int32_t count = 0;

  // Token r of the tile, or −1 past the end.
  template <typename scalar_t>
  LINATTN_HD int64_t token(const FlashProblem<scalar_t>& p, int64_t b, int64_t len, int64_t r) const {
    const int64_t t = start + r;
    if (!gathered) return t < len ? t : -1;
    return t < count ? p.global_index[b * len + t] : -1;
  }
};

// What the pattern says about the pair (query i, key j) of batch entry b, head h, both in range.
struct Pair {
  bool visible;
  bool fixed;  // a visible token's own key under shared QK: its score is kSelfScore
};

// Token t of entry (b, h) in a (B, 1 or H, len) per-token tensor.
LINATTN_HD inline int64_t token_index(int64_t b, int64_t h, int64_t heads, int64_t len, int64_t t) {
  return (b * heads + (heads == 1 ? 0 : h)) * len + t;
}

// Whether query i sees key j through the window's band (both in range; left or right < 0: that
// side unbounded).
template <typename scalar_t>
LINATTN_HD inline bool in_band(const FlashProblem<scalar_t>& p, int64_t i, int64_t j) {
  const int64_t d = i + (p.k_len - p.q_len) - j;
  return (p.left < 0 || d <= p.left) && (p.right < 0 || d >= -p.right);
}

// Whether the pattern is a window's band and nothing else (no layout, dilation, global tokens,
// segments, key padding, shared-QK positions or bias): a pair's score then needs only in_band.
template <typename scalar_t>
LINATTN_HD inline bool plain_band(const FlashProblem<scalar_t>& p) {
  return p.layout == nullptr && p.dilation == 1 && p.global_mask == nullptr && p.q_segments == nullptr &&
         p.key_padding == nullptr && p.positions == nullptr && p.bias == nullptr;
}

// With gathered global tokens (FlashProblem::global_index) each visible pair is computed once: a
// global row's pairs in its gathered row tile (`row_gathered`), a global key's in its gathered
// key tile (`key_gathered`); elsewhere they are hidden.
template <typename scalar_t>
LINATTN_HD inline Pair pair_of(const FlashProblem<scalar_t>& p, int64_t b, int64_t h, int64_t i, int64_t j,
                               bool row_gathered = false, bool key_gathered = false) {
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
    visible = in_band(p, i, j) && (p.dilation == 1 || (aligned - j) % p.dilation == 0);
    if (p.global_mask != nullptr) {
      if (row_gathered || key_gathered) visible = true;
      else visible = visible && !p.global_mask[b * p.k_len + j];
      if (!row_gathered && p.global_mask[b * p.q_len + i]) visible = false;
    }
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
// hidden (or −1, a token past the end), kSelfScore when fixed, else with the bias added. `gradient`: whether
// the pair passes a score gradient (visible and not fixed). Per pair only in partial tiles.
struct Score {
  float value;
  bool gradient;
};

template <typename scalar_t>
LINATTN_HD inline Score score_of(const WarpContext& w, const FlashProblem<scalar_t>& p, int64_t b, int64_t h,
                                 int64_t i, int64_t j, TileKind kind, float scaled, bool row_gathered = false,
                                 bool key_gathered = false) {
  if (i < 0 || j < 0) return {-INFINITY, false};  // past the end (TokenTile::token)
  if (kind == kPartial) {
    const Pair pair = pair_of(p, b, h, i, j, row_gathered, key_gathered);
    if (!pair.visible) return {-INFINITY, false};
    if (pair.fixed) return {static_cast<float>(kSelfScore), false};
  }
  if (p.bias != nullptr) {
    const int64_t head = p.bias_heads == 1 ? 0 : h;
    scaled += static_cast<float>(warp::load_global(w, p.bias + (head * p.q_len + i) * p.k_len + j));
  }
  return {scaled, true};
}

// Whether a tile's scores need no per-pair pattern: seen whole without a bias, or a plain band
// (decided once per tile; simple_score_of then gives score_of's values).
template <typename scalar_t>
LINATTN_HD inline bool simple_scores(const FlashProblem<scalar_t>& p, TileKind kind) {
  return (kind == kWhole && p.bias == nullptr) || plain_band(p);
}
template <typename scalar_t>
LINATTN_HD inline Score simple_score_of(const FlashProblem<scalar_t>& p, int64_t i, int64_t j, TileKind kind,
                                        float scaled) {
  const bool visible = i >= 0 && j >= 0 && (kind == kWhole || in_band(p, i, j));
  return visible ? Score{scaled, true} : Score{-INFINITY, false};
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

  // (b: the batch entry, for the tiles that hold global tokens.)
  LINATTN_HD TileKind kind(int64_t tile, int64_t b = 0) const {
    const int64_t j0 = tile * kKeys, j1 = j0 + kKeys;
    if (j1 > p.k_len || p.dilation != 1 || p.key_padding != nullptr || p.q_segments != nullptr) return kPartial;
    if (p.global_tiles != nullptr &&
        (p.global_tiles[b * p.k_tiles + tile] || p.global_tiles[b * p.q_tiles + i0 / kRows])) return kPartial;
    // d = aligned row − key over the tile: every pair inside [−right, left]?
    const int64_t offset = p.k_len - p.q_len;
    const int64_t d_min = i0 + offset - (j1 - 1), d_max = i1 - 1 + offset - j0;
    const bool inside = (p.left < 0 || d_max <= p.left) && (p.right < 0 || d_min >= -p.right);
    return inside ? kWhole : kPartial;
  }
};

// The tiles of the other side (keys for a query block, queries for a key block) a block visits,
// in order: `ranged` tiles — the plan's row `listed` (layouts), else tiles first, first + 1, ...
// (a band) — then `gathered` tiles of gathered global tokens (`gathered_count` of them).
struct Visits {
  const int32_t* listed = nullptr;
  const uint8_t* kinds = nullptr;  // the plan's kinds, per tile of the row
  int32_t first = 0, ranged = 0, gathered = 0, gathered_count = 0;

  LINATTN_HD int64_t count() const { return ranged + gathered; }
  LINATTN_HD TokenTile tile(int64_t n) const {
    if (n >= ranged) return {static_cast<int32_t>((n - ranged) * kKeys), true, gathered_count};
    return {static_cast<int32_t>((listed != nullptr ? listed[n] : first + n) * kKeys), false, 0};
  }
  // The plan's row for `tile` of (plan batch, plan heads, tiles, other tiles) lists.
  template <typename scalar_t>
  LINATTN_HD void use_plan(const FlashProblem<scalar_t>& p, const int32_t* tiles_list, const int32_t* counts,
                           const uint8_t* kind_list, int64_t b, int64_t h, int64_t tiles, int64_t tile,
                           int64_t other_tiles) {
    const int64_t pb = p.plan_batch == 1 ? 0 : b, ph = p.plan_heads == 1 ? 0 : h;
    const int64_t row = (pb * p.plan_heads + ph) * tiles + tile;
    listed = tiles_list + row * other_tiles;
    kinds = kind_list + row * other_tiles;
    ranged = counts[row];
  }
  LINATTN_HD void use_range(int64_t begin, int64_t last) {
    first = static_cast<int32_t>(begin);
    ranged = static_cast<int32_t>(last >= begin ? last - begin + 1 : 0);
  }
  // Then the tiles of the batch entry's `count` gathered global tokens.
  LINATTN_HD void add_gathered(int32_t count) {
    gathered_count = count;
    gathered = (count + kKeys - 1) / kKeys;
  }
};

// Whether token `token` of a regular tile (of a sequence of `len`, T_q = T_k with global tokens)
// is a global token, whose outputs or gradients its gathered tile's block writes instead.
template <typename scalar_t>
LINATTN_HD inline bool gathered_elsewhere(const FlashProblem<scalar_t>& p, int64_t b, const TokenTile& tile,
                                          int64_t token, int64_t len) {
  return !tile.gathered && p.global_index != nullptr && p.global_mask[b * len + token];
}

// The window's band of a query tile (rows [start, start + 64) up to the sequence's end).
template <typename scalar_t>
LINATTN_HD inline Band<scalar_t> band_of(const FlashProblem<scalar_t>& p, const TokenTile& rows) {
  return {p, rows.start, rows.start + kRows < p.q_len ? rows.start + kRows : p.q_len};
}

// The key tiles a block of queries visits (the forward's blocks and the backward's query
// blocks): a regular block its band (or its plan row), then the tiles of gathered global keys; a
// block of gathered global rows every key tile.
template <typename scalar_t>
LINATTN_HD inline Visits key_visits(const FlashProblem<scalar_t>& p, int64_t b, int64_t h, const TokenTile& rows,
                                    const Band<scalar_t>& band) {
  Visits visits;
  if (rows.gathered) {
    if (rows.start < rows.count) visits.use_range(0, p.k_tiles - 1);
  } else if (p.visit_tiles != nullptr) {
    visits.use_plan(p, p.visit_tiles, p.visit_counts, p.tile_kinds, b, h, p.q_tiles, rows.start / kRows, p.k_tiles);
  } else {
    visits.use_range(band.first(), band.last());
    if (p.global_index != nullptr) visits.add_gathered(p.global_count[b]);
  }
  return visits;
}

// How much of a visited key tile those rows see.
template <typename scalar_t>
LINATTN_HD inline TileKind key_tile_kind(const Visits& visits, const Band<scalar_t>& band, const TokenTile& rows,
                                         const TokenTile& keys, int64_t b) {
  if (rows.gathered || keys.gathered) return kPartial;
  if (visits.kinds != nullptr) return static_cast<TileKind>(visits.kinds[keys.start / kKeys]);
  return band.kind(keys.start / kKeys, b);
}

// A block's own tile of 64 tokens: block index `index` of a launch of `regular` blocks (batch,
// head, tile) over `tiles` tiles, then as many over gathered global tokens.
struct BlockTokens {
  int64_t bh, b, h;
  TokenTile own;

  template <typename scalar_t>
  LINATTN_HD BlockTokens(const FlashProblem<scalar_t>& p, int64_t index, int64_t tiles) {
    const int64_t regular = p.batch * p.heads * tiles;
    const bool gathered = index >= regular;
    const int64_t i = gathered ? index - regular : index;
    bh = i / tiles;
    b = bh / p.heads;
    h = bh % p.heads;
    own = {static_cast<int32_t>(i % tiles * kRows), gathered, gathered ? p.global_count[b] : 0};
  }
};

// Whether the segment ids of two tiles cannot meet (FlashProblem::q_segment_range): no pair of
// them is visible. Gathered tiles are never skipped.
template <typename scalar_t>
LINATTN_HD inline bool segments_apart(const FlashProblem<scalar_t>& p, int64_t b, int64_t h, const TokenTile& queries,
                                      const TokenTile& keys) {
  if (p.q_segment_range == nullptr || queries.gathered || keys.gathered) return false;
  const int64_t row = b * p.segment_heads + (p.segment_heads == 1 ? 0 : h);
  const int64_t* q = p.q_segment_range + (row * p.q_tiles + queries.start / kRows) * 2;
  const int64_t* k = p.k_segment_range + (row * p.k_tiles + keys.start / kKeys) * 2;
  return q[1] < k[0] || k[1] < q[0];
}

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
