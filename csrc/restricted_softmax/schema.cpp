// The schema of the restricted-softmax operator (docs/methods.md §5–§7). Kernels register
// per dispatch key in this folder: cpu.cpp (CPU), generic.cpp (every other device, and the
// *_generic twins), flash_*.cpp (the flash engine of the fused backend), meta.cpp (fake tensors),
// autograd.cpp (Autograd).
#include <torch/library.h>

#include <string>

// The pattern's arguments, shared by both directions (linattn/ops/restricted.py's Pattern builds
// them; op_checks.h's RestrictedPattern holds them in C++). Query i sees key j when
// - its region holds the pair: a layout (H or 1, ceil(T_q/b), ceil(T_k/b)) bool of b × b blocks
//   (docs/methods.md §6), or else a sliding window with flash-attn's (left, right) bounds around
//   the aligned position a = i + T_k − T_q (-1 = unbounded), dilation, and Longformer global
//   tokens global_mask (B, T) (docs/methods.md §5);
// - causal: j <= a (on positions when given);
// - q_segments[i] == k_segments[j] (B, 1 or H, T_q / T_k) int64 (packed sequences, Swin's
//   shifted-window regions, Reformer's buckets), and key j is not padded (key_padding_mask (B, T_k)).
// Score terms (with a layout): bias (1 or H, T_q, T_k) added to the scaled scores, with its
// gradient grad_bias (size 0 without one); positions (B, 1 or H, T) of a permuted sequence
// (causal compares them; a token's own key scores -1e5, docs/methods.md §7). With any region:
// softcap c > 0 caps the scaled scores to c·tanh(s / c) before the bias (Gemma-2's logit
// soft-capping; 0 = off); alibi_slopes (H) or (B, H) float32 add -slope·|i + T_k − T_q − j| to the
// scores after the cap (flash-attn's ALiBi; no gradient). Dropout: with dropout_p > 0 each
// probability is dropped with probability dropout_p after the softmax's normalization (the kept
// ones scaled by 1 / (1 − dropout_p)), pair (b, h, i, j) by the Philox bits of dropout_seed, a CPU
// int64 tensor (1,) (common/philox.h): the backward draws the same mask again. lse is the undropped
// softmax's. forget_cumsum (B, H, T_k) in the accumulation dtype (float32; float64 for float64
// inputs), T_q <= T_k: the Forgetting Transformer's cumulative log forget gates c_j = Σ_{l<=j} log f_l
// (docs/methods.md §5): query i at key position a = i + T_k − T_q scores c_a − c_j more for key
// j <= a (the log of the gates' product between them), c_j − c_a for a later key (the same decay
// read backwards, for bidirectional windows), after the cap and ALiBi; its gradient is
// grad_forget_cumsum (size 0 without one).
constexpr const char* kPatternArguments =
    "int window_left=-1, int window_right=-1, int dilation=1, bool causal=False, Tensor? layout=None, "
    "int block_size=1, Tensor? global_mask=None, Tensor? key_padding_mask=None, Tensor? q_segments=None, "
    "Tensor? k_segments=None, Tensor? positions=None, Tensor? bias=None, float softcap=0., "
    "Tensor? alibi_slopes=None, float dropout_p=0., Tensor? dropout_seed=None, Tensor? forget_cumsum=None";

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  // Restricted softmax attention (docs/methods.md §5–§7): one schema for every pattern. lse
  // (B, H, T_q) is the per-row logsumexp the backward recomputes probabilities from (-inf for a
  // row that sees no key); grad_lse, its cotangent, lets callers combine several attentions by
  // their logsumexp (Reformer's rounds). The _generic twins run the device-generic kernel on any
  // device (the tests' switch).
  for (const char* suffix : {"", "_generic"}) {
    const std::string forward = std::string("restricted_softmax_fwd") + suffix +
                                "(Tensor q, Tensor k, Tensor v, float scale, " + kPatternArguments +
                                ") -> (Tensor out, Tensor lse)";
    const std::string backward = std::string("restricted_softmax_bwd") + suffix +
                                 "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
                                 "Tensor lse, float scale, " + kPatternArguments +
                                 ") -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_bias, "
                                 "Tensor grad_forget_cumsum)";
    m.def(forward.c_str());  // parsed here: the strings need not outlive the call
    m.def(backward.c_str());
  }
  // The flash engine (flash/forward.h, flash/backward.h): CUDA's fused backend runs it on the GPU,
  // and on CPU tensors it runs the GPU kernels' emulation (the tests' switch). Calls it does not
  // take (fp32/fp64; head dims past 256) run restricted_softmax_fwd/bwd.
  m.def((std::string("restricted_softmax_fwd_fused(Tensor q, Tensor k, Tensor v, float scale, ") + kPatternArguments +
         ") -> (Tensor out, Tensor lse)").c_str());
  m.def((std::string("restricted_softmax_bwd_fused(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
                     "Tensor out, Tensor lse, float scale, ") +
         kPatternArguments +
         ") -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_bias, Tensor grad_forget_cumsum)")
            .c_str());
}
