// Device-generic restricted softmax (windows and block layouts): the same operator in ATen ops, for CUDA and
// every other backend, and under the *_generic name so the tests run it on CPU tensors. Window patterns
// run whole tiles of query blocks per call (generic_window.cpp). Block layouts walk query blocks of 128
// rows on the host; each gathers the keys of the layout blocks its rows touch and runs the shared tile
// arithmetic (generic_tile.cpp), so memory stays O(T·(block + visible keys)), never T×T; their plan
// reads the layout on the host (a device sync on GPUs).
#include "generic_tile.h"
#include "generic_window.h"
#include "op_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <functional>
#include <limits>
#include <vector>

namespace linattn {
namespace {

constexpr int64_t kGenericBlock = 128;

struct BlockPlan {
  int64_t i0, i1;
  at::Tensor keys;  // int64 key indices on the device
};

// Rows [i0, i1) of a (B, 1 or H, T) per-token tensor against `keys`: (B, ., L, 1) and (B, ., 1, n).
std::pair<at::Tensor, at::Tensor> token_pairs(const at::Tensor& ids_q, const at::Tensor& ids_k, int64_t i0,
                                              int64_t i1, const at::Tensor& keys) {
  return {ids_q.narrow(2, i0, i1 - i0).unsqueeze(-1), ids_k.index_select(2, keys).unsqueeze(-2)};
}

using restricted_generic::PairBlock;
using Visibility = std::function<PairBlock(int64_t i0, int64_t i1, const at::Tensor& keys)>;

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
    const auto [out, lse] = restricted_generic::tile_forward(
        Q.narrow(2, block.i0, block.i1 - block.i0), K.index_select(2, block.keys), V.index_select(2, block.keys),
        visibility(block.i0, block.i1, block.keys));
    outs.push_back(out);
    lses.push_back(lse);
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
  const at::Tensor delta = restricted_generic::softmax_delta(G, out, grad_lse);
  at::Tensor dQ = at::zeros_like(Q), dK = at::zeros_like(K), dV = at::zeros_like(V);
  at::Tensor dBias = bias.has_value() ? at::zeros(bias->sizes(), Q.options()) : at::empty({0}, q.options());
  for (const BlockPlan& block : plan) {
    if (block.keys.numel() == 0) continue;  // rows without keys pass no gradient
    const int64_t L = block.i1 - block.i0;
    const restricted_generic::TileGradients grads = restricted_generic::tile_backward(
        Q.narrow(2, block.i0, L), K.index_select(2, block.keys), V.index_select(2, block.keys),
        G.narrow(2, block.i0, L), lse.narrow(2, block.i0, L), delta.narrow(2, block.i0, L), scale,
        visibility(block.i0, block.i1, block.keys));
    dV.index_add_(2, block.keys, grads.dV);
    dQ.narrow(2, block.i0, L).copy_(grads.dQ);
    dK.index_add_(2, block.keys, grads.dK);
    if (bias.has_value()) {
      at::Tensor per_head = grads.dS.sum(0);  // (H, L, n)
      if (bias->size(0) == 1) per_head = per_head.sum(0, true);
      dBias.narrow(1, block.i0, L).index_add_(2, block.keys, per_head);
    }
  }
  const auto dtype = q.scalar_type();
  if (bias.has_value()) dBias = dBias.to(bias->scalar_type());
  return {dQ.to(dtype).contiguous(), dK.to(dtype).contiguous(), dV.to(dtype).contiguous(), dBias};
}

// Block-sparse: each query block visits the key blocks present in the layout rows it touches
// (for any head; read on the host, a sync on GPUs); causal on indices also drops later keys.
std::vector<BlockPlan> plan_layout_blocks(const WindowAttentionShape& s, const RestrictedPattern& pattern,
                                          const at::TensorOptions& index_options) {
  const int64_t block_size = pattern.block_size;
  const bool index_causal = pattern.causal && !pattern.positions.has_value();
  const at::Tensor rows = pattern.layout->any(0).cpu();  // (q_blocks, k_blocks)
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

Visibility layout_visibility(const WindowAttentionShape& s, const RestrictedPattern& p) {
  const at::Tensor& layout = *p.layout;
  const int64_t block_size = p.block_size;
  const bool causal = p.causal;
  const std::optional<at::Tensor>& key_padding_mask = p.key_padding_mask;
  const PairTermTensors t = p.terms();
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

std::tuple<at::Tensor, at::Tensor> forward_generic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_inputs(q, k, v, scale, p);
  const WindowAttentionShape s = window_kernel_shape(q, k, v, p.left, p.window_right(), p.dilation, scale);
  if (!p.uses_layout()) return restricted_generic::window_forward(q, k, v, scale, s, p);
  return engine_forward(q, k, v, scale, plan_layout_blocks(s, p, q.options().dtype(at::kLong)), layout_visibility(s, p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, scale, p);
  const WindowAttentionShape s = window_kernel_shape(q, k, v, p.left, p.window_right(), p.dilation, scale);
  if (!p.uses_layout()) {
    auto [dq, dk, dv] = restricted_generic::window_backward(grad_out, grad_lse, q, k, v, out, lse, scale, s, p);
    return {dq, dk, dv, at::empty({0}, q.options())};
  }
  return engine_backward(grad_out, grad_lse, q, k, v, out, lse, scale, plan_layout_blocks(s, p, q.options().dtype(at::kLong)),
                         layout_visibility(s, p), p.bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CompositeExplicitAutograd, m) {
  for (const char* name : {"restricted_softmax_fwd", "restricted_softmax_fwd_generic"}) m.impl(name, &forward_generic);
  for (const char* name : {"restricted_softmax_bwd", "restricted_softmax_bwd_generic"}) m.impl(name, &backward_generic);
}

}  // namespace linattn
