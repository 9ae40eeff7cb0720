"""The documented functions of linattn (docs/api.rst), on (B, H, T, D) tensors."""
from typing import Callable, Optional, Tuple, Union

import torch

from . import ops
from . import _validation as check
from .varlen import check_cu_seqlens, varlen_linear_attention
from .feature_maps import (
    FUSED_FEATURE_MAPS, PERFORMER_KERNELS, PLAIN_FEATURE_MAPS, efficient_feature_maps, favor_features, resolve_feature_map,
)
from .sparse import bigbird_layout, block_local_layout, block_sparse_attention  # noqa: F401
from .window import sliding_window_attention  # noqa: F401  (the restricted-softmax family)
from .forgetting import forgetting_attention  # noqa: F401  (the restricted-softmax family)
from .swin import shifted_window_attention, swin_attention, window_attention  # noqa: F401
from .lsh import lsh_attention  # noqa: F401
from .additive import additive_attention  # noqa: F401
from .recurrent import linear_attention_step  # noqa: F401  (decoding, one token at a time)

State = Tuple[torch.Tensor, torch.Tensor]


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    feature_map: Union[str, Callable, None] = "elu",
    normalize: bool = True,
    eps: float = 1e-6,
    key_padding_mask: Optional[torch.Tensor] = None,
    decay: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Kernelized linear attention (Katharopoulos et al. 2020), docs/methods.md §1.

    o_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps) with S = Σ_j φ(k_j) v_jᵀ and z = Σ_j φ(k_j) summed over
    all keys, or over keys j <= i when causal. Cost O(T·m·dv) instead of softmax's O(T²·d).

    Args:
        q, k, v: (B, H, T_q, D), (B, H, T_k, D), (B, H, T_k, dv); any strides. T_q may differ
            from T_k unless causal.
        feature_map: "elu" (elu+1), "relu", "identity", None (q and k already featurized) or a
            callable applied to q and k, returning (B, H, T, m).
        normalize: divide by the normalizer; False gives o_i = φ(q_i)ᵀ S_i.
        key_padding_mask: (B, T_k) bool, True marks a padded key, which then contributes nothing.
        initial_state: (S, z) with S (B, H, m, dv) and z (B, H, m), added to every prefix sum.
        output_final_state: also return the state (S, z) after the last key, in float32
            (float64 for float64 inputs); feeding it back as initial_state continues the sequence.
        decay: (H,) per-head γ in (0, 1] (RetNet, Lightning): S_i = γ S_{i−1} + φ(k_i) v_iᵀ.
        gate: (B, H, T) log-gates g <= 0 (Mamba-2, simple GLA): S_i = e^{g_i} S_{i−1} + φ(k_i) v_iᵀ;
            or (B, H, T, m) one log-gate per feature channel (GLA): row c of the state (and of z)
            fades by e^{g_ic}, S_i = diag(e^{g_i}) S_{i−1} + φ(k_i) v_iᵀ, m the feature dim (D for
            the built-in maps). Both causal only; differentiable (decay and gate too). CPU tensors
            run the fused kernel, others the device-generic one
            (csrc/linear_attention/fading_generic.cpp), as do per-channel gates on every device;
            under set_cuda_backend("fused") bf16/fp16 CUDA tensors run per-token gates on tensor
            cores (docs/guide/cuda.md).
        cu_seqlens: (N + 1,) int32 offsets of packed variable-length sequences (flash-attn's
            convention; linattn/varlen.py): q, k, v are (1, H, total, D) and each sequence
            attends only to itself; states are per sequence, (N, H, m, dv) and (N, H, m); gate
            is (1, H, total) or (1, H, total, m). No key_padding_mask (there is no padding).

    Returns:
        out (B, H, T_q, dv) in the input dtype, or (out, (S, z)) when output_final_state.
    """
    if (initial_state is None and decay is None and gate is None and cu_seqlens is None
            and not torch.compiler.is_compiling()):
        code = PLAIN_FEATURE_MAPS.get(feature_map) if type(feature_map) is str else None
        if code is not None and type(eps) is float:
            # The common call goes straight to the operator, whose C++ checks are the same as the
            # ones below: only a call it refuses runs them, to raise in the caller's terms.
            try:
                out, final_state, _ = ops.linear.forward_op(q.device.type)(
                    q, k, v, None, key_padding_mask, code, causal, normalize, eps)
            except Exception:
                pass
            else:
                if not output_final_state:
                    return out
                return out, ops.returned_state(final_state, causal)
    where = "linattn.linear_attention"
    check.check_qkv(where, q, k, v, causal)
    check.check_eps(where, eps)
    check.check_key_padding_mask(where, key_padding_mask, k)
    phi = resolve_feature_map(feature_map, where)
    if feature_map == "identity" and normalize:
        raise ValueError(
            f"{where}: feature_map='identity' can be negative and make the normalizer vanish; "
            "use it with normalize=False, got normalize=True"
        )

    # The built-in maps run inside the kernels; a callable runs here, before them.
    fused_code = FUSED_FEATURE_MAPS.get(feature_map) if isinstance(feature_map, str) else None
    if fused_code is not None or phi is None:
        phi_q, phi_k, code = q, k, fused_code or 0
    else:
        phi_q, phi_k, code = phi(q), phi(k), 0
        check.check_features(where, phi_q, phi_k, q, k)

    acc = ops.accumulate_dtype(q.dtype)
    if cu_seqlens is not None:
        check_cu_seqlens(where, cu_seqlens, q, k, key_padding_mask)
        log_decay = None if decay is None and gate is None else log_fade_factors(where, decay, gate, q, causal, acc,
                                                                                       phi_k.shape[-1])
        out, state = varlen_linear_attention(
            where, q, k, v, phi_q, phi_k, code, cu_seqlens, causal=causal, normalize=normalize, eps=eps,
            log_decay=log_decay, initial_state=initial_state, need_state=output_final_state,
        )
        return (out, state) if output_final_state else out
    initial = None
    if initial_state is not None:
        check.check_state(where, "initial_state", initial_state, phi_k, v)
        initial = ops.augmented_state(initial_state, acc)

    log_decay = None
    if decay is not None or gate is not None:
        log_decay = log_fade_factors(where, decay, gate, q, causal, acc, phi_k.shape[-1])
    out, final_state, _ = ops.linear.forward_op(q.device.type, extended=log_decay is not None)(
        phi_q, phi_k, v, initial, key_padding_mask, code, causal, normalize, float(eps), log_decay
    )
    if not output_final_state:
        return out
    return out, ops.returned_state(final_state, causal)  # decay and gate imply causal


def log_fade_factors(where, decay, gate, q, causal, acc, feature_dim):
    """Log factors of the fading state: log γ per head plus the log-gates, (B, H, T) one per token, or
    (B, H, T, m) one per token and feature channel when the gate is per channel."""
    if not causal:
        raise ValueError(f"{where}: decay and gate fade a causal state; call it with causal=True, got causal=False")
    batch, heads, length = q.shape[0], q.shape[1], q.shape[2]
    per_channel = gate is not None and gate.dim() == 4
    rows = (batch, heads, length, feature_dim) if per_channel else (batch, heads, length)
    log_decay = None  # the sum of what is given (callers give a decay, a gate or both)
    # Value checks read the data: eager CPU tensors only (no host sync on accelerators).
    checking = not torch.compiler.is_compiling() and q.device.type == "cpu"
    if decay is not None:
        check.check_fade(where, "decay", decay, (heads,), "(H,)", q.device)
        if checking and not bool(((decay > 0) & (decay <= 1)).all()):
            raise ValueError(f"{where}: decay must lie in (0, 1], got {decay.tolist()}")
        log_decay = decay.to(acc).log().view((1, heads) + (1,) * (len(rows) - 2)).expand(rows)
    if gate is not None:
        if per_channel:
            check.check_fade(where, "gate", gate, rows, "(B, H, T, m), m the feature dim", q.device)
        else:
            check.check_fade(where, "gate", gate, rows, "(B, H, T) or (B, H, T, m)", q.device)
        if checking and not bool((gate <= 0).all()):
            raise ValueError(f"{where}: gate holds log-gates, which must be <= 0 (and not NaN)")
        log_decay = gate.to(acc) if log_decay is None else log_decay + gate.to(acc)
    return log_decay.contiguous()


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    causal: bool = False,
    kernel: str = "softmax",
    eps: float = 1e-6,
    key_padding_mask: Optional[torch.Tensor] = None,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
):
    """Performer's FAVOR+ attention (Choromanski et al. 2021), docs/methods.md §2.

    Linear attention (§1, normalized) with random features φ built from `projection` (m, D)
    (see linattn.random_features and linattn.feature_maps.favor_features): with
    kernel="softmax", φ(q)·φ(k) is an unbiased estimate of exp(q·k/√D), so the output estimates
    softmax attention; kernel="relu" is the paper's generalized ReLU attention. The features are
    computed here; the attention itself runs in linattn's linear-attention operator. Half
    inputs are computed in float32 (exp features overflow float16) and returned in their dtype.

    initial_state / output_final_state (causal only) work as in linear_attention, with S
    (B, H, m, dv) and z (B, H, m) over the random features: causal key features do not depend on
    the sequence (see favor_features), so states of separate calls add up exactly. Non-causal
    key features are scaled by a max over the whole call's keys, so they have no such state.
    """
    where = "linattn.performer_attention"
    check.check_qkv(where, q, k, v, causal)
    check.check_eps(where, eps)
    check.check_key_padding_mask(where, key_padding_mask, k)
    check.check_tensor(where, "projection", projection, 2, "(nb_features, D)")
    check.check_float_dtype(where, "projection", projection)
    if q.shape[3] < 1:
        raise ValueError(f"{where}: the head dim D of q and k must be at least 1, got q {tuple(q.shape)}")
    if projection.shape[1] != q.shape[3] or projection.shape[0] < 1:
        raise ValueError(
            f"{where}: projection must be (nb_features, D) with D = {q.shape[3]} (the head dim of q), "
            f"got {tuple(projection.shape)}"
        )
    if kernel not in PERFORMER_KERNELS:
        raise ValueError(f"{where}: kernel must be one of {list(PERFORMER_KERNELS)}, got {kernel!r}")
    if (initial_state is not None or output_final_state) and not causal and kernel == "softmax":
        raise ValueError(
            f"{where}: initial_state and output_final_state need causal=True with kernel='softmax' (non-causal "
            "key features are scaled by the whole call's keys, so states of separate calls do not add up)"
        )
    phi_q = favor_features(q, projection, is_query=True, kernel=kernel, causal=causal)
    phi_k = favor_features(
        k, projection, is_query=False, kernel=kernel, causal=causal, key_padding_mask=key_padding_mask
    )
    result = linear_attention(
        phi_q, phi_k, v.to(phi_q.dtype), causal=causal, feature_map=None, eps=eps,
        key_padding_mask=key_padding_mask, initial_state=initial_state, output_final_state=output_final_state,
    )
    if output_final_state:
        return result[0].to(v.dtype), result[1]
    return result.to(v.dtype)


def efficient_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Efficient Attention (Shen et al. 2021, arXiv 1812.01243), docs/methods.md §3.

    O = ρ_q(Q) (ρ_k(K)ᵀ V): ρ_q is a softmax over each query's D features, ρ_k a softmax over
    the sequence for each key feature, padded keys excluded (a sequence with every key padded
    gets a zero output). Non-causal. The product runs in linattn's linear-attention operator.
    """
    where = "linattn.efficient_attention"
    check.check_qkv(where, q, k, v, causal=False)
    check.check_key_padding_mask(where, key_padding_mask, k)
    rho_q, rho_k = efficient_feature_maps(q, k, key_padding_mask)
    return linear_attention(rho_q.to(q.dtype), rho_k.to(k.dtype), v, feature_map=None, normalize=False)
