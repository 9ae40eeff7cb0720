// CPU kernels of the restricted-softmax operator: validate, allocate, hand raw views to the
// fused kernels (cpu_kernel_impl.h, one build per instruction set) of the pattern's region.
#include "kernel.h"
#include "op_checks.h"
#include "../common/tensor_views.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace linattn {
namespace {

// The PairTerms of kernel.h for one call; holds the contiguous (and, for the bias,
// accumulate-type) copies the pointers refer to.
template <typename acc_t>
struct PairTermsHolder {
  at::Tensor bias, grad_bias, q_segments, k_segments, positions, forget_cumsum, grad_forget_cumsum;
  PairTerms<acc_t> terms;

  // with_grads: the backward's, which also allocates the terms' gradients.
  PairTermsHolder(const PairTermTensors& t, bool with_grads) {
    if (t.bias.has_value()) {
      bias = t.bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      terms.bias = bias.const_data_ptr<acc_t>();
      terms.bias_heads = bias.size(0);
      if (with_grads) {
        grad_bias = at::zeros_like(bias);
        terms.grad_bias = grad_bias.mutable_data_ptr<acc_t>();
      }
    }
    terms.q_segments = optional_ptr<int64_t>(t.q_segments, q_segments);
    terms.k_segments = optional_ptr<int64_t>(t.k_segments, k_segments);
    if (t.q_segments.has_value()) terms.segment_heads = t.q_segments->size(1);
    terms.positions = optional_ptr<int64_t>(t.positions, positions);
    if (t.positions.has_value()) terms.position_heads = t.positions->size(1);
    terms.forget_cumsum = optional_ptr<acc_t>(t.forget_cumsum, forget_cumsum);
    if (t.forget_cumsum.has_value() && with_grads) {
      grad_forget_cumsum = at::zeros_like(forget_cumsum);
      terms.grad_forget_cumsum = grad_forget_cumsum.mutable_data_ptr<acc_t>();
    }
  }
};

// The shape with the pattern's ALiBi slopes (a contiguous copy kept alive in `keep`).
WindowAttentionShape with_alibi(WindowAttentionShape s, const RestrictedPattern& p, at::Tensor& keep) {
  s.alibi = optional_ptr<float>(p.alibi_slopes, keep);
  if (s.alibi != nullptr) s.alibi_batch_stride = keep.dim() == 2 ? keep.size(1) : 0;
  return s;
}

BlockLayout block_layout(const at::Tensor& layout, int64_t block_size, bool causal) {
  BlockLayout b;
  b.data = layout.const_data_ptr<bool>();
  b.heads = layout.size(0);
  b.q_blocks = layout.size(1);
  b.k_blocks = layout.size(2);
  b.block = block_size;
  b.causal = causal;
  return b;
}

// One call of the schema (checked): the window kernels or the layout kernels, by the region.
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_inputs(q, k, v, scale, p);
  at::Tensor alibi;
  const WindowAttentionShape s = with_alibi(window_kernel_shape(q, k, v, p, scale), p, alibi);
  auto out = at::empty({s.batch, s.heads, s.q_len, s.value_dim}, q.options());
  auto lse = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(accumulate_type(q.scalar_type())));
  at::Tensor global, padding, layout_c = p.uses_layout() ? p.layout->contiguous() : at::Tensor();
  const bool* global_ptr = optional_ptr<bool>(p.global_mask, global);
  const bool* padding_ptr = optional_ptr<bool>(p.key_padding_mask, padding);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "restricted_softmax_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PairTermsHolder<acc_t> held(p.terms(), false);
    if (p.uses_layout()) {
      LINATTN_CPU_ISA_DISPATCH(block_sparse_attention_forward_cpu<scalar_t, acc_t>(
          s, block_layout(layout_c, p.block_size, p.causal), held.terms, view_of<scalar_t>(q), view_of<scalar_t>(k),
          view_of<scalar_t>(v), padding_ptr, out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>()));
    } else {
      LINATTN_CPU_ISA_DISPATCH(window_attention_forward_cpu<scalar_t, acc_t>(
          s, view_of<scalar_t>(q), view_of<scalar_t>(k), view_of<scalar_t>(v), global_ptr, padding_ptr, held.terms,
          out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>()));
    }
  });
  return {out, lse};
}

RestrictedGradients backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern p{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, scale, p);
  at::Tensor alibi;
  const WindowAttentionShape s = with_alibi(window_kernel_shape(q, k, v, p, scale), p, alibi);
  auto grad_q = at::empty({s.batch, s.heads, s.q_len, s.head_dim}, q.options());
  auto grad_k = at::empty({s.batch, s.kv_heads(), s.k_len, s.head_dim}, q.options());
  auto grad_v = at::empty({s.batch, s.kv_heads(), s.k_len, s.value_dim}, q.options());
  at::Tensor grad_bias = at::empty({0}, q.options()), grad_forget = at::empty({0}, q.options());
  const at::Tensor lse_c = lse.contiguous(), grad_out_c = grad_out.contiguous();
  at::Tensor global, padding, grad_lse_c, layout_c = p.uses_layout() ? p.layout->contiguous() : at::Tensor();
  const bool* global_ptr = optional_ptr<bool>(p.global_mask, global);
  const bool* padding_ptr = optional_ptr<bool>(p.key_padding_mask, padding);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "restricted_softmax_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PairTermsHolder<acc_t> held(p.terms(), true);
    if (p.uses_layout()) {
      LINATTN_CPU_ISA_DISPATCH(block_sparse_attention_backward_cpu<scalar_t, acc_t>(
          s, block_layout(layout_c, p.block_size, p.causal), held.terms, view_of<scalar_t>(grad_out_c),
          optional_ptr<acc_t>(grad_lse, grad_lse_c), view_of<scalar_t>(q), view_of<scalar_t>(k),
          view_of<scalar_t>(v), view_of<scalar_t>(out), lse_c.const_data_ptr<acc_t>(), padding_ptr,
          grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
          grad_v.mutable_data_ptr<scalar_t>()));
      if (p.bias.has_value()) grad_bias = held.grad_bias.to(p.bias->scalar_type());
    } else {
      LINATTN_CPU_ISA_DISPATCH(window_attention_backward_cpu<scalar_t, acc_t>(
          s, view_of<scalar_t>(grad_out_c), optional_ptr<acc_t>(grad_lse, grad_lse_c), view_of<scalar_t>(q),
          view_of<scalar_t>(k), view_of<scalar_t>(v),
          view_of<scalar_t>(out), lse_c.const_data_ptr<acc_t>(), global_ptr, padding_ptr, held.terms,
          grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
          grad_v.mutable_data_ptr<scalar_t>()));
    }
    if (p.forget_cumsum.has_value()) grad_forget = held.grad_forget_cumsum;
  });
  return {grad_q, grad_k, grad_v, grad_bias, grad_forget};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) {
  m.impl("restricted_softmax_fwd", &forward_cpu);
  m.impl("restricted_softmax_bwd", &backward_cpu);
}

}  // namespace linattn
