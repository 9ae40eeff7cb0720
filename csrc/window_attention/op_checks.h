// Argument checks of the window attention operators, shared by the CPU kernel, the
// device-generic implementation and the Meta kernels (on SymInts, see common/checks.h).
#pragma once

#include "../common/checks.h"
#include "kernel.h"

#include <cmath>

namespace linattn {

constexpr const char* kWindowAttentionOp = "linattn.sliding_window_attention";

struct WindowAttentionSizes {
  c10::SymInt batch, heads, q_len, k_len, head_dim, value_dim;
};

inline WindowAttentionSizes check_window_inputs(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, int64_t left, int64_t right,
                                                int64_t dilation,
                                                const std::optional<at::Tensor>& global_mask,
                                                const std::optional<at::Tensor>& key_padding_mask,
                                                double scale) {
  const char* op = kWindowAttentionOp;
  check_qkv(op, q, k, v);
  TORCH_CHECK(left >= -1 && right >= -1, op,
              ": window bounds must be >= 0, or -1 for unbounded, got (", left, ", ", right, ")");
  TORCH_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  WindowAttentionSizes s{q.sym_size(0), q.sym_size(1), q.sym_size(2),
                         k.sym_size(2), q.sym_size(3), v.sym_size(3)};
  if (global_mask.has_value())
    TORCH_CHECK(s.q_len == s.k_len, op, ": global_mask needs as many queries as keys, got q ",
                shape_str(q), " and k ", shape_str(k));
  check_key_mask(op, "global_mask", global_mask, q, k, "True = global token");
  check_key_mask(op, "key_padding_mask", key_padding_mask, q, k, "True = padded key");
  return s;
}

// The checks of the block-sparse operators: q, k, v, padding and scale as for windows, and a
// (H or 1, ceil(T_q/b), ceil(T_k/b)) bool layout.
inline WindowAttentionSizes check_block_sparse_inputs(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const at::Tensor& layout,
                                                      int64_t block_size,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      double scale) {
  const char* op = "linattn.block_sparse_attention";
  TORCH_CHECK(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  const WindowAttentionSizes s =
      check_window_inputs(q, k, v, -1, -1, 1, std::nullopt, key_padding_mask, scale);
  check_dim(op, "layout", layout, 3, "(H or 1, ceil(T_q / block_size), ceil(T_k / block_size))");
  check_same_device(op, "layout", layout, "q", q);
  TORCH_CHECK(layout.scalar_type() == at::kBool, op, ": layout must be a bool tensor, got ",
              layout.scalar_type());
  const c10::SymInt q_blocks = (s.q_len + block_size - 1) / block_size;
  const c10::SymInt k_blocks = (s.k_len + block_size - 1) / block_size;
  TORCH_CHECK((layout.sym_size(0) == 1 || layout.sym_size(0) == s.heads) &&
                  layout.sym_size(1) == q_blocks && layout.sym_size(2) == k_blocks,
              op, ": layout must have shape (1 or H=", s.heads, ", ", q_blocks, ", ", k_blocks,
              ") for T_q=", s.q_len, ", T_k=", s.k_len, " and block_size=", block_size, ", got ",
              shape_str(layout));
  return s;
}

inline void check_window_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                         const at::Tensor& out, const at::Tensor& lse,
                                         const WindowAttentionSizes& s) {
  const char* op = kWindowAttentionOp;
  const std::vector<c10::SymInt> out_shape{s.batch, s.heads, s.q_len, s.value_dim};
  check_same_device_dtype(op, "grad_out", grad_out, "q", q);
  check_shape(op, "grad_out", grad_out, out_shape, "(B, H, T_q, dv)");
  check_same_device_dtype(op, "out", out, "q", q);
  check_shape(op, "out", out, out_shape, "(B, H, T_q, dv)");
  check_same_device(op, "lse", lse, "q", q);
  TORCH_CHECK(lse.scalar_type() == accumulate_type(q.scalar_type()), op, ": lse must be ",
              accumulate_type(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ",
              lse.scalar_type());
  check_shape(op, "lse", lse, {s.batch, s.heads, s.q_len}, "(B, H, T_q)");
}

inline WindowAttentionShape window_kernel_shape(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, int64_t left, int64_t right,
                                                int64_t dilation, double scale) {
  WindowAttentionShape s;
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.q_len = q.size(2);
  s.k_len = k.size(2);
  s.head_dim = q.size(3);
  s.value_dim = v.size(3);
  s.left = left;
  s.right = right;
  s.dilation = dilation;
  s.scale = scale;
  return s;
}

}  // namespace linattn
