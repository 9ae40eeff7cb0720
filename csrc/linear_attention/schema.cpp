// The schemas of the linear-attention operators (docs/methods.md §1). Kernels register per
// dispatch key in this folder: cpu.cpp / step.cpp (CPU), generic.cpp (every other device, and
// the *_generic twins), fused_*.cpp (CUDA and its CPU emulation), meta.cpp (fake tensors),
// autograd.cpp (Autograd).
#include <torch/library.h>

#include <string>

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  // Kernelized linear attention (docs/methods.md §1), one schema for the whole family.
  // feature_map: 0 identity (q, k are features already), 1 elu+1, 2 relu, applied inside the
  // kernels; key_padding_mask (B, T_k) bool, True = padded key. States are augmented:
  // (B, H, m, dv + 1) = [S | z]; normalizer is φ(q)·z + eps per query, saved for the backward.
  // The backward may be handed the forward's final_state: without causality that is the state
  // every query saw, which the backward then need not recompute from the keys.
  // log_decay (B, H, T), causal only: a fading state — before token i joins, the state is
  // multiplied by exp(log_decay[b, h, i]) <= 1 (log γ of a per-head decay plus a log-gate), in the
  // accumulation dtype; grad_log_decay is then dL/dc_i for c = cumsum(log_decay) (the autograd
  // sums it backward in time), else empty. log_decay (B, H, T, m) fades each feature channel on its
  // own (GLA-style gates: row i of the state by exp(log_decay[b, h, t, i])); its gradient has its shape.
  // cu_seqlens (N + 1,) int32: packed variable-length sequences (flash-attn's convention):
  // q, k, v (1, H, total, ·) hold N sequences back to back, each attending only to itself;
  // states per sequence (N, H, m, dv + 1); log_decay (1, H, total[, m]); no key_padding_mask.
  // Every kernel takes every case, except that per-channel factors run the device-generic
  // formulation (fading_generic.cpp) on every device.
  m.def(
      "linear_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? initial_state, "
      "Tensor? key_padding_mask, int feature_map, bool causal, bool normalize, float eps, "
      "Tensor? log_decay=None, Tensor? cu_seqlens=None) -> (Tensor out, Tensor final_state, Tensor normalizer)");
  m.def(
      "linear_attn_bwd(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor normalizer, Tensor? initial_state, Tensor? key_padding_mask, "
      "int feature_map, bool causal, bool normalize, Tensor? final_state=None, Tensor? log_decay=None, "
      "Tensor? cu_seqlens=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_initial_state, Tensor grad_log_decay)");
  // The fused kernels of the CUDA backend (linear_attention/fused_scan.h), same contract as
  // linear_attn_fwd / linear_attn_bwd. CUDA tensors run them on the GPU; CPU tensors run the
  // same block program in an emulation of the thread block (what the CPU tests check).
  // linattn.set_cuda_backend chooses between them and the generic path for CUDA tensors.
  m.def(
      "linear_attn_fwd_fused(Tensor q, Tensor k, Tensor v, Tensor? initial_state, "
      "Tensor? key_padding_mask, int feature_map, bool causal, bool normalize, float eps, "
      "Tensor? log_decay=None, Tensor? cu_seqlens=None) -> (Tensor out, Tensor final_state, Tensor normalizer)");
  m.def(
      "linear_attn_bwd_fused(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor normalizer, Tensor? initial_state, Tensor? key_padding_mask, "
      "int feature_map, bool causal, bool normalize, Tensor? final_state=None, Tensor? log_decay=None, "
      "Tensor? cu_seqlens=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_initial_state, Tensor grad_log_decay)");
  // One decoding step (recurrent form): S' = factor·S + φ(k) vᵀ, z' = factor·z + φ(k),
  // out = φ(q)ᵀS' / (φ(q)·z' + eps) (or the numerator alone). q, k (B, H, D), v (B, H, dv);
  // S (B, H, m, dv), z (B, H, m) and factor (B, H) — or (B, H, m), one per feature channel, scaling
  // row i of S and z — in the accumulation dtype; m = D. A fused CPU
  // kernel, and ATen ops on every other device (step.cpp); the _generic twin runs the latter on
  // CPU tensors too, for the tests.
  for (const char* name : {"linear_attn_step", "linear_attn_step_generic"}) {
    m.def((std::string(name) +
           "(Tensor q, Tensor k, Tensor v, Tensor S, Tensor z, Tensor? factor, int feature_map, bool normalize, "
           "float eps) -> (Tensor out, Tensor S_out, Tensor z_out)").c_str());
  }
  // The device-generic forward as a CompositeImplicitAutograd op: tracers that record ATen ops
  // (torch.onnx.export, legacy and dynamo) see its standard ATen operations instead of a
  // custom op they cannot translate. Used by linattn.linear_attention during ONNX export.
  m.def(
      "linear_attn_fwd_decomposed(Tensor q, Tensor k, Tensor v, Tensor? initial_state, "
      "Tensor? key_padding_mask, int feature_map, bool causal, bool normalize, float eps, "
      "Tensor? log_decay=None, Tensor? cu_seqlens=None) -> (Tensor out, Tensor final_state, Tensor normalizer)");
  // The device-generic implementation under its own name, so tests can run on CPU exactly
  // what CUDA tensors execute.
  m.def(
      "linear_attn_fwd_generic(Tensor q, Tensor k, Tensor v, Tensor? initial_state, "
      "Tensor? key_padding_mask, int feature_map, bool causal, bool normalize, float eps, "
      "Tensor? log_decay=None, Tensor? cu_seqlens=None) -> (Tensor out, Tensor final_state, Tensor normalizer)");
  m.def(
      "linear_attn_bwd_generic(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor normalizer, Tensor? initial_state, Tensor? key_padding_mask, "
      "int feature_map, bool causal, bool normalize, Tensor? final_state=None, Tensor? log_decay=None, "
      "Tensor? cu_seqlens=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_initial_state, Tensor grad_log_decay)");
}
