// Argument checks of the window attention operators, shared by the CPU kernel, the
// device-generic implementation and the Meta kernels (on SymInts, see common/checks.h).
#pragma once

#include "../common/checks.h"
#include "../common/philox.h"
#include "kernel.h"

#include <cmath>

namespace linattn {

constexpr const char* kRestrictedSoftmaxOp = "linattn.restricted_softmax";

struct WindowAttentionSizes {
  c10::SymInt batch, heads, q_len, k_len, head_dim, value_dim, kv_heads;
};

// The optional per-token and per-pair terms of a pattern (PairTerms in kernel.h), as tensors.
struct PairTermTensors {
  const std::optional<at::Tensor>& bias;        // (1 or H, T_q, T_k), q's dtype
  const std::optional<at::Tensor>& q_segments;  // (B, 1 or H, T_q) int64
  const std::optional<at::Tensor>& k_segments;  // (B, same, T_k) int64
  const std::optional<at::Tensor>& positions;   // (B, 1 or H, T) int64, T_q == T_k
  const std::optional<at::Tensor>& forget_cumsum;  // (B, H, T_k), the accumulation dtype, T_q <= T_k
};

inline void check_token_ids(const char* op, const char* name, const at::Tensor& ids, const at::Tensor& q,
                            const c10::SymInt& batch, const c10::SymInt& heads, const c10::SymInt& len,
                            const char* layout) {
  check_dim(op, name, ids, 3, layout);
  check_same_device(op, name, ids, "q", q);
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.sym_size(0) == batch && (ids.sym_size(1) == 1 || ids.sym_size(1) == heads) &&
                  ids.sym_size(2) == len,
              op, ": ", name, " must have shape (B=", batch, ", 1 or H=", heads, ", ", len, ") ", layout,
              ", got ", shape_str(ids));
}

inline void check_pair_terms(const char* op, const at::Tensor& q, const WindowAttentionSizes& s,
                             const PairTermTensors& t) {
  if (t.bias.has_value()) {
    check_dim(op, "bias", *t.bias, 3, "(1 or H, T_q, T_k)");
    check_same_device_dtype(op, "bias", *t.bias, "q", q);
    TORCH_CHECK((t.bias->sym_size(0) == 1 || t.bias->sym_size(0) == s.heads) &&
                    t.bias->sym_size(1) == s.q_len && t.bias->sym_size(2) == s.k_len,
                op, ": bias must have shape (1 or H=", s.heads, ", T_q=", s.q_len, ", T_k=", s.k_len,
                "), got ", shape_str(*t.bias));
  }
  TORCH_CHECK(t.q_segments.has_value() == t.k_segments.has_value(), op,
              ": q_segments and k_segments must be given together");
  if (t.q_segments.has_value()) {
    check_token_ids(op, "q_segments", *t.q_segments, q, s.batch, s.heads, s.q_len, "(B, 1 or H, T_q)");
    check_token_ids(op, "k_segments", *t.k_segments, q, s.batch, s.heads, s.k_len, "(B, 1 or H, T_k)");
    TORCH_CHECK(t.q_segments->sym_size(1) == t.k_segments->sym_size(1), op,
                ": q_segments and k_segments must have the same head dim, got ", shape_str(*t.q_segments),
                " and ", shape_str(*t.k_segments));
  }
  if (t.forget_cumsum.has_value()) {
    const at::Tensor& c = *t.forget_cumsum;
    check_same_device(op, "forget_cumsum", c, "q", q);
    TORCH_CHECK(c.scalar_type() == accumulate_type(q.scalar_type()), op, ": forget_cumsum must be ",
                accumulate_type(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", c.scalar_type());
    check_shape(op, "forget_cumsum", c, {s.batch, s.heads, s.k_len}, "(B, H, T_k)");
    TORCH_CHECK(s.q_len <= s.k_len, op, ": forget_cumsum needs T_q <= T_k (queries at the last T_q key positions), "
                "got T_q=", s.q_len, " and T_k=", s.k_len);
    TORCH_CHECK(!t.positions.has_value(), op, ": forget_cumsum does not combine with positions (a permuted "
                "sequence has no gate order)");
  }
  if (t.positions.has_value()) {
    TORCH_CHECK(s.q_len == s.k_len, op, ": positions need as many queries as keys, got T_q=", s.q_len,
                " and T_k=", s.k_len);
    check_token_ids(op, "positions", *t.positions, q, s.batch, s.heads, s.q_len, "(B, 1 or H, T)");
  }
}

inline void check_grad_lse(const char* op, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                           const WindowAttentionSizes& s) {
  if (!grad_lse.has_value()) return;
  check_same_device(op, "grad_lse", *grad_lse, "q", q);
  TORCH_CHECK(grad_lse->scalar_type() == accumulate_type(q.scalar_type()), op, ": grad_lse must be ",
              accumulate_type(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", grad_lse->scalar_type());
  check_shape(op, "grad_lse", *grad_lse, {s.batch, s.heads, s.q_len}, "(B, H, T_q)");
}

// The schema's pattern arguments (schema.cpp) as every kernel's parameter list spells them, and
// the RestrictedPattern they make: one spelling for the CPU, generic, Meta and autograd kernels.
#define LINATTN_RESTRICTED_PATTERN_PARAMS                                                          \
  int64_t window_left, int64_t window_right, int64_t dilation, bool causal,                        \
      const std::optional<at::Tensor>&layout, int64_t block_size,                                  \
      const std::optional<at::Tensor>&global_mask, const std::optional<at::Tensor>&key_padding_mask, \
      const std::optional<at::Tensor>&q_segments, const std::optional<at::Tensor>&k_segments,       \
      const std::optional<at::Tensor>&positions, const std::optional<at::Tensor>&bias, double softcap, \
      const std::optional<at::Tensor>&alibi_slopes, double dropout_p, const std::optional<at::Tensor>&dropout_seed, \
      const std::optional<at::Tensor>&forget_cumsum
#define LINATTN_RESTRICTED_PATTERN_ARGS                                                                    \
  window_left, window_right, dilation, causal, layout, block_size, global_mask, key_padding_mask, q_segments, \
      k_segments, positions, bias, softcap, alibi_slopes, dropout_p, dropout_seed, forget_cumsum

// The operators' signatures (schema.cpp), for typed handles to them (autograd, fallbacks).
using RestrictedForwardSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t, bool,
    const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
using RestrictedBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t, bool, const std::optional<at::Tensor>&,
    int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

// The backward's outputs: grad_q, grad_k, grad_v, grad_bias, grad_forget_cumsum (the last two of
// size 0 without their term).
using RestrictedGradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The pattern arguments of the schema, as every kernel receives them.
struct RestrictedPattern {
  int64_t left, right, dilation;
  bool causal;
  const std::optional<at::Tensor>& layout;
  int64_t block_size;
  const std::optional<at::Tensor>& global_mask;
  const std::optional<at::Tensor>& key_padding_mask;
  const std::optional<at::Tensor>& q_segments;
  const std::optional<at::Tensor>& k_segments;
  const std::optional<at::Tensor>& positions;
  const std::optional<at::Tensor>& bias;
  double softcap;  // > 0: scaled scores become softcap·tanh(s / softcap) before the bias; 0 = off
  const std::optional<at::Tensor>& alibi_slopes;  // (H) or (B, H) float32: −slope·|a − j| added after the cap
  double dropout_p;  // probabilities dropped with this probability (0 = none) by dropout_seed's Philox bits
  const std::optional<at::Tensor>& dropout_seed;  // CPU int64 (1)
  // (B, H, T_k) cumulative log forget gates c in the accumulation dtype: c_a − c_j added to the
  // scores of key j <= a (c_j − c_a past a), a = i + T_k − T_q (the Forgetting Transformer)
  const std::optional<at::Tensor>& forget_cumsum;

  bool drops() const { return dropout_p > 0; }
  // The dropout seed (read on the host: a CPU tensor); 0 without dropout.
  uint64_t seed() const { return drops() ? static_cast<uint64_t>(dropout_seed->item<int64_t>()) : 0; }
  // The threshold the pairs' Philox bits must reach to be kept, and the kept pairs' factor 1 / (1 − p)
  // (common/philox.h); 0 and 0 without dropout.
  uint32_t keep_threshold() const { return drops() ? dropout_threshold(dropout_p) : 0; }
  double keep_scale() const { return drops() ? 1.0 / (1.0 - dropout_p) : 0.0; }

  // The region is a layout of blocks, or else a sliding window (unbounded: every key).
  bool uses_layout() const { return layout.has_value(); }
  PairTermTensors terms() const { return {bias, q_segments, k_segments, positions, forget_cumsum}; }
  // The window's right bound with causality folded in.
  int64_t window_right() const { return causal ? 0 : right; }
};

inline void check_layout(const char* op, const at::Tensor& layout, int64_t block_size, const at::Tensor& q,
                         const WindowAttentionSizes& s) {
  TORCH_CHECK(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  check_dim(op, "layout", layout, 3, "(H or 1, ceil(T_q / block_size), ceil(T_k / block_size))");
  check_same_device(op, "layout", layout, "q", q);
  TORCH_CHECK(layout.scalar_type() == at::kBool, op, ": layout must be a bool tensor, got ", layout.scalar_type());
  const c10::SymInt q_blocks = (s.q_len + block_size - 1) / block_size;
  const c10::SymInt k_blocks = (s.k_len + block_size - 1) / block_size;
  TORCH_CHECK((layout.sym_size(0) == 1 || layout.sym_size(0) == s.heads) && layout.sym_size(1) == q_blocks &&
                  layout.sym_size(2) == k_blocks,
              op, ": layout must have shape (1 or H=", s.heads, ", ", q_blocks, ", ", k_blocks, ") for T_q=", s.q_len,
              ", T_k=", s.k_len, " and block_size=", block_size, ", got ", shape_str(layout));
}

// The forward's checks, shared by the CPU, device-generic and Meta kernels (on SymInts).
inline WindowAttentionSizes check_restricted_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale, const RestrictedPattern& p) {
  const char* op = kRestrictedSoftmaxOp;
  check_grouped_qkv(op, q, k, v);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(p.softcap) && p.softcap >= 0, op,
              ": softcap must be a finite number >= 0 (0 = no capping), got ", p.softcap);
  if (p.alibi_slopes.has_value()) {
    const at::Tensor& slopes = *p.alibi_slopes;
    check_same_device(op, "alibi_slopes", slopes, "q", q);
    TORCH_CHECK(slopes.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ", slopes.scalar_type());
    TORCH_CHECK((slopes.dim() == 1 && slopes.sym_size(0) == q.sym_size(1)) ||
                    (slopes.dim() == 2 && slopes.sym_size(0) == q.sym_size(0) && slopes.sym_size(1) == q.sym_size(1)),
                op, ": alibi_slopes must have shape (H=", q.sym_size(1), ") or (B=", q.sym_size(0), ", H=",
                q.sym_size(1), "), got ", shape_str(slopes));
  }
  TORCH_CHECK(std::isfinite(p.dropout_p) && p.dropout_p >= 0 && p.dropout_p < 1, op,
              ": dropout_p must be in [0, 1), got ", p.dropout_p);
  if (p.drops()) {
    TORCH_CHECK(p.dropout_seed.has_value(), op, ": dropout_p > 0 needs a dropout_seed");
    const at::Tensor& seed = *p.dropout_seed;
    // (Meta: fake tensors of any device come as meta; the real kernels see the CPU tensor.)
    const bool host = seed.device().is_cpu() || seed.device().is_meta();
    TORCH_CHECK(host && seed.scalar_type() == at::kLong && seed.dim() == 1 && seed.sym_numel() == 1,
                op, ": dropout_seed must be a CPU int64 tensor of shape (1,), got ", seed.scalar_type(), " ",
                shape_str(seed), " on ", seed.device());
  }
  const WindowAttentionSizes s{q.sym_size(0), q.sym_size(1), q.sym_size(2),
                               k.sym_size(2), q.sym_size(3), v.sym_size(3), k.sym_size(1)};
  check_key_mask(op, "key_padding_mask", p.key_padding_mask, q, k, "True = padded key");
  if (p.uses_layout()) {
    TORCH_CHECK(p.left == -1 && p.right == -1 && p.dilation == 1 && !p.global_mask.has_value(), op,
                ": a layout is a region of its own; pass it without a window (window_left = window_right = -1, "
                "dilation = 1, no global_mask), got window (", p.left, ", ", p.right, "), dilation ", p.dilation,
                p.global_mask.has_value() ? " and a global_mask" : "");
    check_layout(op, *p.layout, p.block_size, q, s);
  } else {
    TORCH_CHECK(p.left >= -1 && p.right >= -1, op, ": window bounds must be >= 0, or -1 for unbounded, got (",
                p.left, ", ", p.right, ")");
    TORCH_CHECK(p.dilation >= 1, op, ": dilation must be >= 1, got ", p.dilation);
    TORCH_CHECK(!p.bias.has_value() && !p.positions.has_value(), op,
                ": bias and positions are terms of a layout pattern; pass a layout (one block (1, 1, 1) of "
                "block_size max(T_q, T_k) covers every pair)");
    if (p.global_mask.has_value()) {
      TORCH_CHECK(s.q_len == s.k_len, op, ": global_mask needs as many queries as keys, got q ", shape_str(q),
                  " and k ", shape_str(k));
      TORCH_CHECK(!p.causal, op, ": global_mask needs causal=False (a global row sees every key)");
    }
    check_key_mask(op, "global_mask", p.global_mask, q, k, "True = global token");
  }
  check_pair_terms(op, q, s, p.terms());
  return s;
}

// The backward's: the forward's, and the saved outputs and cotangents.
inline WindowAttentionSizes check_restricted_backward_inputs(const at::Tensor& grad_out,
                                                             const std::optional<at::Tensor>& grad_lse,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& out,
                                                             const at::Tensor& lse, double scale,
                                                             const RestrictedPattern& p) {
  const char* op = kRestrictedSoftmaxOp;
  const WindowAttentionSizes s = check_restricted_inputs(q, k, v, scale, p);
  const std::vector<c10::SymInt> out_shape{s.batch, s.heads, s.q_len, s.value_dim};
  check_same_device_dtype(op, "grad_out", grad_out, "q", q);
  check_shape(op, "grad_out", grad_out, out_shape, "(B, H, T_q, dv)");
  check_same_device_dtype(op, "out", out, "q", q);
  check_shape(op, "out", out, out_shape, "(B, H, T_q, dv)");
  check_same_device(op, "lse", lse, "q", q);
  TORCH_CHECK(lse.scalar_type() == accumulate_type(q.scalar_type()), op, ": lse must be ",
              accumulate_type(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", lse.scalar_type());
  check_shape(op, "lse", lse, {s.batch, s.heads, s.q_len}, "(B, H, T_q)");
  check_grad_lse(op, grad_lse, q, s);
  return s;
}

// Grouped-query heads: query heads per key/value head (1 for an empty call).
inline int64_t kv_group_of(const at::Tensor& q, const at::Tensor& k) {
  return k.size(1) > 0 ? q.size(1) / k.size(1) : 1;
}

// Gradients of k or v computed per query head (B, H, T_k, ·) summed onto their shared heads
// (B, H / group, T_k, ·): the device-generic path's repeats, the flash engine's key blocks.
inline at::Tensor summed_per_shared_head(const at::Tensor& grad, int64_t group) {
  if (group == 1) return grad;
  return grad.view({grad.size(0), grad.size(1) / group, group, grad.size(2), grad.size(3)}).sum(2);
}

inline WindowAttentionShape window_kernel_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const RestrictedPattern& p, double scale) {
  WindowAttentionShape s;
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.kv_group = kv_group_of(q, k);
  s.q_len = q.size(2);
  s.k_len = k.size(2);
  s.head_dim = q.size(3);
  s.value_dim = v.size(3);
  s.left = p.left;
  s.right = p.window_right();
  s.dilation = p.dilation;
  s.scale = scale;
  s.softcap = p.softcap;
  s.dropout_seed = p.seed();
  s.dropout_threshold = p.keep_threshold();
  s.dropout_scale = p.keep_scale();
  return s;
}

}  // namespace linattn
