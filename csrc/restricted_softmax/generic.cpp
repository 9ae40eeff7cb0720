// Device-generic restricted softmax (windows and block layouts): the same operator in ATen ops, for CUDA and
// every other backend, and under the *_generic name so the tests run it on CPU tensors. A host loop walks
// query blocks of 128 rows; each gathers the keys its window can reach (plus global keys) and
// runs a masked softmax over them, so memory stays O(T·(block + window)), never T×T. With
// global tokens the block/key plan reads global_mask on the host (a device sync on GPUs).
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <functional>
#include <limits>
#include <vector>

namespace linattn {
namespace {

constexpr int64_t kGenericBlock = 128;

// A·X over the visible pairs only: masked entries of A are 0 already, and a non-finite entry of
// X is taken out of the product; the outputs that see one (through a visible pair) are NaN.
at::Tensor masked_matmul(const at::Tensor& A, const at::Tensor& visible, const at::Tensor& X) {
  const at::Tensor finite = at::isfinite(X);
  const at::Tensor product = at::matmul(A, at::where(finite, X, at::zeros({}, X.options())));
  const at::Tensor sees_non_finite =
      at::matmul(visible.to(X.scalar_type()), at::logical_not(finite).to(X.scalar_type())) > 0;
  return at::where(sees_non_finite, at::full({}, NAN, X.options()), product);
}

struct BlockPlan {
  int64_t i0, i1;
  at::Tensor keys;  // int64 key indices on the device
};

// The query blocks and the keys each one visits (its window band, or every key when one of its
// rows is global in some batch entry, plus the global keys outside the band).
std::vector<BlockPlan> plan_blocks(const WindowAttentionShape& s,
                                   const std::optional<at::Tensor>& global_mask,
                                   const at::TensorOptions& index_options) {
  at::Tensor global_rows, global_keys;
  if (global_mask.has_value()) {
    const at::Tensor any = global_mask->any(0).cpu();
    global_rows = any;
    global_keys = any.nonzero().flatten();
  }
  std::vector<BlockPlan> plan;
  for (int64_t i0 = 0; i0 < s.q_len; i0 += kGenericBlock) {
    const int64_t i1 = std::min(s.q_len, i0 + kGenericBlock);
    int64_t begin = s.band_begin(i0), end = std::max(begin, s.band_end(i1));
    at::Tensor extra;
    if (global_mask.has_value()) {
      if (global_rows.narrow(0, i0, i1 - i0).any().item<bool>()) {
        begin = 0;
        end = s.k_len;
      } else {
        extra = global_keys.index({at::logical_or(global_keys < begin, global_keys >= end)});
      }
    }
    at::Tensor keys = at::arange(begin, end, index_options);
    if (extra.defined() && extra.numel() > 0) keys = at::cat({keys, extra.to(index_options.device())});
    plan.push_back({i0, i1, keys});
  }
  return plan;
}

// Rows [i0, i1) of a (B, 1 or H, T) per-token tensor against `keys`: (B, ., L, 1) and (B, ., 1, n).
std::pair<at::Tensor, at::Tensor> token_pairs(const at::Tensor& ids_q, const at::Tensor& ids_k, int64_t i0,
                                              int64_t i1, const at::Tensor& keys) {
  return {ids_q.narrow(2, i0, i1 - i0).unsqueeze(-1), ids_k.index_select(2, keys).unsqueeze(-2)};
}

// Visibility (B, 1 or H, L, n) of rows [i0, i1) against `keys`.
at::Tensor visibility(const WindowAttentionShape& s, int64_t i0, int64_t i1, const at::Tensor& keys,
                      const RestrictedPattern& p) {
  const std::optional<at::Tensor>& global_mask = p.global_mask;
  const std::optional<at::Tensor>& key_padding_mask = p.key_padding_mask;
  const at::Tensor rows = at::arange(i0, i1, keys.options()).unsqueeze(-1);
  const at::Tensor d = rows + (s.k_len - s.q_len) - keys.unsqueeze(0);  // (L, n)
  at::Tensor in_window = at::ones_like(d, d.options().dtype(at::kBool));
  if (s.left >= 0) in_window = in_window.logical_and(d <= s.left);
  if (s.right >= 0) in_window = in_window.logical_and(d >= -s.right);
  if (s.dilation > 1) in_window = in_window.logical_and(d.remainder(s.dilation) == 0);
  at::Tensor visible = in_window.unsqueeze(0).expand({s.batch, i1 - i0, keys.size(0)});
  if (global_mask.has_value()) {
    const at::Tensor g_rows = global_mask->narrow(1, i0, i1 - i0).unsqueeze(-1);
    const at::Tensor g_keys = global_mask->index_select(1, keys).unsqueeze(1);
    visible = visible.logical_or(g_rows).logical_or(g_keys);
  }
  if (key_padding_mask.has_value())
    visible = visible.logical_and(key_padding_mask->index_select(1, keys).logical_not().unsqueeze(1));
  visible = visible.unsqueeze(1);
  if (p.q_segments.has_value()) {
    const auto [seg_q, seg_k] = token_pairs(*p.q_segments, *p.k_segments, i0, i1, keys);
    visible = visible.logical_and(seg_q == seg_k);
  }
  return visible;
}

// What a pattern says about rows [i0, i1) against `keys`: visibility (B or 1, H or 1, L, n),
// and optionally a score bias (1, H or 1, L, n) and the visible pairs whose score is fixed at
// kSelfScore (a token's own key under shared QK; no score gradient).
struct PairBlock {
  at::Tensor visible, bias, fixed;
};
using Visibility = std::function<PairBlock(int64_t i0, int64_t i1, const at::Tensor& keys)>;

// The scores of a block with the pattern's bias and fixed scores applied.
at::Tensor adjusted_scores(at::Tensor scores, const PairBlock& pairs) {
  if (pairs.bias.defined()) scores = scores + pairs.bias;
  if (pairs.fixed.defined()) scores = at::where(pairs.fixed, kSelfScore, scores);
  return scores;
}

// Softmax over the keys of each planned query block, with the pattern's (B or 1, H or 1, L, n)
// visibility; returns out (input dtype) and lse.
std::tuple<at::Tensor, at::Tensor> engine_forward(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, double scale,
                                                  const std::vector<BlockPlan>& plan,
                                                  const Visibility& visibility) {
  const auto acc = accumulate_type(q.scalar_type());
  const at::Tensor Q = q.to(acc) * scale, K = k.to(acc), V = v.to(acc);
  const int64_t B = q.size(0), H = q.size(1), dv = v.size(3);
  std::vector<at::Tensor> outs, lses;
  const double inf = std::numeric_limits<double>::infinity();
  for (const BlockPlan& block : plan) {
    if (block.keys.numel() == 0) {  // no key at all: zero rows, lse = −inf
      outs.push_back(at::zeros({B, H, block.i1 - block.i0, dv}, V.options()));
      lses.push_back(at::full({B, H, block.i1 - block.i0}, -inf, V.options()));
      continue;
    }
    const at::Tensor Kb = K.index_select(2, block.keys), Vb = V.index_select(2, block.keys);
    const PairBlock pairs = visibility(block.i0, block.i1, block.keys);
    const at::Tensor& visible = pairs.visible;
    const at::Tensor scores =
        adjusted_scores(at::matmul(Q.narrow(2, block.i0, block.i1 - block.i0), Kb.transpose(-1, -2)), pairs);
    const at::Tensor row_max = scores.masked_fill(visible.logical_not(), -inf).amax(-1, true);
    // A row without visible keys is shifted by 0 (its probabilities are all 0, its output 0);
    // one whose visible scores are all −inf keeps −inf, so −inf − −inf gives NaN, as softmax does.
    const at::Tensor shift = at::where(visible.any(-1, true), row_max, 0);
    const at::Tensor probs = at::where(visible, (scores - shift).exp(), 0);
    const at::Tensor sum = probs.sum(-1, true);
    const at::Tensor out = masked_matmul(probs, visible, Vb);
    outs.push_back(at::where(sum == 0, 0, out / sum));
    lses.push_back(at::where(sum == 0, -inf, shift + sum.log()).squeeze(-1));
  }
  at::Tensor out = outs.empty() ? at::empty({B, H, 0, dv}, V.options()) : at::cat(outs, 2);
  at::Tensor lse = lses.empty() ? at::empty({B, H, 0}, V.options()) : at::cat(lses, 2);
  return {out.to(q.scalar_type()).contiguous(), lse.contiguous()};
}

// Gradients of q, k, v, and of the bias (shape bias_shape, accumulate type) when the pattern
// has one; grad_lse (nullable) is the cotangent of lse, entering as δ − grad_lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> engine_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale, const std::vector<BlockPlan>& plan,
    const Visibility& visibility, const std::optional<at::Tensor>& bias = std::nullopt) {
  const auto acc = accumulate_type(q.scalar_type());
  const at::Tensor Q = q.to(acc) * scale, K = k.to(acc), V = v.to(acc), G = grad_out.to(acc);
  // δ_i = dO_i · O_i, a zero cotangent contributing nothing (not 0·O, NaN for NaN O).
  at::Tensor delta = at::where(G == 0, 0, G * out.to(acc)).sum(-1, true);
  if (grad_lse.has_value()) delta = delta - grad_lse->unsqueeze(-1);
  at::Tensor dQ = at::zeros_like(Q), dK = at::zeros_like(K), dV = at::zeros_like(V);
  at::Tensor dBias = bias.has_value() ? at::zeros(bias->sizes(), Q.options()) : at::empty({0}, q.options());
  const double inf = std::numeric_limits<double>::infinity();
  for (const BlockPlan& block : plan) {
    if (block.keys.numel() == 0) continue;  // rows without keys pass no gradient
    const int64_t L = block.i1 - block.i0;
    const at::Tensor Kb = K.index_select(2, block.keys), Vb = V.index_select(2, block.keys);
    const at::Tensor Qb = Q.narrow(2, block.i0, L), Gb = G.narrow(2, block.i0, L);
    const at::Tensor lse_b = lse.narrow(2, block.i0, L).unsqueeze(-1);
    const PairBlock pairs = visibility(block.i0, block.i1, block.keys);
    const at::Tensor visible = pairs.visible.logical_and(lse_b != -inf);
    const at::Tensor probs =
        at::where(visible, (adjusted_scores(at::matmul(Qb, Kb.transpose(-1, -2)), pairs) - lse_b).exp(), 0);
    const at::Tensor visible_t = visible.transpose(-1, -2);
    dV.index_add_(2, block.keys, masked_matmul(probs.transpose(-1, -2), visible_t, Gb));
    const at::Tensor dP = at::matmul(Gb, Vb.transpose(-1, -2));
    const at::Tensor scored = pairs.fixed.defined() ? visible.logical_and(pairs.fixed.logical_not()) : visible;
    const at::Tensor dS = at::where(scored, probs * (dP - delta.narrow(2, block.i0, L)), 0);
    dQ.narrow(2, block.i0, L).copy_(masked_matmul(dS, visible, Kb) * scale);
    dK.index_add_(2, block.keys, masked_matmul(dS.transpose(-1, -2), visible_t, Qb));
    if (bias.has_value()) {
      at::Tensor per_head = dS.sum(0);  // (H, L, n)
      if (bias->size(0) == 1) per_head = per_head.sum(0, true);
      dBias.narrow(1, block.i0, L).index_add_(2, block.keys, per_head);
    }
  }
  const auto dtype = q.scalar_type();
  if (bias.has_value()) dBias = dBias.to(bias->scalar_type());
  return {dQ.to(dtype).contiguous(), dK.to(dtype).contiguous(), dV.to(dtype).contiguous(), dBias};
}

Visibility window_visibility(const WindowAttentionShape& s, const RestrictedPattern& p) {
  return [&s, &p](int64_t i0, int64_t i1, const at::Tensor& keys) {
    return PairBlock{visibility(s, i0, i1, keys, p), {}, {}};
  };
}

// Block-sparse: each query block visits the key blocks present in the layout rows it touches
// (for any head; read on the host, a sync on GPUs); causal on indices also drops later keys.
std::vector<BlockPlan> plan_layout_blocks(const WindowAttentionShape& s, const at::Tensor& layout,
                                          int64_t block_size, bool index_causal,
                                          const at::TensorOptions& index_options) {
  const at::Tensor rows = layout.any(0).cpu();  // (q_blocks, k_blocks)
  std::vector<BlockPlan> plan;
  for (int64_t i0 = 0; i0 < s.q_len; i0 += kGenericBlock) {
    const int64_t i1 = std::min(s.q_len, i0 + kGenericBlock);
    const at::Tensor present = rows.narrow(0, i0 / block_size, (i1 - 1) / block_size - i0 / block_size + 1).any(0);
    const int64_t last_key = index_causal ? i1 - 1 + (s.k_len - s.q_len) : s.k_len - 1;
    std::vector<int64_t> keys;
    const bool* p = present.const_data_ptr<bool>();
    for (int64_t kb = 0; kb < present.size(0); ++kb)
      if (p[kb])
        for (int64_t j = kb * block_size; j < std::min(s.k_len, (kb + 1) * block_size) && j <= last_key; ++j)
          keys.push_back(j);
    plan.push_back({i0, i1, at::tensor(keys, at::TensorOptions().dtype(at::kLong)).to(index_options.device())});
  }
  return plan;
}

Visibility layout_visibility(const WindowAttentionShape& s, const at::Tensor& layout, int64_t block_size,
                             bool causal, const std::optional<at::Tensor>& key_padding_mask,
                             const PairTermTensors& t) {
  return [&s, &layout, block_size, causal, &key_padding_mask, t](int64_t i0, int64_t i1, const at::Tensor& keys) {
    const at::Tensor rows = at::arange(i0, i1, keys.options());
    PairBlock pairs;
    at::Tensor visible = layout.index_select(1, rows.div(block_size, "floor"))
                             .index_select(2, keys.div(block_size, "floor"))
                             .unsqueeze(0);  // (1, H or 1, L, n)
    at::Tensor pos_q, pos_k;
    if (t.positions.has_value()) std::tie(pos_q, pos_k) = token_pairs(*t.positions, *t.positions, i0, i1, keys);
    if (causal && pos_q.defined())
      visible = visible.logical_and(pos_k <= pos_q);
    else if (causal)
      visible = visible.logical_and(keys.unsqueeze(0) <= rows.unsqueeze(-1) + (s.k_len - s.q_len));
    if (t.q_segments.has_value()) {
      const auto [seg_q, seg_k] = token_pairs(*t.q_segments, *t.k_segments, i0, i1, keys);
      visible = visible.logical_and(seg_q == seg_k);
    }
    if (key_padding_mask.has_value())
      visible = visible.logical_and(
          key_padding_mask->index_select(1, keys).logical_not().unsqueeze(1).unsqueeze(1));
    if (t.bias.has_value())
      pairs.bias = t.bias->narrow(1, i0, i1 - i0).index_select(2, keys).unsqueeze(0).to(accumulate_type(t.bias->scalar_type()));
    if (pos_q.defined()) pairs.fixed = visible.logical_and(pos_k == pos_q);
    pairs.visible = visible;
    return pairs;
  };
}

// The query blocks and the keys each one visits, by the pattern's region.
std::vector<BlockPlan> plan(const WindowAttentionShape& s, const RestrictedPattern& p, const at::Tensor& q) {
  const auto index_options = q.options().dtype(at::kLong);
  if (!p.uses_layout()) return plan_blocks(s, p.global_mask, index_options);
  return plan_layout_blocks(s, *p.layout, p.block_size, p.causal && !p.positions.has_value(), index_options);
}

Visibility pattern_visibility(const WindowAttentionShape& s, const RestrictedPattern& p) {
  if (!p.uses_layout()) return window_visibility(s, p);
  return layout_visibility(s, *p.layout, p.block_size, p.causal, p.key_padding_mask, p.terms());
}

std::tuple<at::Tensor, at::Tensor> forward_generic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_inputs(q, k, v, scale, p);
  const WindowAttentionShape s = window_kernel_shape(q, k, v, p.left, p.window_right(), p.dilation, scale);
  return engine_forward(q, k, v, scale, plan(s, p, q), pattern_visibility(s, p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, scale, p);
  const WindowAttentionShape s = window_kernel_shape(q, k, v, p.left, p.window_right(), p.dilation, scale);
  return engine_backward(grad_out, grad_lse, q, k, v, out, lse, scale, plan(s, p, q), pattern_visibility(s, p),
                         p.bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CompositeExplicitAutograd, m) {
  for (const char* name : {"restricted_softmax_fwd", "restricted_softmax_fwd_generic"}) m.impl(name, &forward_generic);
  for (const char* name : {"restricted_softmax_bwd", "restricted_softmax_bwd_generic"}) m.impl(name, &backward_generic);
}

}  // namespace linattn
