// The schemas of the delta-rule operators (docs/methods.md §11). Kernels register per dispatch
// key in this folder: cpu.cpp (CPU), generic.cpp (every other device, and the *_generic twins),
// fused_*.cpp (the tensor-core forward and its emulation), meta.cpp (fake tensors), autograd.cpp
// (Autograd), step.cpp (decoding).
#include <torch/library.h>

#include <string>

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  // q, k (B, H, T, dk), v (B, H, T, dv); beta (B, H, T) the writing strengths; log_gate (B, H, T)
  // the log-decays g_t <= 0 of Gated DeltaNet, (B, H, T, dk) one per key channel (Kimi Delta
  // Attention), or None (DeltaNet). States (B, H, dk, dv) in the accumulation dtype (float32;
  // float64 for float64 inputs):
  //   S_t = (I − β_t k_t k_tᵀ) Diag(e^{g_t}) S_{t−1} + β_t k_t v_tᵀ,   out_t = scale · S_tᵀ q_t,
  // or, non-causal, out_t = scale · S_Tᵀ q_t. cu_seqlens (N + 1,) int32: N packed sequences in
  // (1, H, total, ·) tensors (log_gate (1, H, total[, dk])), each with its own state
  // (N, H, dk, dv). normalize_qk: q and k are first L2-normalised per row inside the kernels,
  // x · (Σ x² + 1e-6)^{-1/2}, and the gradients are those of the raw q and k; else they are used
  // as given. The backward returns dL/dbeta and
  // dL/dlog_gate in their input dtypes (grad_log_gate empty without a gate) and dL/dinitial_state
  // (zeros without one).
  for (const char* suffix : {"", "_generic"}) {
    m.def((std::string("delta_rule_fwd") + suffix +
           "(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? log_gate=None, Tensor? initial_state=None, "
           "Tensor? cu_seqlens=None, bool causal=True, float scale=1.0, bool normalize_qk=False) -> (Tensor out, Tensor final_state)")
              .c_str());
    m.def((std::string("delta_rule_bwd") + suffix +
           "(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, Tensor beta, "
           "Tensor? log_gate=None, Tensor? initial_state=None, Tensor? cu_seqlens=None, bool causal=True, "
           "float scale=1.0, bool normalize_qk=False) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_beta, "
           "Tensor grad_log_gate, Tensor grad_initial_state)")
              .c_str());
  }
  // The tensor-core forward of the fused CUDA backend (tensor_core/forward.h): same contract as
  // delta_rule_fwd; CUDA kernels on CUDA tensors, their emulation on CPU tensors (tests); calls it
  // does not take (fp32/fp64, key dims above 128) run delta_rule_fwd.
  m.def(
      "delta_rule_fwd_fused(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? log_gate=None, "
      "Tensor? initial_state=None, Tensor? cu_seqlens=None, bool causal=True, float scale=1.0, "
      "bool normalize_qk=False) -> (Tensor out, Tensor final_state)");
  // Its gradient: the tensor-core backward (fused_backward.h: the forward and a backward walk on
  // tensor cores, the products parallel over chunks batched); same contract as delta_rule_bwd,
  // which runs the calls it does not take (packed sequences, what the forward does not take).
  m.def(
      "delta_rule_bwd_fused(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, Tensor beta, "
      "Tensor? log_gate=None, Tensor? initial_state=None, Tensor? cu_seqlens=None, bool causal=True, "
      "float scale=1.0, bool normalize_qk=False) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_beta, "
      "Tensor grad_log_gate, Tensor grad_initial_state)");
  // One decoding step of the recurrence above: q, k (B, H, dk), v (B, H, dv), beta (B, H),
  // log_gate (B, H) or (B, H, dk), state (B, H, dk, dv) in the accumulation dtype. Returns out (B, H, dv) and the new
  // state. ATen operations (differentiable through them): O(dk · dv) per head.
  m.def(
      "delta_rule_step(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? log_gate, Tensor state, "
      "float scale=1.0) -> (Tensor out, Tensor new_state)");
  // The same step in one pass over the state per head (a CPU kernel; Meta for fake tensors), which
  // delta_rule_step runs on CPU tensors when no gradient is wanted (decoding). Not differentiable.
  m.def(
      "delta_rule_step_fused(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? log_gate, Tensor state, "
      "float scale=1.0) -> (Tensor out, Tensor new_state)");
}
