"""The Forgetting Transformer's attention (FoX, Lin et al., ICLR 2025; docs/methods.md §5.1): softmax
attention whose scores decay by data-dependent forget gates, on (B, H, T, D) tensors. It runs the
restricted-softmax operator with the gates' cumulative sums as a score term, so it takes every
pattern of that operator (windows, packed sequences, key padding, grouped-query heads, soft-capping,
dropout, sinks). Exported from linattn.functional."""
from typing import Optional

import torch

from . import ops
from . import _validation as check
from .varlen import check_cu_seqlens, sequence_ids
from .window import Window, window_bounds, with_sinks


def forget_cumsum(log_forget: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The operator's ``forget_cumsum`` (B, H, T_k) from per-token log forget gates (B, H or 1, T_k):
    c_j = Σ_{l <= j} log f_l, summed in float64 (rounded once, to `dtype`: the error of a difference
    c_a − c_j is then one rounding of |c|, not T of them), differentiable. One sum over packed
    sequences serves them all: a pair's term c_a − c_j only spans its own sequence."""
    c = log_forget.to(torch.float64).cumsum(-1).to(dtype)
    return c.expand(c.shape[0], heads, c.shape[2]).contiguous() if c.shape[1] != heads else c.contiguous()


def check_log_forget(where: str, log_forget, q: torch.Tensor, k: torch.Tensor) -> None:
    """(B, H or 1, T_k) float on q's device, T_q <= T_k."""
    B, H, T_q, T_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    check.check_tensor(where, "log_forget", log_forget, 3, "(B, H, T_k)")
    check.check_float_dtype(where, "log_forget", log_forget)
    if (log_forget.shape[0] != B or log_forget.shape[1] not in (1, H) or log_forget.shape[2] != T_k
            or log_forget.device != q.device):
        raise ValueError(f"{where}: log_forget must have shape (B={B}, H={H} or 1, T_k={T_k}) on {q.device}, got "
                         f"{tuple(log_forget.shape)} on {log_forget.device}")
    if T_q > T_k:
        raise ValueError(f"{where}: the queries are the last T_q of the T_k key positions, so T_q <= T_k; got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")


def forgetting_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    causal: bool = True,
    window: Window = -1,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    return_lse: bool = False,
):
    """Forgetting attention (docs/methods.md §5.1): softmax attention in which query i's score for key j
    gains D_ij = Σ_{l=j+1}^{a} log f_l, the log of the forget gates' product between them (a = i + T_k − T_q,
    the query's key position), so what is far back fades at a rate the model chooses per token and head.

    Args:
        q, k, v: (B, H, T_q, D), (B, H_kv, T_k, D), (B, H_kv, T_k, dv), T_q <= T_k (the queries are the
            last T_q positions: decoding against a cache passes the cache's keys and gates); H_kv dividing
            H (grouped-query attention).
        log_forget: (B, H, T_k) or (B, 1, T_k) per-token log forget gates log f_t, per query head
            (FoX: ``F.logsigmoid(x W_f + b_f)``; fla's ``g``); any float dtype, differentiable. Values
            <= 0 make D a decay; others are taken as given.
        causal: key j <= a only (FoX). With causal=False a later key j > a gains Σ_{l=a+1}^{j} log f_l
            (the same decay read backwards: a bidirectional FoX, as ALiBi's distance).
        window: an int w (``|a − j| <= w``) or flash-attn's (left, right) bounds, −1 = unbounded
            (fla's ``window_size=w`` is left = w − 1).
        scale, key_padding_mask, cu_seqlens, sinks, softcap, dropout_p, generator, return_lse: as in
            linattn.sliding_window_attention (packed sequences with cu_seqlens: one log_forget row
            over the packed tokens; a pair never spans two sequences, so no gate crosses a border).

    Returns (B, H, T_q, dv) in the input dtype (and the lse (B, H, T_q) with return_lse). Flash-style
    blocks, never a T×T matrix; the gates' cumulative sums in float64, rounded once to the
    accumulation dtype (float32; float64 for float64 inputs); gradients for q, k, v, log_forget (and
    sinks). CUDA tensors run the device-generic kernel, or the flash engine under the fused CUDA backend
    (verified through its emulation, not yet on a GPU).
    """
    where = "linattn.forgetting_attention"
    check.check_qkv(where, q, k, v, causal=False, grouped=True)
    check_log_forget(where, log_forget, q, k)
    left, right = window_bounds(where, window, causal)
    check.check_key_padding_mask(where, key_padding_mask, k)
    scale = check.scale_of(where, scale, q)
    check.sinks_checked(where, sinks, q)
    cap = check.softcap_of(where, softcap)
    dropout = check.dropout_of(where, dropout_p)
    segments = None
    if cu_seqlens is not None:
        check_cu_seqlens(where, cu_seqlens, q, k, key_padding_mask)
        segments = sequence_ids(where, cu_seqlens, q.shape[2]).view(1, 1, -1)
    acc = ops.accumulate_dtype(q.dtype)
    pattern = ops.restricted.Pattern(window=(left, right), causal=bool(causal), key_padding_mask=key_padding_mask,
                                     q_segments=segments, k_segments=segments, softcap=cap, dropout_p=dropout,
                                     dropout_seed=ops.restricted.dropout_seed_from(generator) if dropout else None,
                                     forget_cumsum=forget_cumsum(log_forget, q.shape[1], acc))
    out, lse = ops.restricted.restricted_softmax(q, k, v, float(scale), pattern)
    if sinks is not None:
        out = with_sinks(out, lse, sinks)
        lse = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, -1, 1)) if return_lse else lse
    return (out, lse) if return_lse else out
