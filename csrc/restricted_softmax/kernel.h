// Kernel interface of the restricted-softmax family (docs/methods.md §5): softmax attention in which
// query i sees key j only when visible(i, j). Raw pointers, strides and sizes only.
//
// Sliding window with flash-attn's window_size meaning: with the query aligned to key
// a = i + (T_k − T_q) (bottom-right alignment), key j is in the window when
// a − left <= j <= a + right (a negative bound is unbounded) and, with dilation d, (a − j) is a
// multiple of d. Longformer global tokens (T_q == T_k): a global row sees every key, every row
// sees the global keys. A padded key is seen by no row.
#pragma once

#include "../common/cpu_isa.h"
#include "../common/strided.h"

#include <cstdint>

namespace linattn {

struct WindowAttentionShape {
  int64_t batch = 0;
  int64_t heads = 0;
  // Grouped-query attention: query head h reads key/value head h / kv_group (k and v have
  // heads / kv_group heads; their gradients too).
  int64_t kv_group = 1;
  int64_t q_len = 0;
  int64_t k_len = 0;
  int64_t head_dim = 0;   // D of q and k
  int64_t value_dim = 0;  // dv
  int64_t left = -1;      // window bounds, -1 = unbounded
  int64_t right = -1;
  int64_t dilation = 1;
  double scale = 1.0;
  double softcap = 0.0;   // > 0: scaled scores capped to softcap·tanh(s / softcap), before any bias
  // ALiBi (flash-attn's): −alibi[b · alibi_batch_stride + h] · |i + T_k − T_q − j| added to the
  // (capped) scores, before any bias; null = none. Contiguous float32, (H) (stride 0) or (B, H).
  const float* alibi = nullptr;
  int64_t alibi_batch_stride = 0;
  // Dropout (common/philox.h): pair (b, h, i, j) is kept when dropout_bits(dropout_seed, b · H + h,
  // i, j) >= dropout_threshold, and its probability scaled by dropout_scale; scale 0 = no dropout.
  uint64_t dropout_seed = 0;
  uint32_t dropout_threshold = 0;
  double dropout_scale = 0.0;
  bool drops() const { return dropout_scale != 0.0; }

  int64_t kv_heads() const { return heads / kv_group; }
  int64_t kv_head(int64_t h) const { return h / kv_group; }

  // The keys [begin, end) that rows [i0, i1) can see through their window.
  int64_t band_begin(int64_t i0) const {
    if (left < 0) return 0;
    const int64_t b = i0 + (k_len - q_len) - left;
    return b < 0 ? 0 : (b > k_len ? k_len : b);
  }
  int64_t band_end(int64_t i1) const {
    if (right < 0) return k_len;
    const int64_t e = i1 - 1 + (k_len - q_len) + right + 1;
    return e < 0 ? 0 : (e > k_len ? k_len : e);
  }
};

// A block-sparse layout (docs/methods.md §6): data (heads, q_blocks, k_blocks) bool, contiguous, with
// heads 1 (shared) or H; query i sees key j when data[h, i / block, j / block] (and, when
// causal, j <= i + T_k − T_q). The shape's window fields are unused.
struct BlockLayout {
  const bool* data = nullptr;
  int64_t heads = 1;
  int64_t block = 1;
  int64_t q_blocks = 0;
  int64_t k_blocks = 0;
  bool causal = false;
};

// Optional per-pair and per-token terms of the operator (all nullable, contiguous; a window pattern
// takes the segments and the forget gates only):
// - bias (bias_heads, T_q, T_k), bias_heads 1 or H: added to the scaled scores (Swin's relative
//   position bias); its gradient, summed over the batch (and heads when shared), is grad_bias.
// - segments q (B, segment_heads, T_q) and k (B, segment_heads, T_k): query i sees key j only
//   when their ids are equal (Swin's shifted-window regions, Reformer's buckets, padding as an
//   id no query has).
// - positions (B, position_heads, T), T_q == T_k: the original positions of a permuted sequence
//   (Reformer's sorted buckets): causal compares them instead of indices, and a query's own
//   token (equal position) scores kSelfScore, seen only when nothing else is.
template <typename acc_t>
struct PairTerms {
  const acc_t* bias = nullptr;
  int64_t bias_heads = 1;
  acc_t* grad_bias = nullptr;  // same shape as bias, zeroed by the caller
  const int64_t* q_segments = nullptr;
  const int64_t* k_segments = nullptr;
  int64_t segment_heads = 1;
  const int64_t* positions = nullptr;
  int64_t position_heads = 1;
  // The Forgetting Transformer's cumulative log forget gates c (B, H, T_k), T_q <= T_k: the pair
  // (i, j) scores c_a − c_j more (c_j − c_a for j > a), a = i + T_k − T_q, after the cap and ALiBi;
  // grad_forget_cumsum (same shape, zeroed by the caller) receives its gradient. Any pattern.
  const acc_t* forget_cumsum = nullptr;
  acc_t* grad_forget_cumsum = nullptr;
};

// Reformer's score for a token attending to itself under shared QK (docs/methods.md §7).
constexpr double kSelfScore = -1e5;

// The entry points of each instruction-set build of the kernels (cpu_kernel_impl.h); the
// operators call the one the CPU runs best through LINATTN_CPU_ISA_DISPATCH.
namespace cpu_base {
#include "cpu_entry_points.inc"
}  // namespace cpu_base
namespace cpu_avx2 {
#include "cpu_entry_points.inc"
}  // namespace cpu_avx2
namespace cpu_avx512 {
#include "cpu_entry_points.inc"
}  // namespace cpu_avx512

}  // namespace linattn
