// One tile of the device-generic restricted softmax (generic_tile.h).
#include "generic_tile.h"

#include "kernel.h"

#include <cmath>
#include <vector>

namespace linattn::restricted_generic {
namespace {


// A·X over the visible pairs only (visible_f: the visibility as 0/1 in X's dtype): masked entries of A
// are 0 already, and a non-finite entry of X is taken out of the product; the outputs that see one
// (through a visible pair) are NaN.
at::Tensor masked_matmul(const at::Tensor& A, const at::Tensor& visible_f, const at::Tensor& X) {
  const at::Tensor finite = at::isfinite(X);
  const at::Tensor product = at::matmul(A, at::where(finite, X, 0));
  const at::Tensor non_finite = at::where(finite, 0.0, 1.0).to(X.scalar_type());
  return at::where(at::matmul(visible_f, non_finite).gt(0), NAN, product);
}

// tanh(s / softcap) of the raw scaled scores (a soft-capped pattern's).
at::Tensor capped_tanh(const at::Tensor& scores, const PairBlock& pairs) { return (scores / pairs.softcap).tanh(); }

// The scores with the pattern's cap (`tanh`: capped_tanh's, when it has one), bias and fixed
// scores applied.
at::Tensor adjusted_scores(at::Tensor scores, const PairBlock& pairs, const at::Tensor& tanh = {}) {
  if (pairs.softcap > 0) scores = (tanh.defined() ? tanh : capped_tanh(scores, pairs)) * pairs.softcap;
  if (pairs.bias.defined()) scores = scores + pairs.bias;
  if (pairs.fixed.defined()) scores = at::where(pairs.fixed, kSelfScore, scores);
  return scores;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tile_forward(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                                                const PairBlock& pairs) {
  const at::Tensor& visible = pairs.visible;
  const at::Tensor scores = adjusted_scores(at::matmul(Q, K.transpose(-1, -2)), pairs);
  const at::Tensor row_max = at::where(visible, scores, -kInf).amax(-1, true);
  // A row without visible keys is shifted by 0 (its probabilities are all 0, its output 0);
  // one whose visible scores are all −inf keeps −inf, so −inf − −inf gives NaN, as softmax does.
  const at::Tensor shift = at::where(visible.any(-1, true), row_max, 0);
  const at::Tensor probs = at::where(visible, (scores - shift).exp(), 0);
  const at::Tensor sum = probs.sum(-1, true), empty = sum.eq(0);
  const at::Tensor kept = pairs.dropout.defined() ? probs * pairs.dropout : probs;  // after the sum: lse undropped
  const at::Tensor out = masked_matmul(kept, visible.to(V.scalar_type()), V);
  return {at::where(empty, 0, out / sum), at::where(empty, -kInf, shift + sum.log()).squeeze(-1)};
}

at::Tensor softmax_delta(const at::Tensor& G, const at::Tensor& out, const std::optional<at::Tensor>& grad_lse) {
  at::Tensor delta = at::where(G == 0, 0, G * out.to(G.scalar_type())).sum(-1, true);
  if (grad_lse.has_value()) delta = delta - grad_lse->unsqueeze(-1);
  return delta;
}

TileGradients tile_backward(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& G,
                            const at::Tensor& lse, const at::Tensor& delta, double scale, const PairBlock& pairs) {
  const at::Tensor lse_rows = lse.unsqueeze(-1);
  const at::Tensor visible = pairs.visible.logical_and(lse_rows != -kInf);
  const at::Tensor raw = at::matmul(Q, K.transpose(-1, -2));
  const at::Tensor tanh = pairs.softcap > 0 ? capped_tanh(raw, pairs) : at::Tensor();
  const at::Tensor probs = at::where(visible, (adjusted_scores(raw, pairs, tanh) - lse_rows).exp(), 0);
  const at::Tensor visible_f = visible.to(Q.scalar_type()), visible_f_t = visible_f.transpose(-1, -2);
  TileGradients grads;
  // With dropout, V met the dropped probabilities, and the undropped ones' gradient is dP's times
  // the factors.
  const at::Tensor kept = pairs.dropout.defined() ? probs * pairs.dropout : probs;
  grads.dV = masked_matmul(kept.transpose(-1, -2), visible_f_t, G);
  at::Tensor dP = at::matmul(G, V.transpose(-1, -2));
  if (pairs.dropout.defined()) dP = dP * pairs.dropout;
  const at::Tensor scored = pairs.fixed.defined() ? visible.logical_and(pairs.fixed.logical_not()) : visible;
  grads.dS = at::where(scored, probs * (dP - delta), 0);
  // A capped score's gradient passes the cap's slope 1 − tanh² (selected: a hidden pair's NaN
  // slope stays out); the bias's gradient is dS itself, added after the cap.
  const at::Tensor dS_raw = tanh.defined() ? at::where(scored, grads.dS * (1 - tanh * tanh), 0) : grads.dS;
  grads.dQ = masked_matmul(dS_raw, visible_f, K) * scale;
  grads.dK = masked_matmul(dS_raw.transpose(-1, -2), visible_f_t, Q);
  return grads;
}

at::Tensor alibi_terms(const at::Tensor& slopes, const at::Tensor& rows, const at::Tensor& keys, int64_t offset,
                       at::ScalarType dtype) {
  const at::Tensor distance = (rows.unsqueeze(-1) + offset - keys.unsqueeze(1)).abs().to(dtype);  // (n, L, c)
  return slopes.to(dtype).neg() * distance;
}

at::Tensor slopes_per_head(const at::Tensor& slopes) {
  const int64_t batch = slopes.dim() == 1 ? 1 : slopes.size(0);
  return slopes.reshape({batch, slopes.size(-1), 1, 1, 1});
}

at::Tensor padded_rows(const at::Tensor& t, int64_t rows, double fill) {
  if (t.size(2) == rows) return t;
  std::vector<int64_t> pads(2 * (t.dim() - 2), 0);  // (before, after) from the last dimension: T's last
  pads.back() = rows - t.size(2);
  return at::constant_pad_nd(t, pads, fill);
}

}  // namespace linattn::restricted_generic
