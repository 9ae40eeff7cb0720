// Autograd of the restricted-softmax operators (sliding window, block-sparse; docs/methods.md
// §5–6), in C++ as for linear attention (common/autograd_support.h says why). The forwards save
// the per-row logsumexp; the backward operators recompute probabilities from it and are
// first-order only.
#include "../common/autograd_support.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace {

using Optional = std::optional<at::Tensor>;
using WindowForward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, const Optional&,
    const Optional&, double, const Optional&);
using WindowBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, int64_t, int64_t, int64_t, const Optional&, const Optional&, double, const Optional&);
using BlockForward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
    const Optional&, double, const Optional&, const Optional&, const Optional&, const Optional&);
using BlockBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const Optional&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, const Optional&, double,
    const Optional&, const Optional&, const Optional&, const Optional&);

constexpr char kWindowForward[] = "linattn::sliding_window_attn_fwd";
constexpr char kWindowBackward[] = "linattn::sliding_window_attn_bwd";
constexpr char kWindowForwardGeneric[] = "linattn::sliding_window_attn_fwd_generic";
constexpr char kWindowBackwardGeneric[] = "linattn::sliding_window_attn_bwd_generic";
constexpr char kBlockForward[] = "linattn::block_sparse_attn_fwd";
constexpr char kBlockBackward[] = "linattn::block_sparse_attn_bwd";
constexpr char kBlockForwardGeneric[] = "linattn::block_sparse_attn_fwd_generic";
constexpr char kBlockBackwardGeneric[] = "linattn::block_sparse_attn_bwd_generic";

template <const char* ForwardName, const char* BackwardName>
struct SlidingWindow : torch::autograd::Function<SlidingWindow<ForwardName, BackwardName>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, int64_t left, int64_t right, int64_t dilation,
                               const Optional& global_mask, const Optional& key_padding_mask,
                               double scale, const Optional& segment_ids) {
    static const auto op = linattn_op<WindowForward>(ForwardName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = op.call(q, k, v, left, right, dilation, global_mask, key_padding_mask, scale,
                              segment_ids);
    ctx->save_for_backward({q, k, v, out, lse, saved_of(global_mask), saved_of(key_padding_mask),
                            saved_of(segment_ids)});
    ctx->saved_data["window"] = c10::List<int64_t>({left, right, dilation});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = linattn_op<WindowBackward>(BackwardName);
    const auto saved = ctx->get_saved_variables();
    const auto window = ctx->saved_data["window"].toIntList();
    auto [grad_q, grad_k, grad_v] =
        op.call(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], window[0],
                window[1], window[2], optional_of(saved[5]), optional_of(saved[6]),
                ctx->saved_data["scale"].toDouble(), optional_of(saved[7]));
    return {grad_q, grad_k, grad_v, {}, {}, {}, {}, {}, {}, {}};
  }
};

template <const char* ForwardName, const char* BackwardName>
std::tuple<at::Tensor, at::Tensor> sliding_window_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t left, int64_t right,
    int64_t dilation, const Optional& global_mask, const Optional& key_padding_mask, double scale,
    const Optional& segment_ids) {
  if (!needs_graph(q, k, v)) {
    static const auto op = linattn_op<WindowForward>(ForwardName);
    return call_below_autograd(op, q, k, v, left, right, dilation, global_mask, key_padding_mask, scale, segment_ids);
  }
  auto r = SlidingWindow<ForwardName, BackwardName>::apply(q, k, v, left, right, dilation, global_mask,
                                                           key_padding_mask, scale, segment_ids);
  return {r[0], r[1]};
}

template <const char* ForwardName, const char* BackwardName>
struct BlockSparse : torch::autograd::Function<BlockSparse<ForwardName, BackwardName>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& layout, int64_t block_size,
                               bool causal, const Optional& key_padding_mask, double scale,
                               const Optional& bias, const Optional& q_segments,
                               const Optional& k_segments, const Optional& positions) {
    static const auto op = linattn_op<BlockForward>(ForwardName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = op.call(q, k, v, layout, block_size, causal, key_padding_mask, scale, bias,
                              q_segments, k_segments, positions);
    ctx->save_for_backward({q, k, v, out, lse, layout, saved_of(key_padding_mask), saved_of(bias),
                            saved_of(q_segments), saved_of(k_segments), saved_of(positions)});
    ctx->saved_data["options"] = c10::List<int64_t>({block_size, causal});
    ctx->saved_data["scale"] = scale;
    ctx->set_materialize_grads(false);
    return {out, lse};  // lse is differentiable: callers combine attentions by it (Reformer)
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = linattn_op<BlockBackward>(BackwardName);
    const auto saved = ctx->get_saved_variables();
    const auto options = ctx->saved_data["options"].toIntList();
    const at::Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(saved[3]);
    const Optional grad_lse = grads[1].defined() ? Optional(grads[1].contiguous()) : std::nullopt;
    auto [grad_q, grad_k, grad_v, grad_bias] =
        op.call(grad_out, grad_lse, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], options[0],
                options[1] != 0, optional_of(saved[6]), ctx->saved_data["scale"].toDouble(),
                optional_of(saved[7]), optional_of(saved[8]), optional_of(saved[9]), optional_of(saved[10]));
    if (!saved[7].defined()) grad_bias = at::Tensor();
    return {grad_q, grad_k, grad_v, {}, {}, {}, {}, {}, grad_bias, {}, {}, {}};
  }
};

template <const char* ForwardName, const char* BackwardName>
std::tuple<at::Tensor, at::Tensor> block_sparse_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& layout,
    int64_t block_size, bool causal, const Optional& key_padding_mask, double scale, const Optional& bias,
    const Optional& q_segments, const Optional& k_segments, const Optional& positions) {
  if (!needs_graph(q, k, v, bias)) {
    static const auto op = linattn_op<BlockForward>(ForwardName);
    return call_below_autograd(op, q, k, v, layout, block_size, causal, key_padding_mask, scale, bias, q_segments,
                               k_segments, positions);
  }
  auto r = BlockSparse<ForwardName, BackwardName>::apply(q, k, v, layout, block_size, causal, key_padding_mask,
                                                         scale, bias, q_segments, k_segments, positions);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, Autograd, m) {
  m.impl("sliding_window_attn_fwd", &sliding_window_autograd<kWindowForward, kWindowBackward>);
  m.impl("sliding_window_attn_fwd_generic",
         &sliding_window_autograd<kWindowForwardGeneric, kWindowBackwardGeneric>);
  m.impl("sliding_window_attn_bwd", &FirstOrderOnly<kWindowBackward, WindowBackward>::call);
  m.impl("sliding_window_attn_bwd_generic", &FirstOrderOnly<kWindowBackwardGeneric, WindowBackward>::call);
  m.impl("block_sparse_attn_fwd", &block_sparse_autograd<kBlockForward, kBlockBackward>);
  m.impl("block_sparse_attn_fwd_generic", &block_sparse_autograd<kBlockForwardGeneric, kBlockBackwardGeneric>);
  m.impl("block_sparse_attn_bwd", &FirstOrderOnly<kBlockBackward, BlockBackward>::call);
  m.impl("block_sparse_attn_bwd_generic", &FirstOrderOnly<kBlockBackwardGeneric, BlockBackward>::call);
}

}  // namespace linattn
