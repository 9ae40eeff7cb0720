// Window patterns in the device-generic restricted softmax (generic_window.h).
//
// Query rows are cut into blocks of L rows (64 or 128). A bounded window gives block b the keys
// [b·L + origin, b·L + origin + W), W a multiple of L, and a tile stacks n such blocks as a batch
// dimension: one score product (B, H, n, L, W) per tile, its keys a strided view of the keys padded
// once ("sliding" tiles). An unbounded side, or a window as wide as the keys, gives a tile of rows the
// contiguous band its rows reach instead ("span" tiles, one block of many rows). Longformer's global
// keys are extra columns of every block (masked in a block whose band holds them already); a global
// row sees every key, so it is left out of the band tiles and computed against all keys in a tile of
// its own, and the two parts are summed (each (batch entry, row) is in exactly one). A tile holds at
// most kTileScores scores; a call issues a fixed number of launches per tile, and only global tokens
// read anything back to the host (their list). The backward adds a tile's key gradients back in W / L
// shifted adds, so no two blocks' sums meet in one call: deterministic on every device.
#include "generic_window.h"

#include "generic_dropout.h"
#include "generic_forget.h"
#include "generic_tile.h"

#include <algorithm>
#include <vector>

namespace linattn::restricted_generic {
namespace {


int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// How a window pattern's rows and keys are cut into tiles.
struct WindowGeometry {
  int64_t offset;           // T_k − T_q: query i's aligned position is i + offset
  int64_t block;            // L, query rows per block
  int64_t row_blocks;       // ceil(T_q / L); rows past T_q are padding, invisible
  bool sliding;             // each block sees its own `width` keys from b·L + origin; else span tiles
  int64_t width;            // W (sliding)
  int64_t origin;           // block 0's first key (sliding; negative or past T_k: padding)
  int64_t blocks_per_tile;  // bounded by kTileScores
};

WindowGeometry window_geometry(const WindowAttentionShape& s, int64_t global_keys) {
  WindowGeometry g;
  g.offset = s.k_len - s.q_len;
  const bool bounded = s.left >= 0 && s.right >= 0;
  const int64_t reach = bounded ? s.left + s.right : 0;  // a block of L rows reaches L + reach keys
  g.block = bounded && reach < 128 ? 64 : 128;
  g.row_blocks = (s.q_len + g.block - 1) / g.block;
  g.width = round_up(g.block + reach, g.block);
  g.sliding = bounded && g.width < s.k_len;
  g.origin = g.offset - s.left;
  const int64_t columns = std::max<int64_t>(1, (g.sliding ? g.width : s.k_len) + global_keys);
  g.blocks_per_tile = std::max<int64_t>(1, kTileScores / (s.batch * s.heads * g.block * columns));
  return g;
}

// n blocks of query rows and the band of keys each one sees.
struct Tile {
  int64_t first_row, blocks, rows_per_block;  // rows [first_row, first_row + blocks · rows_per_block)
  int64_t first_key, width;                    // block i's band: [first_key + i · rows_per_block, + width)
};

std::vector<Tile> band_tiles(const WindowGeometry& g, const WindowAttentionShape& s) {
  std::vector<Tile> tiles;
  for (int64_t b0 = 0; b0 < g.row_blocks; b0 += g.blocks_per_tile) {
    const int64_t n = std::min(g.blocks_per_tile, g.row_blocks - b0), r0 = b0 * g.block;
    if (g.sliding) {
      tiles.push_back({r0, n, g.block, r0 + g.origin, g.width});
    } else {
      const int64_t k0 = s.band_begin(r0), k1 = std::max(k0, s.band_end(std::min(s.q_len, r0 + n * g.block)));
      tiles.push_back({r0, 1, n * g.block, k0, k1 - k0});
    }
  }
  return tiles;
}

// A tile's query rows (n, L) and key columns (n, c) as indices: the band, then the global keys, a
// global key inside the block's band marked −1 there (a band column holds it already). Indices
// outside [0, T) are padding.
// The same keys as runs for the dropout mask: each block's band, then the global keys one by one.
struct TileIndex {
  at::Tensor rows, keys;
  int64_t band_width;
  KeyRuns runs;
};

TileIndex tile_index(const Tile& t, const at::Tensor& global_keys) {
  const auto options = global_keys.options();
  const at::Tensor starts = at::arange(t.blocks, options).mul_(t.rows_per_block).unsqueeze(-1);  // (n, 1)
  TileIndex ix{starts + at::arange(t.first_row, t.first_row + t.rows_per_block, options),
               starts + at::arange(t.first_key, t.first_key + t.width, options), t.width};
  // Every band starts at first_key + i·L, L a multiple of 4 (or one block): one alignment.
  if (t.width > 0) ix.runs = {starts + t.first_key, t.width, (t.first_key % 4 + 4) % 4};
  if (global_keys.numel() > 0) {
    const at::Tensor first = starts + t.first_key;
    const at::Tensor in_band = global_keys.ge(first).logical_and(global_keys.lt(first + t.width));  // (n, g)
    ix.runs.single = at::where(in_band, -1, global_keys.expand({t.blocks, global_keys.numel()}));
    ix.keys = at::cat({ix.keys, ix.runs.single}, 1);
  }
  return ix;
}

// The global rows (those of a chunk of the global tokens) against every key.
TileIndex global_rows_index(const at::Tensor& rows, int64_t k_len) {
  return {rows.unsqueeze(0), at::arange(k_len, rows.options()).unsqueeze(0), k_len,
          {at::zeros({1, 1}, rows.options()), k_len, 0}};
}

at::Tensor both(const at::Tensor& a, const at::Tensor& b) { return a.defined() ? a.logical_and(b) : b; }

// (B or 1, H or 1, n, L, c) visibility of a tile's pairs. In band tiles: the window (in band
// columns) or a global key, for rows that are not global in that batch entry; in a global-rows tile:
// every key, for the rows that are.
at::Tensor tile_visibility(const WindowAttentionShape& s, const RestrictedPattern& p, int64_t offset,
                           const TileIndex& ix, bool global_rows) {
  const int64_t n = ix.rows.size(0), L = ix.rows.size(1), columns = ix.keys.size(1);
  const at::Tensor key_exists = ix.keys.ge(0).logical_and(ix.keys.lt(s.k_len)).unsqueeze(1);  // (n, 1, c)
  at::Tensor visible = ix.rows.lt(s.q_len).unsqueeze(-1).logical_and(key_exists);           // (n, L, c)
  at::Tensor in_window;  // undefined: every pair
  if (!global_rows) {
    const at::Tensor d = ix.rows.unsqueeze(-1) + offset - ix.keys.unsqueeze(1);  // aligned position − key
    if (s.left >= 0) in_window = d.le(s.left);
    if (s.right >= 0) in_window = both(in_window, d.ge(-s.right));
    if (s.dilation > 1) in_window = both(in_window, d.remainder(s.dilation).eq(0));
    if (columns > ix.band_width) in_window = both(in_window, at::arange(columns, d.options()).lt(ix.band_width));
  }
  // Rows and keys as indices into the per-token tensors that are there (padding clamped: it is
  // invisible already).
  const bool segments = p.q_segments.has_value(), global_keys = p.global_mask.has_value() && !global_rows;
  at::Tensor rows_at, keys_at;
  if (p.global_mask.has_value() || segments) rows_at = ix.rows.clamp_max(s.q_len - 1).flatten();
  if (global_keys || segments || p.key_padding_mask.has_value()) keys_at = ix.keys.clamp(0, s.k_len - 1).flatten();
  visible = visible.unsqueeze(0);  // (B or 1, n, L, c)
  if (p.global_mask.has_value()) {
    const at::Tensor& global = *p.global_mask;
    const at::Tensor global_row = global.index_select(1, rows_at).view({s.batch, n, L, 1});
    if (global_rows) {
      visible = visible.logical_and(global_row);
    } else {
      at::Tensor seen = global.index_select(1, keys_at).view({s.batch, n, 1, columns});
      if (in_window.defined()) seen = seen.logical_or(in_window);
      visible = visible.logical_and(seen).logical_and(global_row.logical_not());
    }
  } else if (in_window.defined()) {
    visible = visible.logical_and(in_window);
  }
  if (p.key_padding_mask.has_value())
    visible = visible.logical_and(
        p.key_padding_mask->index_select(1, keys_at).view({s.batch, n, 1, columns}).logical_not());
  visible = visible.unsqueeze(1);  // (B or 1, H or 1, n, L, c)
  if (p.q_segments.has_value()) {
    const int64_t heads = p.q_segments->size(1);
    const at::Tensor seg_q = p.q_segments->index_select(2, rows_at).view({s.batch, heads, n, L, 1});
    const at::Tensor seg_k = p.k_segments->index_select(2, keys_at).view({s.batch, heads, n, 1, columns});
    visible = visible.logical_and(seg_q.eq(seg_k));
  }
  return visible;
}

// Rows [first_row, + blocks · rows_per_block) of a (B, H, rows, ...) tensor as (B, H, n, L, ...).
at::Tensor block_rows(const at::Tensor& t, const Tile& tile) {
  return t.narrow(2, tile.first_row, tile.blocks * tile.rows_per_block)
      .unflatten(2, {tile.blocks, tile.rows_per_block});
}

// The keys (or values) a tile's blocks see, (B, H, n, c, ·): block i's band [first_key + i·L, + W)
// of `source` (B, H, ·, ·), whose row 0 is key `origin`, as a strided view (blocks overlap), then
// the global keys' rows.
at::Tensor tile_keys(const at::Tensor& source, int64_t origin, const Tile& t, const at::Tensor& global_rows) {
  const int64_t start = t.first_key - origin;
  const at::Tensor band =
      t.blocks == 1 ? source.narrow(2, start, t.width).unsqueeze(2)
                    : source.as_strided({source.size(0), source.size(1), t.blocks, t.width, source.size(3)},
                                        {source.stride(0), source.stride(1), t.rows_per_block * source.stride(2),
                                         source.stride(2), source.stride(3)},
                                        source.storage_offset() + start * source.stride(2));
  if (!global_rows.defined()) return band;
  return at::cat({band, global_rows.unsqueeze(2).expand({-1, -1, t.blocks, -1, -1})}, 3);
}

// Adds a tile's band gradients (B, H, n, W, ·) into `target` (B, H, ·, ·, contiguous), whose row 0
// is key `origin`: block i's rows go to [first_key + i·L − origin, + W), in W / L adds of every
// block's L-row part so that no two blocks' sums meet in one call.
void add_band(const at::Tensor& target, int64_t origin, const Tile& t, const at::Tensor& band) {
  const int64_t start = t.first_key - origin;
  if (t.blocks == 1) {
    target.narrow(2, start, t.width).add_(band.select(2, 0));
    return;
  }
  const int64_t L = t.rows_per_block;
  for (int64_t j = 0; j * L < t.width; ++j)
    target.narrow(2, start + j * L, t.blocks * L).unflatten(2, {t.blocks, L}).add_(band.narrow(3, j * L, L));
}

// Keys and values as the band tiles read them: padded (or cropped) once to the keys the sliding blocks
// cover, [origin, origin + (row_blocks − 1)·L + W); span tiles read them as they are.
struct KeySource {
  at::Tensor K, V;
  int64_t origin;
};

KeySource key_source(const at::Tensor& K, const at::Tensor& V, const WindowGeometry& g, int64_t k_len) {
  if (!g.sliding) return {K, V, 0};
  const int64_t length = (g.row_blocks - 1) * g.block + g.width;
  const std::vector<int64_t> pads{0, 0, -g.origin, g.origin + length - k_len};  // last dim first
  return {at::constant_pad_nd(K, pads, 0), at::constant_pad_nd(V, pads, 0), g.origin};
}

// The global tokens (the union over the batch) as int64 indices on the device: one read back to
// the host (a synchronisation on a GPU), the one this path makes.
at::Tensor global_tokens(const RestrictedPattern& p, const at::Tensor& q) {
  const auto options = q.options().dtype(at::kLong);
  if (!p.global_mask.has_value()) return at::empty({0}, options);
  return p.global_mask->any(0).cpu().nonzero().flatten().to(q.device());
}

// Chunks of the global tokens whose rows against every key fit a tile.
std::vector<at::Tensor> global_row_chunks(const at::Tensor& global_keys, const WindowAttentionShape& s) {
  const int64_t per_chunk = std::max<int64_t>(1, kTileScores / (s.batch * s.heads * s.k_len));
  std::vector<at::Tensor> chunks;
  for (int64_t i = 0; i < global_keys.numel(); i += per_chunk)
    chunks.push_back(global_keys.narrow(0, i, std::min(per_chunk, global_keys.numel() - i)));
  return chunks;
}

// What a window call's forward and backward both start from: the global tokens, the tiling, the
// scaled queries padded to whole blocks, the keys and values in the accumulate type (as the band tiles
// read them, and the global keys' rows).
struct WindowOperands {
  at::Tensor global_keys;
  int64_t globals;
  WindowGeometry g;
  int64_t rows;  // the padded query rows
  at::Tensor Q, K, V;
  KeySource source;
  at::Tensor K_global, V_global;

  // A band tile's keys and values, (B, H, n, c, ·), and its visibility.
  at::Tensor tile_keys_of(const Tile& t) const { return tile_keys(source.K, source.origin, t, K_global); }
  at::Tensor tile_values_of(const Tile& t) const { return tile_keys(source.V, source.origin, t, V_global); }
  TileIndex band_index(const Tile& t) const { return tile_index(t, global_keys); }
  PairBlock band_pairs(const WindowAttentionShape& s, const RestrictedPattern& p, const Tile& t) const {
    return pairs_of(s, p, band_index(t), false);
  }
  PairBlock global_row_pairs(const WindowAttentionShape& s, const RestrictedPattern& p,
                             const at::Tensor& chunk) const {
    return pairs_of(s, p, global_rows_index(chunk, s.k_len), true);
  }
  // The visibility of a tile's pairs, and ALiBi's and the forget gates' terms as its bias (a window has
  // no bias of its own).
  PairBlock pairs_of(const WindowAttentionShape& s, const RestrictedPattern& p, const TileIndex& ix,
                     bool global_rows) const {
    at::Tensor terms, dropout;
    if (p.alibi_slopes.has_value())
      terms = alibi_terms(slopes_per_head(*p.alibi_slopes), ix.rows, ix.keys, g.offset, Q.scalar_type());
    if (p.forget_cumsum.has_value()) {
      const at::Tensor decay = forget_terms(*p.forget_cumsum, forget_tile(ix));
      terms = terms.defined() ? terms + decay : decay;
    }
    if (s.drops()) {  // the pairs' batch·head: (B, H, 1, 1, 1)
      const at::Tensor bh = at::arange(s.batch * s.heads, ix.rows.options()).view({s.batch, s.heads, 1, 1, 1});
      dropout = dropout_factors(s, bh, ix.rows, ix.runs, Q.scalar_type());
    }
    return {tile_visibility(s, p, g.offset, ix, global_rows), terms, {}, dropout, p.softcap};
  }
  ForgetTile forget_tile(const TileIndex& ix) const { return {ix.rows, ix.keys, {}, g.offset}; }
};

WindowOperands window_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                               const WindowAttentionShape& s, const RestrictedPattern& p) {
  const auto acc = accumulate_type(q.scalar_type());
  WindowOperands w;
  w.global_keys = global_tokens(p, q);
  w.globals = w.global_keys.numel();
  w.g = window_geometry(s, w.globals);
  w.rows = w.g.row_blocks * w.g.block;
  w.Q = padded_rows(q.to(acc) * scale, w.rows);
  w.K = k.to(acc), w.V = v.to(acc);
  w.source = key_source(w.K, w.V, w.g, s.k_len);
  if (w.globals > 0) w.K_global = w.K.index_select(2, w.global_keys), w.V_global = w.V.index_select(2, w.global_keys);
  return w;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  double scale, const WindowAttentionShape& s,
                                                  const RestrictedPattern& p) {
  const int64_t B = s.batch, H = s.heads, dv = s.value_dim;
  const WindowOperands w = window_operands(q, k, v, scale, s, p);
  const at::Tensor out = at::empty({B, H, w.rows, dv}, w.Q.options()), lse = at::empty({B, H, w.rows}, w.Q.options());
  for (const Tile& t : band_tiles(w.g, s)) {
    if (t.width + w.globals == 0) {  // rows without a key: 0, lse −inf
      block_rows(out, t).zero_();
      block_rows(lse, t).fill_(-kInf);
      continue;
    }
    const auto [o, l] = tile_forward(block_rows(w.Q, t), w.tile_keys_of(t), w.tile_values_of(t), w.band_pairs(s, p, t));
    block_rows(out, t).copy_(o);
    block_rows(lse, t).copy_(l);
  }
  for (const at::Tensor& chunk : global_row_chunks(w.global_keys, s)) {  // band tiles left these rows 0, −inf
    const auto [o, l] = tile_forward(w.Q.index_select(2, chunk).unsqueeze(2), w.K.unsqueeze(2), w.V.unsqueeze(2),
                                     w.global_row_pairs(s, p, chunk));
    out.index_add_(2, chunk, o.squeeze(2));
    lse.index_copy_(2, chunk, at::maximum(lse.index_select(2, chunk), l.squeeze(2)));
  }
  return {out.narrow(2, 0, s.q_len).to(q.scalar_type()).contiguous(), lse.narrow(2, 0, s.q_len).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_backward(const at::Tensor& grad_out,
                                                               const std::optional<at::Tensor>& grad_lse,
                                                               const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& out,
                                                               const at::Tensor& lse, double scale,
                                                               const WindowAttentionShape& s,
                                                               const RestrictedPattern& p) {
  const auto acc = accumulate_type(q.scalar_type()), dtype = q.scalar_type();
  const WindowOperands w = window_operands(q, k, v, scale, s, p);
  const KeySource& source = w.source;
  const at::Tensor G_rows = grad_out.to(acc), G = padded_rows(G_rows, w.rows);
  const at::Tensor D = padded_rows(softmax_delta(G_rows, out, grad_lse), w.rows);
  const at::Tensor LSE = padded_rows(lse, w.rows, -kInf);
  at::Tensor dK_global, dV_global;
  if (w.globals > 0) dK_global = at::zeros_like(w.K_global), dV_global = at::zeros_like(w.V_global);
  const at::Tensor dQ = at::zeros_like(w.Q);
  const at::Tensor dK_source = at::zeros(source.K.sizes(), w.Q.options());
  const at::Tensor dV_source = at::zeros(source.V.sizes(), w.Q.options());
  const at::Tensor dForget =
      p.forget_cumsum.has_value() ? at::zeros_like(*p.forget_cumsum) : at::empty({0}, w.Q.options());
  for (const Tile& t : band_tiles(w.g, s)) {
    if (t.width + w.globals == 0) continue;  // rows without a key pass no gradient
    const TileIndex ix = w.band_index(t);
    const TileGradients grads =
        tile_backward(block_rows(w.Q, t), w.tile_keys_of(t), w.tile_values_of(t), block_rows(G, t),
                      block_rows(LSE, t), block_rows(D, t), scale, w.pairs_of(s, p, ix, false));
    if (p.forget_cumsum.has_value()) add_forget_grads(dForget, grads.dS, w.forget_tile(ix));
    block_rows(dQ, t).copy_(grads.dQ);
    add_band(dK_source, source.origin, t, grads.dK.narrow(3, 0, t.width));
    add_band(dV_source, source.origin, t, grads.dV.narrow(3, 0, t.width));
    if (w.globals > 0) {
      dK_global.add_(grads.dK.narrow(3, t.width, w.globals).sum(2));
      dV_global.add_(grads.dV.narrow(3, t.width, w.globals).sum(2));
    }
  }
  // The keys [0, T_k) of the padded (or cropped) gradients.
  const auto keys_of = [&](const at::Tensor& padded) {
    const int64_t first = std::max<int64_t>(0, source.origin);
    const int64_t last = std::min(s.k_len, source.origin + padded.size(2));
    if (first == 0 && last == s.k_len) return padded.narrow(2, -source.origin, s.k_len);
    at::Tensor all = at::zeros({padded.size(0), padded.size(1), s.k_len, padded.size(3)}, padded.options());
    if (last > first) all.narrow(2, first, last - first).copy_(padded.narrow(2, first - source.origin, last - first));
    return all;
  };
  const at::Tensor dK = keys_of(dK_source), dV = keys_of(dV_source);
  if (w.globals > 0) {
    dK.index_add_(2, w.global_keys, dK_global);
    dV.index_add_(2, w.global_keys, dV_global);
  }
  for (const at::Tensor& chunk : global_row_chunks(w.global_keys, s)) {
    const TileIndex ix = global_rows_index(chunk, s.k_len);
    const TileGradients grads = tile_backward(
        w.Q.index_select(2, chunk).unsqueeze(2), w.K.unsqueeze(2), w.V.unsqueeze(2),
        G.index_select(2, chunk).unsqueeze(2), LSE.index_select(2, chunk).unsqueeze(2),
        D.index_select(2, chunk).unsqueeze(2), scale, w.pairs_of(s, p, ix, true));
    if (p.forget_cumsum.has_value()) add_forget_grads(dForget, grads.dS, w.forget_tile(ix));
    dQ.index_add_(2, chunk, grads.dQ.squeeze(2));
    dK.add_(grads.dK.squeeze(2));
    dV.add_(grads.dV.squeeze(2));
  }
  return {dQ.narrow(2, 0, s.q_len).to(dtype).contiguous(), dK.to(dtype).contiguous(), dV.to(dtype).contiguous(),
          dForget};
}

}  // namespace linattn::restricted_generic
