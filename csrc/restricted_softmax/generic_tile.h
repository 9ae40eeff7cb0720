// The device-generic restricted softmax's arithmetic on one tile: query rows against the keys they
// may see, in ATen ops, for any leading (batch) dimensions: (..., L, D) queries, (..., n, D) keys
// and values, a (..., L, n) visibility that broadcasts. generic.cpp's layout loop (one tile per
// block of rows) and generic_window.cpp's windows (many blocks of rows in one tile) share it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

namespace linattn::restricted_generic {

// The lse of a row without a visible key is −kInf; padded lse rows are filled with it.
inline constexpr double kInf = std::numeric_limits<double>::infinity();

// Score elements a tile may hold (128 MiB in fp32; a tile's temporaries are a few times that). On a
// GPU a tile's passes are then bound by memory bandwidth, not launch overhead, so larger tiles would
// buy little; memory stays bounded at any T.
inline constexpr int64_t kTileScores = int64_t{1} << 25;

// An advanced-indexing list; std::nullopt takes a whole dimension.
inline c10::List<std::optional<at::Tensor>> indices(std::initializer_list<std::optional<at::Tensor>> list) {
  c10::List<std::optional<at::Tensor>> result;
  for (const auto& index : list) result.push_back(index);
  return result;
}

// What a pattern says about a tile's pairs: visibility, and optionally a score bias and the
// visible pairs whose score is fixed at kSelfScore (a token's own key under shared QK; no score
// gradient). All broadcast against the (..., L, n) scores. softcap > 0 caps the scaled scores to
// softcap·tanh(s / softcap) before the bias (Gemma-2's logit soft-capping). `dropout`, when
// defined: each pair's attention-dropout factor, 0 or 1 / (1 − p) (generic_dropout.h), applied to the
// probabilities after the softmax's sum.
struct PairBlock {
  at::Tensor visible, bias, fixed, dropout;
  double softcap = 0;
};

// ALiBi's score terms −slope·|row + offset − key| of a tile (flash-attn's; offset = T_k − T_q), for
// rows (n, L) and keys (n, c) as indices and `slopes` shaped to broadcast against the (..., n, L, c)
// scores, in `dtype`: a PairBlock's bias (added after the cap, as flash-attn adds it).
at::Tensor alibi_terms(const at::Tensor& slopes, const at::Tensor& rows, const at::Tensor& keys, int64_t offset,
                       at::ScalarType dtype);

// The pattern's ALiBi slopes (H) or (B, H) as (B or 1, H, 1, 1, 1), against (B, H, n, L, c) scores.
at::Tensor slopes_per_head(const at::Tensor& slopes);

// Softmax of the tile's scaled queries Q (the scale applied) against K over the visible pairs,
// times V: out (..., L, dv) and lse (..., L), in Q's (accumulate) dtype. A row without a visible
// key is 0 with lse −inf.
std::tuple<at::Tensor, at::Tensor> tile_forward(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                                                const PairBlock& pairs);

// (B, H, T, ...) with rows appended along T up to `rows`, filled with `fill` (t itself when it has
// them already).
at::Tensor padded_rows(const at::Tensor& t, int64_t rows, double fill = 0);

// δ − grad_lse (B, H, T_q, 1), which every row's score gradients subtract, from the cotangent G in the
// accumulate type: δ_i = G_i · O_i, a zero cotangent contributing nothing (not 0·O, NaN for NaN O);
// grad_lse nullable.
at::Tensor softmax_delta(const at::Tensor& G, const at::Tensor& out, const std::optional<at::Tensor>& grad_lse);

// The tile's gradients from the saved lse (..., L) and δ − grad_lse (..., L, 1): dQ (already times
// `scale`, as Q was scaled), dK, dV, and the visible pairs' score gradient dS (the bias's).
struct TileGradients {
  at::Tensor dQ, dK, dV, dS;
};
TileGradients tile_backward(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& G,
                            const at::Tensor& lse, const at::Tensor& delta, double scale, const PairBlock& pairs);

}  // namespace linattn::restricted_generic
