// The schemas of the restricted-softmax operators (docs/methods.md §5–§7). Kernels register
// per dispatch key in this folder: cpu.cpp (CPU), generic.cpp (every other device, and the
// *_generic twins), meta.cpp (fake tensors), autograd.cpp (Autograd).
#include <torch/library.h>

#include <string>

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  // Restricted softmax attention (docs/methods.md §5): sliding window with flash-attn's
  // (left, right) bounds (-1 = unbounded; causal is right = 0), dilation, Longformer
  // global_mask (B, T) and key_padding_mask (B, T_k), both bool. lse (B, H, T_q) is the per-row
  // logsumexp the backward recomputes probabilities from (-inf for a row that sees no key).
  // segment_ids (B, T) int64, T_q == T_k: a query sees only keys of its own segment (the
  // sequences of a packed variable-length batch).
  m.def(
      "sliding_window_attn_fwd(Tensor q, Tensor k, Tensor v, int window_left, int window_right, "
      "int dilation, Tensor? global_mask, Tensor? key_padding_mask, float scale, "
      "Tensor? segment_ids=None) -> (Tensor out, Tensor lse)");
  m.def(
      "sliding_window_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int window_left, int window_right, int dilation, Tensor? global_mask, "
      "Tensor? key_padding_mask, float scale, Tensor? segment_ids=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "sliding_window_attn_fwd_generic(Tensor q, Tensor k, Tensor v, int window_left, "
      "int window_right, int dilation, Tensor? global_mask, Tensor? key_padding_mask, "
      "float scale, Tensor? segment_ids=None) -> (Tensor out, Tensor lse)");
  m.def(
      "sliding_window_attn_bwd_generic(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int window_left, int window_right, int dilation, Tensor? global_mask, "
      "Tensor? key_padding_mask, float scale, Tensor? segment_ids=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Block-sparse softmax attention (docs/methods.md §6): layout (H or 1, ceil(T_q/b), ceil(T_k/b))
  // bool, block_size b; causal additionally hides keys after the query (bottom-right aligned).
  // Optional terms (PairTerms in restricted_softmax/kernel.h): an additive score bias
  // (1 or H, T_q, T_k) with its gradient grad_bias (size 0 without one), segment ids
  // (B, 1 or H, T) that must match, and original positions (B, 1 or H, T) of a permuted
  // sequence (causal compares them; a token's own key scores -1e5). grad_lse, the cotangent of
  // lse, lets callers combine several attentions by their logsumexp (Reformer's rounds).
  for (const char* suffix : {"", "_generic"}) {
    const std::string forward = std::string("block_sparse_attn_fwd") + suffix +
          "(Tensor q, Tensor k, Tensor v, Tensor layout, int block_size, bool causal, "
          "Tensor? key_padding_mask, float scale, Tensor? bias=None, Tensor? q_segments=None, "
          "Tensor? k_segments=None, Tensor? positions=None) -> (Tensor out, Tensor lse)";
    const std::string backward = std::string("block_sparse_attn_bwd") + suffix +
          "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
          "Tensor layout, int block_size, bool causal, Tensor? key_padding_mask, float scale, "
          "Tensor? bias=None, Tensor? q_segments=None, Tensor? k_segments=None, Tensor? positions=None) -> "
          "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_bias)";
    m.def(forward.c_str());  // parsed here: the strings need not outlive the call
    m.def(backward.c_str());
  }
}
