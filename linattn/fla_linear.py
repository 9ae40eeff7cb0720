"""flash-linear-attention's linear-attention family on ``linattn.linear_attention`` (the identity
feature map: q and k arrive featurized), re-exported by ``linattn.fla_compat``:

- gated linear attention: ``chunk_gla`` / ``fused_recurrent_gla`` (a log-gate per key channel) and
  ``chunk_simple_gla`` / ``fused_recurrent_simple_gla`` (per token, and/or ``g_gamma`` per head);
- ``chunk_linear_attn``, ``fused_chunk_linear_attn``, ``fused_recurrent_linear_attn``: no gate,
  normalized by default (fla 0.6's running key sum: the state is then ``(S, z)``);
- RetNet's ``chunk_retention``, ``fused_chunk_retention``, ``fused_recurrent_retention``,
  ``parallel_retention``: γ_h = 1 − 2^(−5−h) per head;
- Lightning Attention's ``chunk_lightning_attn``, ``fused_recurrent_lightning_attn``: γ_h =
  e^(−8h/H · (1 − layer_idx / num_layers)).

All compute S_t = Diag(e^{g_t}) γ S_{t−1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t (fla's recurrence),
on (B, T, H, ·) tensors, states (N, H, K, V) in float32 (``state_v_first``: (N, H, V, K)), packed
sequences with ``cu_seqlens`` in a batch of 1. ``reverse=True`` (the ``fused_recurrent_*`` forms)
runs each sequence from its last token to its first: the same recurrence on the sequence read
backwards, which is how it runs here (the rows gathered in reverse order, on the device)."""
from typing import Optional

import torch

from .functional import linear_attention
from .varlen import sequence_ids

# Options of flash-linear-attention's functions that only steer its kernels (memory, tiling, host
# copies): nothing to do here.
HINTS = ("chunk_size", "cu_seqlens_cpu", "disable_recompute", "max_num_seqs")


def refuse_others(where: str, options: dict) -> None:
    """Raises for an option linattn does not implement, unless it is left at None or False (by
    identity: a tensor such as fla's value gates `gv` is refused whatever it holds)."""
    for name, value in options.items():
        if name not in HINTS and value is not None and value is not False:
            shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
            raise NotImplementedError(f"{where}: {name}={shown} is not supported by linattn.fla_compat")


def int32_offsets(where: str, batch: int, cu_seqlens, device=None):
    """fla's packed-sequence offsets (any integer dtype) as the operators take them: int32, batch 1,
    on the inputs' `device` where given (checked before any row is gathered by them)."""
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError(f"{where}: with cu_seqlens the sequences are packed in a batch of 1, got B={batch}")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"{where}: cu_seqlens must be on the inputs' device {device}, got {cu_seqlens.device}")
    return cu_seqlens.to(torch.int32)


def reversal_index(where: str, cu_seqlens: Optional[torch.Tensor], total: int, device) -> Optional[torch.Tensor]:
    """The row order that reads each packed sequence [cu_seqlens[n], cu_seqlens[n + 1]) backwards
    (int32 offsets on `device`; their values checked for eager CPU tensors, as every packed call's),
    computed once a call on the device (no sync); None unpacked (the whole T flips)."""
    if cu_seqlens is None:
        return None
    sequence = sequence_ids(where, cu_seqlens, total)
    offsets = cu_seqlens.long()
    return offsets[sequence] + offsets[sequence + 1] - 1 - torch.arange(total, device=device)


def reversed_rows(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """x (B, T, ...) with each sequence's rows in reverse order (its own inverse), `index` from
    reversal_index."""
    return x.flip(1) if index is None else x.index_select(1, index)


def gated_linear(where, q, k, v, g, decay, scale, initial_state, output_final_state, cu_seqlens, options,
                 reverse=False, state_v_first=False, normalize=False):
    """fla's recurrence as linattn's linear attention with the identity feature map: gates g
    (B, T, H[, K]), a per-head decay γ (H,); normalized (fla's linear_attn), o_t = scale · S_tᵀ q_t
    / (scale · q_t · z_t + 1e-10) with z_t = z_0 + Σ_{s <= t} k_s — linattn's normalizer with
    eps = 1e-10 / scale (the scale cancels) — and initial/final states (S, z), z (N, 1, H, K)."""
    refuse_others(where, options)
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{where}: q and k must be (B, T, H, K) and v (B, T, H, V), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    offsets = int32_offsets(where, B, cu_seqlens, q.device)
    S0, z0 = (initial_state if normalize and isinstance(initial_state, tuple) else (initial_state, None))
    state = None
    if S0 is not None or z0 is not None:
        if S0 is None:
            S0 = z0.new_zeros(*z0.shape[:1], H, K, v.shape[-1], dtype=torch.float32)
        if state_v_first:
            S0 = S0.transpose(-1, -2)
        z0 = S0.new_zeros(S0.shape[:3]) if z0 is None else z0.reshape(S0.shape[:3])
        state = (S0, z0)
    if reverse:
        order = reversal_index(where, offsets, T, q.device)
        q, k, v = (reversed_rows(x, order) for x in (q, k, v))
        g = None if g is None else reversed_rows(g, order)
    if normalize:
        form = dict(feature_map=None, normalize=True, eps=1e-10 / scale)
    else:
        form = dict(feature_map="identity", normalize=False)
        q = q * scale
    out, (S, z) = linear_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                   decay=decay, gate=None if g is None else g.transpose(1, 2), initial_state=state,
                                   output_final_state=True, cu_seqlens=offsets, **form)
    out = out.transpose(1, 2)
    if reverse:
        out = reversed_rows(out, order)
    out = out.contiguous()
    if state_v_first:
        S = S.transpose(-1, -2).contiguous()
    final = S if output_final_state else None
    if normalize:
        return out, (final, z.unsqueeze(1))
    return out, final


def _decay_of(g_gamma):
    """γ = e^{g_gamma}, in float32 at least (float64 kept)."""
    return None if g_gamma is None else g_gamma.to(torch.promote_types(g_gamma.dtype, torch.float32)).exp()


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **options):
    """Gated linear attention (GLA): a log-gate per key channel, g (B, T, H, K),
    S_t = Diag(e^{g_t}) S_{t−1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t."""
    return gated_linear("chunk_gla", q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens, options)


def fused_recurrent_gla(q, k, v, gk=None, scale=None, initial_state=None, output_final_state=False, reverse=False,
                        state_v_first=False, cu_seqlens=None, **options):
    """chunk_gla's recurrence (fla names the per-channel gate gk here; value-side gates gv are not
    implemented)."""
    return gated_linear("fused_recurrent_gla", q, k, v, gk, None, scale, initial_state, output_final_state,
                        cu_seqlens, options, reverse=reverse, state_v_first=state_v_first)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, **options):
    """Simple GLA: a log-gate per token and head, g (B, T, H), and/or a constant one per head,
    g_gamma (H,)."""
    return gated_linear("chunk_simple_gla", q, k, v, g, _decay_of(g_gamma), scale, initial_state, output_final_state,
                        cu_seqlens, options)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                               reverse=False, state_v_first=False, cu_seqlens=None, **options):
    return gated_linear("fused_recurrent_simple_gla", q, k, v, g, _decay_of(g_gamma), scale, initial_state,
                        output_final_state, cu_seqlens, options, reverse=reverse, state_v_first=state_v_first)


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None, **options):
    """Linear attention on featurized q and k: o_t = scale · S_tᵀ q_t, normalized by default
    (divided by scale · q_t · z_t + 1e-10, z_t the running key sum); states S, or (S, z) when
    normalized, z (N, 1, H, K) — returned whether or not output_final_state, as fla 0.6 does."""
    return gated_linear("chunk_linear_attn", q, k, v, None, None, scale, initial_state, output_final_state,
                        cu_seqlens, options, normalize=normalize)


def fused_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                            cu_seqlens=None, **options):
    return gated_linear("fused_chunk_linear_attn", q, k, v, None, None, scale, initial_state, output_final_state,
                        cu_seqlens, options, normalize=normalize)


def fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                                normalize=False, cu_seqlens=None, **options):
    """chunk_linear_attn's recurrence, unnormalized by default (fla's default here)."""
    return gated_linear("fused_recurrent_linear_attn", q, k, v, None, None, scale, initial_state, output_final_state,
                        cu_seqlens, options, reverse=reverse, normalize=normalize)


def retention_decay(heads: int, device=None) -> torch.Tensor:
    """RetNet's per-head decay γ_h = 1 − 2^(−5−h), float32."""
    return 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float32, device=device))


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **options):
    """RetNet's retention: S_t = γ_h S_{t−1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t."""
    return gated_linear("chunk_retention", q, k, v, None, retention_decay(q.shape[2], q.device), scale,
                        initial_state, output_final_state, cu_seqlens, options)


def fused_chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                          **options):
    return gated_linear("fused_chunk_retention", q, k, v, None, retention_decay(q.shape[2], q.device), scale,
                        initial_state, output_final_state, cu_seqlens, options)


def fused_recurrent_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                              state_v_first=False, cu_seqlens=None, **options):
    return gated_linear("fused_recurrent_retention", q, k, v, None, retention_decay(q.shape[2], q.device), scale,
                        initial_state, output_final_state, cu_seqlens, options, reverse=reverse,
                        state_v_first=state_v_first)


def parallel_retention(q, k, v, scale=None, output_attentions=False, cu_seqlens=None):
    """Retention without states; returns (o, None) (the (B, H, T, T) scores of output_attentions
    are not materialized here: it raises)."""
    out, _ = gated_linear("parallel_retention", q, k, v, None, retention_decay(q.shape[2], q.device), scale, None,
                          False, cu_seqlens, {"output_attentions": output_attentions})
    return out, None


def lightning_decay(heads: int, layer_idx: int, num_layers: int, device=None) -> torch.Tensor:
    """Lightning Attention's per-head decay e^(−8h/H · (1 − layer_idx / num_layers)), float32
    (head 0 keeps its whole state: γ = 1)."""
    slope = 8 / heads * (1 - layer_idx / num_layers)
    return torch.exp(-slope * torch.arange(heads, dtype=torch.float32, device=device))


def chunk_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, **options):
    """Lightning Attention (MiniMax-01, TransNormerLLM): retention with a per-head decay that
    weakens with depth."""
    decay = lightning_decay(q.shape[2], layer_idx, num_layers, q.device)
    return gated_linear("chunk_lightning_attn", q, k, v, None, decay, scale, initial_state, output_final_state,
                        cu_seqlens, options)


def fused_recurrent_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None,
                                   output_final_state=False, reverse=False, cu_seqlens=None, **options):
    decay = lightning_decay(q.shape[2], layer_idx, num_layers, q.device)
    return gated_linear("fused_recurrent_lightning_attn", q, k, v, None, decay, scale, initial_state,
                        output_final_state, cu_seqlens, options, reverse=reverse)
