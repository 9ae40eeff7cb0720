// Block layouts in the device-generic restricted softmax (generic_layout.h).
//
// Query rows are cut into blocks of L rows: as many whole layout rows as make at least 64 rows (block
// size b ≤ 128), else 128 rows. A query block sees the key blocks its layout rows hold (under causality
// on indices, none that starts after its last row), gathered on the device: for each "pair" (layout head,
// query block), its present key blocks in order, padded to the width M of its class. The pairs are sorted
// into classes by their number of key blocks, each class taking the widest pair left and every pair with
// at least half as many, so padding at most doubles a pair's work (BigBird's global rows, which see every
// block, form a class of their own instead of widening every row). A class's pairs are cut into tiles of
// at most kTileScores scores, each one (B, H or 1, n, L, M·b) score product through the shared tile
// arithmetic (generic_tile.h). A layout with one head serves every head (the heads are a batch
// dimension of the tile); one with a row per head gives each (head, query block) pair its own list.
//
// The class widths need each pair's count on the host: one read back of ⌈T_q / L⌉ · (layout heads)
// integers per call (a synchronisation on a GPU), the one this path makes. The backward adds key and bias
// gradients with index_put_(accumulate=True), which sorts its indices on CUDA: deterministic there.
#include "generic_layout.h"

#include "generic_dropout.h"
#include "generic_forget.h"
#include "generic_tile.h"

#include <ATen/core/List.h>

#include <algorithm>
#include <initializer_list>
#include <numeric>
#include <vector>

namespace linattn::restricted_generic {
namespace {


// How a layout's rows and keys are cut into blocks.
struct LayoutGeometry {
  int64_t block;        // b, the layout's block size; keys are gathered in blocks of b
  int64_t rows;         // L, query rows per query block
  int64_t row_blocks;   // ⌈T_q / L⌉; rows past T_q are padding, invisible
  int64_t key_blocks;   // ⌈T_k / b⌉; keys past T_k are padding, invisible
  bool one_layout_row;  // every query block lies within one layout row (else its pairs look their rows up)
  bool per_head;        // the layout has a row per head (else one row serves every head)
};

LayoutGeometry layout_geometry(const WindowAttentionShape& s, const RestrictedPattern& p) {
  LayoutGeometry g;
  g.block = p.block_size;
  const int64_t layout_rows = p.layout->size(1);
  g.rows = g.block <= 128 ? std::min(g.block * ((64 + g.block - 1) / g.block), layout_rows * g.block) : 128;
  g.row_blocks = (s.q_len + g.rows - 1) / g.rows;
  g.key_blocks = p.layout->size(2);
  g.one_layout_row = g.block % g.rows == 0;
  g.per_head = p.layout->size(0) > 1;
  return g;
}

// (layout heads, row_blocks, key_blocks) bool: the key blocks a query block's layout rows hold; under
// causality on indices, none that starts after the block's last aligned position.
at::Tensor block_key_blocks(const LayoutGeometry& g, const WindowAttentionShape& s, const RestrictedPattern& p) {
  const at::Tensor& layout = *p.layout;
  const auto index = layout.options().dtype(at::kLong);
  const at::Tensor last_row = at::arange(1, g.row_blocks + 1, index).mul_(g.rows).clamp_max_(s.q_len).sub_(1);
  at::Tensor present;
  if (g.rows % g.block == 0) {  // whole layout rows: the union of each block's rows
    const int64_t per_block = g.rows / g.block;
    present = at::zeros({layout.size(0), g.row_blocks * per_block, g.key_blocks}, layout.options());
    present.narrow(1, 0, layout.size(1)).copy_(layout);
    present = present.view({layout.size(0), g.row_blocks, per_block, g.key_blocks}).any(2);
  } else {  // a block of 128 rows within one or two layout rows of b > 128
    const at::Tensor first_row = at::arange(g.row_blocks, index).mul_(g.rows);
    present = layout.index_select(1, first_row.div(g.block, "floor"))
                  .logical_or(layout.index_select(1, last_row.div(g.block, "floor")));
  }
  if (p.causal && !p.positions.has_value()) {
    const at::Tensor first_key = at::arange(g.key_blocks, index).mul_(g.block);
    present = present.logical_and(first_key.unsqueeze(0).le(last_row.unsqueeze(1) + (s.k_len - s.q_len)));
  }
  return present;
}

// Pairs (layout head, query block) padded to one width: their number of key blocks is in [width / 2, width].
struct PairClass {
  int64_t first, pairs, width;  // pairs [first, first + pairs) of the call's list
};

// The pairs that see a key block, class by class (widest first; within a class in sequence order, as
// neighbouring blocks share keys), and each pair's count; a pair without a key block is in none (its
// rows stay 0 with lse −inf). counts: (layout heads, row_blocks) int64 on the host.
struct PairList {
  std::vector<int64_t> heads, blocks, counts;
  std::vector<PairClass> classes;
};

PairList pair_list(const at::Tensor& counts) {
  const int64_t row_blocks = counts.size(1);
  const int64_t* count = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> order(counts.numel());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [count](int64_t a, int64_t b) { return count[a] > count[b]; });
  PairList list;
  for (size_t i = 0; i < order.size() && count[order[i]] > 0;) {
    const int64_t width = count[order[i]];
    size_t end = i;
    while (end < order.size() && count[order[end]] > 0 && 2 * count[order[end]] >= width) ++end;
    std::sort(order.begin() + i, order.begin() + end);
    list.classes.push_back({static_cast<int64_t>(i), static_cast<int64_t>(end - i), width});
    for (; i < end; ++i) {
      list.heads.push_back(order[i] / row_blocks);
      list.blocks.push_back(order[i] % row_blocks);
      list.counts.push_back(count[order[i]]);
    }
  }
  return list;
}

// n pairs of one class and the keys they see, as indices on the device.
struct LayoutTile {
  at::Tensor heads, blocks;  // (n): each pair's layout head and query block
  at::Tensor key_blocks;     // (n, M): the key blocks it sees, its list padded with block 0
  at::Tensor rows, keys;     // (n, L) query rows and (n, M·b) keys; past T: padding
  at::Tensor key_listed;     // (n, M, 1): the key block is in the pair's list (not the list's padding)
};

// The call's tiles. Every pair's key-block list is built on the device at once, from `present`, padded
// to the widest class; each class takes its pairs' lists cut to its width, in tiles of at most
// kTileScores scores.
std::vector<LayoutTile> layout_tiles(const at::Tensor& present, const LayoutGeometry& g,
                                     const WindowAttentionShape& s) {
  const PairList list = pair_list(present.sum(2).cpu());  // the one read back to the host
  if (list.classes.empty()) return {};
  const auto index = present.options().dtype(at::kLong);
  const int64_t pairs = static_cast<int64_t>(list.heads.size()), widest = list.classes.front().width;
  std::vector<int64_t> host = list.heads;
  host.insert(host.end(), list.blocks.begin(), list.blocks.end());
  host.insert(host.end(), list.counts.begin(), list.counts.end());
  const at::Tensor uploaded = at::tensor(host, at::TensorOptions().dtype(at::kLong)).to(present.device());
  const at::Tensor heads = uploaded.narrow(0, 0, pairs), blocks = uploaded.narrow(0, pairs, pairs);
  const at::Tensor rows_present = at::index(present, indices({heads, blocks}));  // (pairs, key_blocks)
  // Key block j goes to column (present blocks up to j) − 1 of its pair's list; absent blocks to column
  // `widest`, which is dropped.
  const at::Tensor column = at::where(rows_present, rows_present.cumsum(1).sub_(1), widest);
  const at::Tensor lists = at::zeros({pairs, widest + 1}, index).scatter_(
      1, column, at::arange(g.key_blocks, index).expand({pairs, g.key_blocks}));
  const at::Tensor listed = at::arange(widest, index).lt(uploaded.narrow(0, 2 * pairs, pairs).unsqueeze(1));
  const at::Tensor rows = blocks.unsqueeze(1) * g.rows + at::arange(g.rows, index);                 // (pairs, L)
  const at::Tensor keys = lists.narrow(1, 0, widest).unsqueeze(2) * g.block + at::arange(g.block, index);  // (., M, b)

  const int64_t heads_in_tile = g.per_head ? 1 : s.heads;
  std::vector<LayoutTile> tiles;
  for (const PairClass& c : list.classes) {
    const int64_t M = c.width;
    const int64_t per_tile = std::max<int64_t>(1, kTileScores / (s.batch * heads_in_tile * g.rows * M * g.block));
    for (int64_t first = c.first; first < c.first + c.pairs; first += per_tile) {
      const int64_t n = std::min(per_tile, c.first + c.pairs - first);
      tiles.push_back({heads.narrow(0, first, n), blocks.narrow(0, first, n),
                       lists.narrow(0, first, n).narrow(1, 0, M), rows.narrow(0, first, n),
                       keys.narrow(0, first, n).narrow(1, 0, M).flatten(1),
                       listed.narrow(0, first, n).narrow(1, 0, M).unsqueeze(2)});
    }
  }
  return tiles;
}

// (B, H, T, ...) padded along T to blocks · size (with `fill`) and split: (B, H, blocks, size, ...).
at::Tensor in_blocks(const at::Tensor& t, int64_t blocks, int64_t size, double fill = 0) {
  const at::Tensor padded = padded_rows(t, blocks * size, fill);
  std::vector<int64_t> sizes = padded.sizes().vec();
  sizes[2] = size;
  sizes.insert(sizes.begin() + 2, blocks);
  return padded.reshape(sizes);
}

// (B, H, blocks, size, ...) back to the first `length` of its (B, H, T, ...).
at::Tensor from_blocks(const at::Tensor& t, int64_t length) { return t.flatten(2, 3).narrow(2, 0, length); }

// Where a tile's pairs read the forget gates: its rows and keys, and each entry's head when the layout
// has a row per head.
ForgetTile forget_tile(const WindowAttentionShape& s, const LayoutGeometry& g, const LayoutTile& t) {
  return {t.rows, t.keys, g.per_head ? t.heads : at::Tensor(), s.k_len - s.q_len};
}

// (B or 1, H or 1, n, L, c) visibility of a tile's pairs, and the pattern's score terms.
PairBlock tile_pairs(const WindowAttentionShape& s, const RestrictedPattern& p, const LayoutGeometry& g,
                     const LayoutTile& t, at::ScalarType scores_dtype) {
  const int64_t n = t.rows.size(0), L = t.rows.size(1), M = t.key_blocks.size(1), c = t.keys.size(1);
  // Padding is invisible: rows past T_q, keys past T_k (in the last key block) and the lists' padding.
  const bool padded_rows = s.q_len % L != 0, padded_keys = s.k_len % g.block != 0;
  at::Tensor keys_seen = t.key_listed.expand({n, M, g.block});
  if (padded_keys) keys_seen = keys_seen.logical_and(t.keys.lt(s.k_len).view({n, M, g.block}));
  at::Tensor visible = keys_seen.reshape({n, 1, c});  // broadcasts against the (n, L, c) scores
  if (padded_rows) visible = visible.logical_and(t.rows.lt(s.q_len).unsqueeze(2));
  // Rows and keys as indices into the per-token tensors (padding clamped: it is invisible already).
  const at::Tensor rows_at = padded_rows ? t.rows.clamp_max(s.q_len - 1) : t.rows;
  const at::Tensor keys_at = padded_keys ? t.keys.clamp_max(s.k_len - 1) : t.keys;
  if (!g.one_layout_row) {  // the block spans layout rows: each row's own
    const at::Tensor head = g.per_head ? t.heads.view({n, 1, 1}) : at::zeros({1, 1, 1}, t.heads.options());
    const at::Tensor row_blocks = rows_at.div(g.block, "floor").unsqueeze(2);
    const at::Tensor key_blocks = t.keys.div(g.block, "floor").unsqueeze(1);
    visible = visible.logical_and(at::index(*p.layout, indices({head, row_blocks, key_blocks})));
  }
  if (p.causal && !p.positions.has_value())
    visible = visible.logical_and(t.keys.unsqueeze(1).le(t.rows.unsqueeze(2) + (s.k_len - s.q_len)));
  visible = visible.unsqueeze(0).unsqueeze(0);  // (1, 1, n, L, c)
  if (p.key_padding_mask.has_value())
    visible = visible.logical_and(
        p.key_padding_mask->index_select(1, keys_at.flatten()).view({s.batch, 1, n, 1, c}).logical_not());
  // (B, 1 or H, n, ·) values of a (B, 1 or H, T) per-token tensor at `tokens` (n, ·): the pair's head's.
  const auto per_token = [&](const at::Tensor& ids, const at::Tensor& tokens) {
    if (g.per_head && ids.size(1) > 1)
      return at::index(ids, indices({std::nullopt, t.heads.unsqueeze(1), tokens})).unsqueeze(1);
    return at::index(ids, indices({std::nullopt, std::nullopt, tokens}));
  };
  if (p.q_segments.has_value())
    visible = visible.logical_and(
        per_token(*p.q_segments, rows_at).unsqueeze(-1).eq(per_token(*p.k_segments, keys_at).unsqueeze(-2)));
  PairBlock pairs;
  pairs.softcap = p.softcap;
  if (p.positions.has_value()) {
    const at::Tensor pos_q = per_token(*p.positions, rows_at).unsqueeze(-1);
    const at::Tensor pos_k = per_token(*p.positions, keys_at).unsqueeze(-2);
    if (p.causal) visible = visible.logical_and(pos_k.le(pos_q));
    pairs.fixed = visible.logical_and(pos_k.eq(pos_q));
  }
  if (p.bias.has_value()) {
    const at::Tensor& bias = *p.bias;
    const at::Tensor r = rows_at.unsqueeze(2), k = keys_at.unsqueeze(1);
    const at::Tensor terms = g.per_head && bias.size(0) > 1
                                 ? at::index(bias, indices({t.heads.view({n, 1, 1}), r, k})).unsqueeze(0)
                                 : at::index(bias, indices({std::nullopt, r, k}));  // (H or 1, n, L, c)
    pairs.bias = terms.unsqueeze(0).to(accumulate_type(bias.scalar_type()));
  }
  if (p.alibi_slopes.has_value()) {  // ALiBi's terms join the bias (both added after the cap)
    const at::Tensor& slopes = *p.alibi_slopes;
    at::Tensor per_pair = slopes_per_head(slopes);  // (B or 1, H, 1, 1, 1)
    if (g.per_head) {  // the tile's entries are (head, block) pairs: (B or 1, 1, n, 1, 1)
      const at::Tensor heads = slopes.dim() == 1 ? slopes.index_select(0, t.heads).view({1, 1, n, 1, 1})
                                                 : slopes.index_select(1, t.heads).view({slopes.size(0), 1, n, 1, 1});
      per_pair = heads;
    }
    const at::Tensor alibi = alibi_terms(per_pair, t.rows, t.keys, s.k_len - s.q_len, scores_dtype);
    pairs.bias = pairs.bias.defined() ? pairs.bias + alibi : alibi;
  }
  if (p.forget_cumsum.has_value()) {  // so do the forget gates' (after ALiBi's)
    const at::Tensor decay = forget_terms(*p.forget_cumsum, forget_tile(s, g, t));
    pairs.bias = pairs.bias.defined() ? pairs.bias + decay : decay;
  }
  if (s.drops()) {  // the pairs' batch·head: (B, H, 1, 1, 1), or (B, 1, n, 1, 1) with the pairs' own heads
    const auto index = t.rows.options();
    const at::Tensor bh = g.per_head ? (at::arange(s.batch, index) * s.heads).view({s.batch, 1, 1, 1, 1}) +
                                           t.heads.view({1, 1, n, 1, 1})
                                     : at::arange(s.batch * s.heads, index).view({s.batch, s.heads, 1, 1, 1});
    KeyRuns keys;  // the listed key blocks as runs of b keys where they start on a quad
    if (g.block % 4 == 0) keys = {t.key_blocks * g.block, g.block, 0};
    else keys.single = t.keys;
    pairs.dropout = dropout_factors(s, bh, t.rows, keys, scores_dtype);
  }
  pairs.visible = visible;
  return pairs;
}

// What a layout call's forward and backward both start from: the tiles, and the scaled queries and
// the keys and values in the accumulate type, padded to whole blocks.
struct LayoutOperands {
  LayoutGeometry g;
  std::vector<LayoutTile> tiles;
  at::Tensor Q;     // (B, H, row_blocks, L, D)
  at::Tensor K, V;  // (B, H, key_blocks, b, ·)

  // The rows of a (B, H, row_blocks, L, ...) tensor that a tile's pairs hold: (B, H or 1, n, L, ...).
  at::Tensor rows_of(const at::Tensor& t, const LayoutTile& tile) const {
    if (g.per_head) return at::index(t, indices({std::nullopt, tile.heads, tile.blocks})).unsqueeze(1);
    return t.index_select(2, tile.blocks);
  }
  // Writes them (each pair is in one tile: no row is written twice).
  void put_rows(const at::Tensor& target, const LayoutTile& tile, const at::Tensor& rows) const {
    if (g.per_head)
      target.index_put_(indices({std::nullopt, tile.heads, tile.blocks}), rows.squeeze(1));
    else
      target.index_copy_(2, tile.blocks, rows);
  }
  // The keys (or values) of a (B, H, key_blocks, b, ·) tensor a tile's pairs see: (B, H or 1, n, M·b, ·).
  at::Tensor keys_of(const at::Tensor& t, const LayoutTile& tile) const {
    const at::Tensor blocks =
        g.per_head ? at::index(t, indices({std::nullopt, tile.heads.unsqueeze(1), tile.key_blocks})).unsqueeze(1)
                   : at::index(t, indices({std::nullopt, std::nullopt, tile.key_blocks}));
    return blocks.flatten(3, 4);
  }
  // Adds a tile's key gradients (B, H or 1, n, M·b, ·) into `target` (B, H, key_blocks, b, ·, contiguous).
  // Deterministic everywhere: CUDA's index_add_ adds with atomics, so there index_put_(accumulate) adds
  // (it sorts the indices); elsewhere index_add_ adds one index after another, which is faster.
  void add_keys(const at::Tensor& target, const LayoutTile& tile, const at::Tensor& grads) const {
    const at::Tensor blocks = grads.unflatten(3, {tile.key_blocks.size(1), g.block});  // (B, H or 1, n, M, b, ·)
    if (target.is_cuda()) {
      if (g.per_head)
        target.index_put_(indices({std::nullopt, tile.heads.unsqueeze(1), tile.key_blocks}), blocks.squeeze(1), true);
      else
        target.index_put_(indices({std::nullopt, std::nullopt, tile.key_blocks}), blocks, true);
    } else if (g.per_head) {  // (head, key block) as one index into (B, H · key_blocks, b, ·)
      const at::Tensor index = tile.heads.unsqueeze(1).mul(g.key_blocks).add(tile.key_blocks).flatten();
      target.flatten(1, 2).index_add_(1, index, blocks.squeeze(1).flatten(1, 2));
    } else {
      target.index_add_(2, tile.key_blocks.flatten(), blocks.flatten(2, 3));
    }
  }
  // Adds a tile's score gradients dS (B, H or 1, n, L, c) into the bias's (1 or H, row_blocks·L, key_blocks·b).
  void add_bias(const at::Tensor& target, const LayoutTile& tile, const at::Tensor& dS) const {
    at::Tensor grads = dS.sum(0);  // (H or 1, n, L, c)
    const at::Tensor r = tile.rows.unsqueeze(2), k = tile.keys.unsqueeze(1);
    if (g.per_head) {
      const int64_t n = tile.heads.size(0);
      const at::Tensor head = target.size(0) > 1 ? tile.heads.view({n, 1, 1}) : at::zeros({n, 1, 1}, r.options());
      target.index_put_(indices({head, r, k}), grads.squeeze(0), true);
    } else {
      if (target.size(0) == 1) grads = grads.sum(0, true);
      target.index_put_(indices({std::nullopt, r, k}), grads, true);
    }
  }
};

LayoutOperands layout_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                               const WindowAttentionShape& s, const RestrictedPattern& p) {
  LayoutOperands o;
  o.g = layout_geometry(s, p);
  o.tiles = layout_tiles(block_key_blocks(o.g, s, p), o.g, s);
  const auto acc = accumulate_type(q.scalar_type());
  o.Q = in_blocks(q.to(acc) * scale, o.g.row_blocks, o.g.rows);
  o.K = in_blocks(k.to(acc), o.g.key_blocks, o.g.block);
  o.V = in_blocks(v.to(acc), o.g.key_blocks, o.g.block);
  return o;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> layout_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  double scale, const WindowAttentionShape& s,
                                                  const RestrictedPattern& p) {
  const int64_t B = s.batch, H = s.heads, dv = s.value_dim;
  const LayoutOperands o = layout_operands(q, k, v, scale, s, p);
  const at::Tensor out = at::zeros({B, H, o.g.row_blocks, o.g.rows, dv}, o.Q.options());
  const at::Tensor lse = at::full({B, H, o.g.row_blocks, o.g.rows}, -kInf, o.Q.options());
  for (const LayoutTile& t : o.tiles) {
    const auto [tile_out, tile_lse] =
        tile_forward(o.rows_of(o.Q, t), o.keys_of(o.K, t), o.keys_of(o.V, t),
                     tile_pairs(s, p, o.g, t, o.Q.scalar_type()));
    o.put_rows(out, t, tile_out);
    o.put_rows(lse, t, tile_lse);
  }
  return {from_blocks(out, s.q_len).to(q.scalar_type()).contiguous(), from_blocks(lse, s.q_len).contiguous()};
}

RestrictedGradients layout_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale, const WindowAttentionShape& s,
    const RestrictedPattern& p) {
  const auto acc = accumulate_type(q.scalar_type()), dtype = q.scalar_type();
  const LayoutOperands o = layout_operands(q, k, v, scale, s, p);
  const at::Tensor G_rows = grad_out.to(acc);
  const at::Tensor G = in_blocks(G_rows, o.g.row_blocks, o.g.rows);
  const at::Tensor D = in_blocks(softmax_delta(G_rows, out, grad_lse), o.g.row_blocks, o.g.rows);
  const at::Tensor LSE = in_blocks(lse, o.g.row_blocks, o.g.rows, -kInf);
  const at::Tensor dQ = at::zeros_like(o.Q), dK = at::zeros_like(o.K), dV = at::zeros_like(o.V);
  at::Tensor dBias;
  if (p.bias)
    dBias = at::zeros({p.bias->size(0), o.g.row_blocks * o.g.rows, o.g.key_blocks * o.g.block}, o.Q.options());
  const at::Tensor dForget =
      p.forget_cumsum.has_value() ? at::zeros_like(*p.forget_cumsum) : at::empty({0}, o.Q.options());
  for (const LayoutTile& t : o.tiles) {
    const TileGradients grads =
        tile_backward(o.rows_of(o.Q, t), o.keys_of(o.K, t), o.keys_of(o.V, t), o.rows_of(G, t), o.rows_of(LSE, t),
                      o.rows_of(D, t), scale, tile_pairs(s, p, o.g, t, o.Q.scalar_type()));
    o.put_rows(dQ, t, grads.dQ);
    o.add_keys(dK, t, grads.dK);
    o.add_keys(dV, t, grads.dV);
    if (p.bias) o.add_bias(dBias, t, grads.dS);
    if (p.forget_cumsum.has_value()) add_forget_grads(dForget, grads.dS, forget_tile(s, o.g, t));
  }
  if (p.bias) dBias = dBias.narrow(1, 0, s.q_len).narrow(2, 0, s.k_len).to(p.bias->scalar_type()).contiguous();
  return {from_blocks(dQ, s.q_len).to(dtype).contiguous(), from_blocks(dK, s.k_len).to(dtype).contiguous(),
          from_blocks(dV, s.k_len).to(dtype).contiguous(), p.bias ? dBias : at::empty({0}, q.options()), dForget};
}

}  // namespace linattn::restricted_generic
