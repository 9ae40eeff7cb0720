"""flash-linear-attention's softmax attention (``parallel_attn``) and the Forgetting Transformer's
(``parallel_forgetting_attn``; Lin et al. 2025) on linattn's restricted softmax, re-exported by
``linattn.fla_compat``. fla's layout: q (B, T, HQ, K), k (B, T, H, K), v (B, T, H, V) with HQ a
multiple of H (grouped-query heads, read in place), g (B, T, HQ) the per-token log forget gates;
causal always; ``window_size`` w keeps the keys [i − w + 1, i]; packed sequences as (1, total, ·)
with ``cu_seqlens``; ``sink_bias`` (HQ,) gpt-oss's sink logits. Outputs (B, T, HQ, V) contiguous in
q's dtype. The gates' cumulative sums are taken in float64 (fla: float32), so long sequences lose
less of their nearby differences."""
from typing import Optional

import torch

from .fla_linear import int32_offsets
from .forgetting import forgetting_attention
from .window import sliding_window_attention


def _heads_first(where: str, q, k, v, g, window_size, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{where}: q must be (B, T, HQ, K), k (B, T, H, K) and v (B, T, H, V), got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if g is not None and (g.dim() != 3 or g.shape != q.shape[:3]):
        raise ValueError(f"{where}: g must be (B, T, HQ) = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)
                                    or window_size < 1):
        raise ValueError(f"{where}: window_size must be an int >= 1 or None, got {window_size!r}")
    window = -1 if window_size is None else (window_size - 1, 0)
    offsets = int32_offsets(where, q.shape[0], cu_seqlens, q.device)
    return [x.transpose(1, 2) for x in (q, k, v)], window, offsets


def parallel_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None, window_size: Optional[int] = None, cu_seqlens=None,
                  chunk_indices=None, *, sink_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fla.ops.attn.parallel_attn: causal softmax attention, with the log forget gates g when given
    (then forgetting attention). chunk_indices (fla's precomputed tiling) changes nothing here."""
    return _attention("parallel_attn", q, k, v, g, scale, window_size, cu_seqlens, sink_bias)


def _attention(where, q, k, v, g, scale, window_size, cu_seqlens, sink_bias=None):
    """Both functions: softmax attention (forgetting attention with g) in fla's layout, in and out."""
    (q_, k_, v_), window, offsets = _heads_first(where, q, k, v, g, window_size, cu_seqlens)
    if g is None:
        out = sliding_window_attention(q_, k_, v_, window, causal=True, scale=scale, cu_seqlens=offsets,
                                       sinks=sink_bias)
    else:
        out = forgetting_attention(q_, k_, v_, g.transpose(1, 2), window=window, scale=scale, cu_seqlens=offsets,
                                   sinks=sink_bias)
    return out.transpose(1, 2).contiguous()


def parallel_forgetting_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             scale: Optional[float] = None, window_size: Optional[int] = None,
                             cu_seqlens=None) -> torch.Tensor:
    """fla.ops.forgetting_attn.parallel_forgetting_attn: the Forgetting Transformer's causal attention,
    score_ij + Σ_{l=j+1}^{i} g_l (linattn.forgetting_attention)."""
    where = "parallel_forgetting_attn"
    if g is None:
        raise ValueError(f"{where}: g (B, T, HQ), the log forget gates, is required")
    return _attention(where, q, k, v, g, scale, window_size, cu_seqlens)
