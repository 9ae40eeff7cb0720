// When the flash engine (forward.h) runs a call, and the problem it is given: the tensors' views
// and the visit plan, which key tiles each query tile reads. Shared by the CUDA launch
// (flash_cuda_ops.cpp) and the CPU emulation (flash_emulated.cpp). Host code only (ATen).
//
// The plan is built by ATen ops on the inputs' device, without reading anything back to the host
// (no device synchronisation, CUDA-graph capturable). A window needs none: the kernel walks its
// band; Longformer's global tokens are gathered instead (per batch entry their indices, ascending,
// by a stable sort, and which tiles hold one), their rows and keys computed in tiles of their
// own. A layout's (query tile, key tile) pairs each get a TileKind:
// - layouts: from 2-D prefix sums of the layout, the number of its blocks a tile covers that are
//   set: none hidden, all whole, else partial; above the diagonal hidden when causal.
// A tile with per-pair terms (padding, segments, positions), past the sequence's end or under
// dilation is partial at most. The visited tiles of each query tile are then listed first,
// ascending, by a stable sort.
#pragma once

#include "backward_block.h"
#include "../op_checks.h"
#include "../../common/autograd_support.h"
#include "../../common/tensor_views.h"
#include "../../common/warp/host_settings.h"

#include <ATen/ATen.h>

#include <limits>
#include <vector>

namespace linattn {
namespace flash {

// The streamed-tile buffers of the engine's forward (backward: of its backward) for this call, or 0
// where it does not take the call: 16-bit inputs, head dims 1 to 256 whose kernel's shared memory
// fits in what a block may have (buffers_for: an H100 takes every head dim double-buffered, an
// A100 D = 256 single-buffered).
inline int buffers_taking(const at::Tensor& q, const at::Tensor& v, bool backward, int64_t max_shared_bytes) {
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) return 0;
  const int64_t d = q.size(3), dv = v.size(3);
  if (d < 1 || dv < 1 || d > 256 || dv > 256 || !warp::tensor_cores_enabled()) return 0;
  return buffers_for(d, dv, backward, max_shared_bytes);
}

inline int64_t tiles_of(int64_t length, int64_t tile) { return (length + tile - 1) / tile; }

// The tile kinds (1, layout heads, q tiles, k tiles) uint8 of a layout pattern.
inline at::Tensor tile_kinds(const RestrictedPattern& p, int64_t q_len, int64_t k_len, const at::TensorOptions& on) {
  const auto index = on.dtype(at::kLong);
  const at::Tensor i0 = at::arange(tiles_of(q_len, kRows), index) * kRows;
  const at::Tensor j0 = at::arange(tiles_of(k_len, kKeys), index) * kKeys;
  const at::Tensor i1 = at::clamp_max(i0 + kRows, q_len), j1 = at::clamp_max(j0 + kKeys, k_len);
  const int64_t offset = k_len - q_len;
  const int64_t b = p.block_size;
  const at::Tensor set = p.layout->to(at::kInt);
  at::Tensor prefix = at::zeros({set.size(0), set.size(1) + 1, set.size(2) + 1}, set.options());
  prefix.narrow(1, 1, set.size(1)).narrow(2, 1, set.size(2)).copy_(set.cumsum(1).cumsum(2));
  const at::Tensor r0 = i0.div(b, "floor"), r1 = (i1 - 1).div(b, "floor") + 1;
  const at::Tensor c0 = j0.div(b, "floor"), c1 = (j1 - 1).div(b, "floor") + 1;
  auto at_blocks = [&](const at::Tensor& r, const at::Tensor& c) {
    return prefix.index_select(1, r).index_select(2, c);
  };
  const at::Tensor count = at_blocks(r1, c1) - at_blocks(r0, c1) - at_blocks(r1, c0) + at_blocks(r0, c0);
  const at::Tensor area = ((r1 - r0).unsqueeze(1) * (c1 - c0).unsqueeze(0)).unsqueeze(0);
  at::Tensor kind = at::where(count == 0, 0, at::where(count == area, 2, 1));
  if (p.causal && !p.positions.has_value()) {
    const at::Tensor last_aligned = (i1 - 1 + offset).unsqueeze(1), first_aligned = (i0 + offset).unsqueeze(1);
    kind = at::where(j0.unsqueeze(0) > last_aligned, 0, kind);
    kind = at::where((j1 - 1).unsqueeze(0) > first_aligned, at::clamp_max(kind, 1), kind);
  } else if (p.causal) {
    kind = at::clamp_max(kind, 1);  // positions: any pair may be hidden
  }
  kind = kind.unsqueeze(0);  // (1, layout heads, q tiles, k tiles)
  const bool per_pair = p.key_padding_mask.has_value() || p.q_segments.has_value() || p.positions.has_value();
  const at::Tensor ragged = (j1 - j0 < kKeys).view({1, 1, 1, -1});  // the last key tile, past the end
  kind = at::where(ragged, at::clamp_max(kind, 1), kind);
  if (per_pair) kind = at::clamp_max(kind, 1);
  return kind.to(at::kByte).contiguous();
}

// Per (batch, segment head, 64-token tile) the least and greatest id of a (B, heads, T) segment
// tensor: (B, heads, tiles, 2) int64 (padding past T takes neither).
inline at::Tensor segment_ranges(const at::Tensor& ids, int64_t tiles) {
  const int64_t pad = tiles * kRows - ids.size(2);
  auto padded = [&](int64_t value) {
    return at::constant_pad_nd(ids, {0, pad}, c10::Scalar(value)).view({ids.size(0), ids.size(1), tiles, kRows});
  };
  const at::Tensor least = padded(std::numeric_limits<int64_t>::max()).amin(-1);
  const at::Tensor greatest = padded(std::numeric_limits<int64_t>::min()).amax(-1);
  return at::stack({least, greatest}, -1).contiguous();
}

// The visit lists of a tile-kind tensor (..., tiles, other tiles): per row the count of visited
// tiles and the tiles, visited first and each group ascending (a stable sort of "not visited").
struct VisitLists {
  at::Tensor counts, tiles;
};
inline VisitLists visit_lists(const at::Tensor& kinds) {
  const at::Tensor visited = kinds > 0;
  return {visited.sum(-1).to(at::kInt).contiguous(),
          std::get<1>(at::sort(visited.logical_not().to(at::kByte), true, -1, false)).to(at::kInt).contiguous()};
}

// The problem of one call and the tensors it points into (contiguous copies, the plan, outputs).
template <typename scalar_t>
struct FlashCall {
  FlashProblem<scalar_t> problem;
  at::Tensor out, lse;
  at::Tensor kinds;  // the plan's tile kinds, or undefined without a plan
  std::vector<at::Tensor> held;

  template <typename T>
  const T* hold(const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return nullptr;
    held.push_back(t->contiguous());
    return held.back().const_data_ptr<T>();
  }
};

template <typename scalar_t>
FlashCall<scalar_t> prepare_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                 const RestrictedPattern& pattern, bool outputs = true) {
  FlashCall<scalar_t> call;
  FlashProblem<scalar_t>& p = call.problem;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_group = kv_group_of(q, k);
  p.q_len = q.size(2);
  p.k_len = k.size(2);
  p.head_dim = q.size(3);
  p.value_dim = v.size(3);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(pattern.softcap);
  p.dropout_seed = pattern.seed();
  p.dropout_threshold = pattern.keep_threshold();
  p.dropout_scale = static_cast<float>(pattern.keep_scale());
  p.q_tiles = tiles_of(p.q_len, kRows);
  p.k_tiles = tiles_of(p.k_len, kKeys);
  p.causal = pattern.causal;
  if (pattern.uses_layout()) {
    p.layout = call.template hold<bool>(pattern.layout);
    p.layout_heads = pattern.layout->size(0);
    p.q_blocks = pattern.layout->size(1);
    p.k_blocks = pattern.layout->size(2);
    p.block = pattern.block_size;
  } else {
    p.left = pattern.left;
    p.right = pattern.window_right();
    p.dilation = pattern.dilation;
    p.global_mask = call.template hold<bool>(pattern.global_mask);
  }
  p.key_padding = call.template hold<bool>(pattern.key_padding_mask);
  p.q_segments = call.template hold<int64_t>(pattern.q_segments);
  p.k_segments = call.template hold<int64_t>(pattern.k_segments);
  if (pattern.q_segments.has_value()) p.segment_heads = pattern.q_segments->size(1);
  p.positions = call.template hold<int64_t>(pattern.positions);
  if (pattern.positions.has_value()) p.position_heads = pattern.positions->size(1);
  if (pattern.q_segments.has_value()) {
    const at::Tensor q_range = segment_ranges(*pattern.q_segments, p.q_tiles);
    const at::Tensor k_range = segment_ranges(*pattern.k_segments, p.k_tiles);
    call.held.insert(call.held.end(), {q_range, k_range});
    p.q_segment_range = q_range.const_data_ptr<int64_t>();
    p.k_segment_range = k_range.const_data_ptr<int64_t>();
  }
  p.bias = call.template hold<scalar_t>(pattern.bias);
  p.alibi = call.template hold<float>(pattern.alibi_slopes);
  if (pattern.alibi_slopes.has_value()) p.alibi_batch_stride = pattern.alibi_slopes->dim() == 2 ? p.heads : 0;
  p.forget = call.template hold<float>(pattern.forget_cumsum);
  if (pattern.bias.has_value()) p.bias_heads = pattern.bias->size(0);
  if (pattern.global_mask.has_value()) {
    const at::Tensor& global = pattern.global_mask.value();
    const VisitLists lists = visit_lists(global.to(at::kByte));  // per batch entry: the global tokens first
    const at::Tensor tiles = at::constant_pad_nd(global, {0, p.q_tiles * kRows - p.q_len})
                                 .view({p.batch, p.q_tiles, kRows})
                                 .any(-1)
                                 .to(at::kByte)
                                 .contiguous();
    call.held.insert(call.held.end(), {lists.counts, lists.tiles, tiles});
    p.global_count = lists.counts.const_data_ptr<int32_t>();
    p.global_index = lists.tiles.const_data_ptr<int32_t>();
    p.global_tiles = tiles.const_data_ptr<uint8_t>();
  }
  if (pattern.uses_layout()) {
    call.kinds = tile_kinds(pattern, p.q_len, p.k_len, q.options());
    const VisitLists lists = visit_lists(call.kinds);
    call.held.insert(call.held.end(), {lists.counts, lists.tiles});
    p.tile_kinds = call.kinds.template const_data_ptr<uint8_t>();
    p.visit_counts = lists.counts.const_data_ptr<int32_t>();
    p.visit_tiles = lists.tiles.const_data_ptr<int32_t>();
    p.plan_batch = call.kinds.size(0);
    p.plan_heads = call.kinds.size(1);
  }
  p.q = view_of<scalar_t>(q);
  p.k = view_of<scalar_t>(k);
  p.v = view_of<scalar_t>(v);
  p.q_vector = warp::vector_rows<scalar_t>(q);
  p.k_vector = warp::vector_rows<scalar_t>(k);
  p.v_vector = warp::vector_rows<scalar_t>(v);
  if (outputs) {
    call.out = at::empty({p.batch, p.heads, p.q_len, p.value_dim}, q.options());
    call.lse = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(at::kFloat));
    p.out = call.out.template mutable_data_ptr<scalar_t>();
    p.lse = call.lse.template mutable_data_ptr<float>();
  }
  return call;
}

// The backward of one call: the forward's problem and plan, the gradients' problem (the plan
// transposed, delta), the gradients.
template <typename scalar_t>
struct FlashBackwardCall {
  FlashCall<scalar_t> forward;
  FlashGradients<scalar_t> gradients;
  at::Tensor grad_q, grad_k, grad_v, grad_bias;
  at::Tensor grad_forget_rows, grad_forget_keys;  // with forget gates (FlashGradients)
  std::vector<at::Tensor> held;

  // The forget gates' gradient (B, H, T_k): the keys' part, and the queries' part at their positions
  // (the last T_q); empty without gates.
  at::Tensor grad_forget(const at::Tensor& q) const {
    if (!grad_forget_keys.defined()) return at::empty({0}, q.options());
    at::Tensor grad = grad_forget_keys.clone();
    grad.narrow(2, grad.size(2) - grad_forget_rows.size(2), grad_forget_rows.size(2)).add_(grad_forget_rows);
    return grad;
  }
};

template <typename scalar_t>
FlashBackwardCall<scalar_t> prepare_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                                             const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& out, const at::Tensor& lse, double scale,
                                             const RestrictedPattern& pattern) {
  FlashBackwardCall<scalar_t> call{prepare_call<scalar_t>(q, k, v, scale, pattern, false)};
  FlashGradients<scalar_t>& g = call.gradients;
  const FlashProblem<scalar_t>& p = call.forward.problem;
  at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (grad_lse.has_value()) delta = delta - *grad_lse;
  call.held.insert(call.held.end(), {delta.contiguous(), lse.contiguous()});
  g.delta = call.held[0].template const_data_ptr<float>();
  g.lse = call.held[1].template const_data_ptr<float>();
  g.grad_out = view_of<scalar_t>(grad_out);
  g.grad_out_vector = warp::vector_rows<scalar_t>(grad_out);
  if (call.forward.kinds.defined()) {
    const at::Tensor seen = call.forward.kinds.transpose(-1, -2).contiguous();
    const VisitLists lists = visit_lists(seen);
    call.held.insert(call.held.end(), {seen, lists.counts, lists.tiles});
    g.seen_kinds = seen.const_data_ptr<uint8_t>();
    g.seen_counts = lists.counts.const_data_ptr<int32_t>();
    g.seen_tiles = lists.tiles.const_data_ptr<int32_t>();
  }
  call.grad_q = at::empty({p.batch, p.heads, p.q_len, p.head_dim}, q.options());
  call.grad_k = at::empty({p.batch, p.heads, p.k_len, p.head_dim}, q.options());
  call.grad_v = at::empty({p.batch, p.heads, p.k_len, p.value_dim}, q.options());
  g.grad_q = call.grad_q.template mutable_data_ptr<scalar_t>();
  g.grad_k = call.grad_k.template mutable_data_ptr<scalar_t>();
  g.grad_v = call.grad_v.template mutable_data_ptr<scalar_t>();
  if (pattern.bias.has_value()) {
    call.grad_bias = at::zeros(pattern.bias->sizes(), q.options().dtype(at::kFloat));
    g.grad_bias = call.grad_bias.template mutable_data_ptr<float>();
  }
  if (pattern.forget_cumsum.has_value()) {  // every token's entry is written (zeroed for safety all the same)
    call.grad_forget_rows = at::zeros({p.batch, p.heads, p.q_len}, q.options().dtype(at::kFloat));
    call.grad_forget_keys = at::zeros({p.batch, p.heads, p.k_len}, q.options().dtype(at::kFloat));
    g.grad_forget_rows = call.grad_forget_rows.template mutable_data_ptr<float>();
    g.grad_forget_keys = call.grad_forget_keys.template mutable_data_ptr<float>();
  }
  return call;
}

// Runs a call the engine takes: launch(problem) for its bf16 or fp16 problem; returns (out, lse).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> run_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            double scale, const RestrictedPattern& pattern, const Launch& launch) {
  auto run = [&](auto tag) -> std::tuple<at::Tensor, at::Tensor> {
    using scalar_t = decltype(tag);
    const FlashCall<scalar_t> call = prepare_call<scalar_t>(q, k, v, scale, pattern);
    launch(call.problem);
    return {call.out, call.lse};
  };
  return q.scalar_type() == at::kBFloat16 ? run(c10::BFloat16{}) : run(c10::Half{});
}

// Runs the backward of a call the backward takes: launch(problem, gradients); returns the
// gradients as restricted_softmax_bwd does (grad_bias in the bias's dtype, or empty; the forget gates'
// float32, or empty).
template <typename Launch>
RestrictedGradients run_backward_call(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale, const RestrictedPattern& pattern,
    const Launch& launch) {
  auto run = [&](auto tag) -> RestrictedGradients {
    using scalar_t = decltype(tag);
    const FlashBackwardCall<scalar_t> call =
        prepare_backward<scalar_t>(grad_out, grad_lse, q, k, v, out, lse, scale, pattern);
    launch(call.forward.problem, call.gradients);
    const at::Tensor grad_bias =
        pattern.bias.has_value() ? call.grad_bias.to(pattern.bias->scalar_type()) : at::empty({0}, q.options());
    // Grouped-query heads: the key blocks wrote dk and dv per query head, each block its own rows
    // (rounded to the input dtype), as flash-attn 2 does; summed onto the shared heads here.
    const int64_t group = call.forward.problem.kv_group;
    return {call.grad_q, summed_per_shared_head(call.grad_k, group), summed_per_shared_head(call.grad_v, group),
            grad_bias, call.grad_forget(q)};
  };
  return q.scalar_type() == at::kBFloat16 ? run(c10::BFloat16{}) : run(c10::Half{});
}

// A call the engine does not take: restricted_softmax_fwd (the CPU kernel, or the device-generic
// one on CUDA), called from below autograd.
inline std::tuple<at::Tensor, at::Tensor> unfused_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale,
                                                          LINATTN_RESTRICTED_PATTERN_PARAMS) {
  static const auto op = linattn_op<RestrictedForwardSignature>("linattn::restricted_softmax_fwd");
  return op.call(q, k, v, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
}

inline RestrictedGradients unfused_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  static const auto op = linattn_op<RestrictedBackwardSignature>("linattn::restricted_softmax_bwd");
  return op.call(grad_out, grad_lse, q, k, v, out, lse, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
}

}  // namespace flash
}  // namespace linattn
