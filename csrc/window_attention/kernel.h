// Kernel interface of the restricted-softmax family (METHODS.md §5): softmax attention in which
// query i sees key j only when visible(i, j). Raw pointers, strides and sizes only.
//
// Sliding window with flash-attn's window_size meaning: with the query aligned to key
// a = i + (T_k − T_q) (bottom-right alignment), key j is in the window when
// a − left <= j <= a + right (a negative bound is unbounded) and, with dilation d, (a − j) is a
// multiple of d. Longformer global tokens (T_q == T_k): a global row sees every key, every row
// sees the global keys. A padded key is seen by no row.
#pragma once

#include "../common/strided.h"

#include <cstdint>

namespace linattn {

struct WindowAttentionShape {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t q_len = 0;
  int64_t k_len = 0;
  int64_t head_dim = 0;   // D of q and k
  int64_t value_dim = 0;  // dv
  int64_t left = -1;      // window bounds, -1 = unbounded
  int64_t right = -1;
  int64_t dilation = 1;
  double scale = 1.0;

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

// A block-sparse layout (METHODS.md §6): data (heads, q_blocks, k_blocks) bool, contiguous, with
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

// Optional per-pair and per-token terms of the block-sparse operator (all nullable, contiguous):
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
};

// Reformer's score for a token attending to itself under shared QK (METHODS.md §7).
constexpr double kSelfScore = -1e5;

// Per-row masks: global_mask (B, T) and key_padding_mask (B, T_k), contiguous, nullable.
// Outputs: out (B, H, T_q, dv) contiguous, lse (B, H, T_q) acc_t (−inf for a row that sees no
// key; its output is 0).
template <typename scalar_t, typename acc_t>
void window_attention_forward_cpu(const WindowAttentionShape& shape, Strided4<const scalar_t> q,
                                  Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                  const bool* global_mask, const bool* key_padding_mask,
                                  scalar_t* out, acc_t* lse);

template <typename scalar_t, typename acc_t>
void window_attention_backward_cpu(const WindowAttentionShape& shape,
                                   Strided4<const scalar_t> grad_out, Strided4<const scalar_t> q,
                                   Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                   Strided4<const scalar_t> out, const acc_t* lse,
                                   const bool* global_mask, const bool* key_padding_mask,
                                   scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v);

template <typename scalar_t, typename acc_t>
void block_sparse_attention_forward_cpu(const WindowAttentionShape& shape, const BlockLayout& layout,
                                        const PairTerms<acc_t>& terms, Strided4<const scalar_t> q,
                                        Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                        const bool* key_padding_mask, scalar_t* out, acc_t* lse);

// grad_lse (B, H, T_q) acc_t, nullable: the cotangent of lse (Reformer combines rounds by it).
template <typename scalar_t, typename acc_t>
void block_sparse_attention_backward_cpu(const WindowAttentionShape& shape, const BlockLayout& layout,
                                         const PairTerms<acc_t>& terms, Strided4<const scalar_t> grad_out,
                                         const acc_t* grad_lse, Strided4<const scalar_t> q,
                                         Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                         Strided4<const scalar_t> out, const acc_t* lse,
                                         const bool* key_padding_mask, scalar_t* grad_q,
                                         scalar_t* grad_k, scalar_t* grad_v);

}  // namespace linattn
