"""The delta rule (DeltaNet, Gated DeltaNet, Kimi Delta Attention), docs/methods.md §11: linear attention whose state is
corrected towards each value instead of accumulating it. The operators are C++
(csrc/delta_rule/: the chunkwise CPU kernel, the device-generic path, Meta kernels, autograd)."""
from typing import Optional

import torch

from .ops import routing
from .ops.linear import accumulate_dtype

_L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(Σ x² + 1e-6) over the last dim, in x's dtype (computed in float32 or wider): the
    papers' normalisation of q and k, smooth at 0."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.square().sum(-1, keepdim=True) + _L2_EPS)).to(x.dtype)


def _forward_op(device_type: str):
    """The forward a call on `device_type` runs (routing.py): with the fused CUDA backend the
    tensor-core forward (which runs delta_rule_fwd itself for calls it does not take)."""
    if routing.fused_in_use(device_type):
        return torch.ops.linattn.delta_rule_fwd_fused.default
    return (torch.ops.linattn.delta_rule_fwd_generic if routing.generic_in_use()
            else torch.ops.linattn.delta_rule_fwd).default


def _checked_scale(q, k, v, beta, scale) -> float:
    """The output scale (dk^-1/2 by default), after checking the tensor arguments are tensors."""
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"linattn.delta_rule_attention: {name} must be a torch.Tensor, got {type(x).__name__}")
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def delta_rule_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    gate: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    normalize_qk: bool = True,
):
    """The delta rule (Schlag et al. 2021; Yang et al. 2024) and its gated forms (Gated DeltaNet,
    Yang, Kautz and Hatamizadeh 2025; Kimi Delta Attention, Kimi Team 2025), docs/methods.md §11.
    Per (batch, head), with a state S (dk × dv):

        S_t = (I − β_t k_t k_tᵀ) Diag(e^{g_t}) S_{t−1} + β_t k_t v_tᵀ,     o_t = scale · S_tᵀ q_t

    i.e. the state is first faded by the gate, then corrected towards v_t where it mispredicts
    it (S_{t−1}ᵀ k_t ≠ v_t) — online regression instead of linear attention's accumulation. A gate
    per token fades the whole state; a gate per key channel (KDA) fades row c by e^{g_tc}.

    Args:
        q, k: (B, H, T, dk); v: (B, H, T, dv); any strides and floating dtype.
        beta: (B, H, T) writing strengths, in (0, 1] as the papers use them (a sigmoid of a
            projection); (0, 2) keeps the transition contractive with unit keys.
        gate: (B, H, T) log-gates g <= 0 (Gated DeltaNet's g = −e^A · softplus(·)), (B, H, T, dk)
            one per key channel (Kimi Delta Attention), or None (DeltaNet, g = 0).
        causal: True (the recurrence above); False: every query reads the final state,
            o_t = scale · S_Tᵀ q_t (an encoder's bidirectional read of the same memory).
        scale: the output scale, dk ** -0.5 by default (as flash-linear-attention).
        initial_state: (B, H, dk, dv) — or (N, H, dk, dv) with cu_seqlens — the state before the
            first token, any floating dtype (used in float32; float64 for float64 inputs).
        output_final_state: also return the state after the last token (float32, float64 for
            float64 inputs); feeding it back as initial_state continues the sequence.
        cu_seqlens: (N + 1,) int32 offsets of packed sequences (flash-attn's convention): q, k, v
            are (1, H, total, ·), beta and gate (1, H, total[, dk]), each sequence runs from its
            own state.
        normalize_qk: L2-normalise q and k over their last dim first, x · (Σ x² + 1e-6)^{-1/2}
            (the papers' default; with unit keys and β in (0, 1] the state cannot blow up). Done
            inside the kernels, gradients included.

    Every tensor argument is differentiable (q, k, v, beta, gate, initial_state). CPU tensors run
    the fused chunkwise kernel, other devices the device-generic one (the same algorithm in ATen
    operations; with cu_seqlens it reads the offsets on the host). With the fused CUDA backend
    (linattn.set_cuda_backend("fused")) bf16/fp16 CUDA tensors with dk <= 128 run a tensor-core
    forward and backward (docs/guide/cuda.md), per-channel gates included.

    Returns:
        out (B, H, T, dv) in q's dtype, or (out, final_state) when output_final_state.
    """
    scale = _checked_scale(q, k, v, beta, scale)  # q and k are normalised inside the operators
    if initial_state is not None and initial_state.dtype != accumulate_dtype(q.dtype):
        initial_state = initial_state.to(accumulate_dtype(q.dtype))
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    out, final_state = _forward_op(q.device.type)(q, k, v, beta, gate, initial_state, cu_seqlens, bool(causal), scale,
                                     bool(normalize_qk))
    return (out, final_state) if output_final_state else out


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    *,
    gate: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    normalize_qk: bool = True,
):
    """One decoding step of delta_rule_attention (causal), with a constant-size state.

    Args:
        q, k: (B, H, dk); v: (B, H, dv); beta: (B, H); gate: (B, H), (B, H, dk) per key channel,
            or None.
        state: (B, H, dk, dv) from delta_rule_attention(..., output_final_state=True) or an
            earlier step, or None (zeros).

    Returns:
        (out (B, H, dv) in q's dtype, new_state (B, H, dk, dv) in float32, float64 for float64).
    """
    scale = _checked_scale(q, k, v, beta, scale)
    if normalize_qk:  # one token: in PyTorch (the step's own kernels take normalised q, k)
        q, k = l2_normalize(q), l2_normalize(k)
    acc = accumulate_dtype(q.dtype)
    if state is None:
        state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=acc)
    elif state.dtype != acc:
        state = state.to(acc)
    if _fused_cuda_step(q, k, v, beta, gate, state):
        return torch.ops.linattn.delta_rule_step_fused(q, k, v, beta, gate, state, float(scale))
    return torch.ops.linattn.delta_rule_step(q, k, v, beta, gate, state, float(scale))


def _fused_cuda_step(*tensors) -> bool:
    """Whether a step runs the fused CUDA kernel (one launch; docs/guide/decoding.md): CUDA tensors
    under the fused backend, 16- or 32-bit, no gradient wanted (the kernel is not differentiable;
    CPU tensors make the same choice inside delta_rule_step)."""
    q = tensors[0]
    if not (q.is_cuda and routing.fused_in_use("cuda") and q.dtype != torch.float64):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
