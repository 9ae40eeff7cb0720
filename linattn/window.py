"""Restricted softmax attention (docs/methods.md §5): sliding windows, dilated windows and
Longformer global tokens, on (B, H, T, D) tensors. Exported from linattn.functional."""
import numbers
from typing import Optional, Tuple, Union

import torch

from . import ops
from .varlen import check_cu_seqlens, sequence_ids
from . import _validation as check

Window = Union[int, Tuple[int, int]]


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def window_bounds(where: str, window: Window, causal: bool) -> Tuple[int, int]:
    """(left, right) key bounds around each query's aligned position, -1 = unbounded.

    An int w means ``|i − j| <= w`` (causal: i − w <= j <= i); a (left, right) pair has flash-attn's
    window_size meaning. causal=True sets right = 0."""
    if _is_int(window):
        if window < -1:
            raise ValueError(f"{where}: window must be >= 0 (or -1 for unbounded), got {window}")
        left, right = int(window), int(window)
    elif isinstance(window, (tuple, list)) and len(window) == 2 and all(_is_int(w) for w in window):
        left, right = (int(w) for w in window)
        if left < -1 or right < -1:
            raise ValueError(f"{where}: window bounds must be >= 0 or -1 (unbounded), got {tuple(window)}")
    else:
        raise TypeError(f"{where}: window must be an int or a (left, right) pair of ints, got {window!r}")
    return left, 0 if causal else right


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Window,
    *,
    causal: bool = False,
    dilation: int = 1,
    global_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    return_lse: bool = False,
):
    """Softmax attention in which query i sees only the keys of its window (docs/methods.md §5).

    Args:
        q, k, v: (B, H, T_q, D), (B, H_kv, T_k, D), (B, H_kv, T_k, dv); any strides, any lengths.
            H_kv dividing H: grouped-query (and multi-query) attention, query head h reading key/value
            head h // (H / H_kv) in place (never repeated in memory); k and v's gradients are per
            shared head.
        window: an int w (``|i − j| <= w``; causal: i − w <= j <= i) or (left, right) with
            flash-attn's window_size meaning: key j is seen when a − left <= j <= a + right with
            a = i + T_k − T_q (bottom-right alignment), −1 = unbounded.
        causal: right bound 0.
        dilation: d > 1 keeps only the keys with (a − j) divisible by d (Longformer's dilated
            windows; the window still spans ``|a − j| <= w``).
        global_mask: (B, T) bool, True = global token (T_q == T_k, not causal): a global row sees
            every key and every row sees the global keys (Longformer).
        key_padding_mask: (B, T_k) bool, True = padded key, seen by no row.
        scale: score scale, default D ** -0.5.
        cu_seqlens: (N + 1,) int32 offsets of packed variable-length sequences (flash-attn's
            convention, as in linear_attention): q, k, v (1, H, total, D), and a query sees only
            the keys of its window that belong to its own sequence (no host synchronisation:
            the offsets become per-token sequence ids on the device). Not with global_mask.
        sinks: (H,) per-head sink logits (gpt-oss's attention sinks, transformers' ``s_aux``):
            every row's softmax also counts one more key of score sinks[h] and value 0, so a
            row can give part of its attention to nothing. Differentiable.
        softcap: c > 0 caps every scaled score s to c·tanh(s / c) before the softmax (Gemma-2's
            logit soft-capping, flash-attn's ``softcap``); None = no capping.
        alibi_slopes: (H,) or (B, H) float32: ALiBi (flash-attn's ``alibi_slopes``), each score
            gets ``−slope·|i + T_k − T_q − j|`` (after the cap); the slopes take no gradient.
        dropout_p: attention dropout (flash-attn's and SDPA's ``dropout_p``; pass 0 in evaluation):
            each probability is dropped with this probability after the softmax, the kept ones
            scaled by 1 / (1 − p); the mask is drawn pair by pair from a seed taken from
            `generator` (default torch's CPU generator) and drawn again by the backward, never
            stored. CPU tensors only so far.
        return_lse: also return each row's logsumexp of its scores (B, H, T_q), fp32 (float64 for
            float64 inputs), the sinks' logits included; −inf for a row that sees no key. It takes
            a gradient (partial attentions combine by it: flash-attn's ``return_attn_probs``).

    Returns (B, H, T_q, dv) in the input dtype (and the lse with return_lse). A row that sees no
    key returns 0 (and passes zero gradients), never NaN. Computed flash-style in blocks: memory O(T·(block + window)),
    never a T×T matrix; float32 accumulation for every dtype.
    """
    if (type(window) is int and dilation == 1 and global_mask is None and cu_seqlens is None and sinks is None
            and softcap is None and alibi_slopes is None and not dropout_p and not return_lse
            and (scale is None or type(scale) is float) and not torch.compiler.is_compiling()):
        # The common call goes straight to the operator, whose C++ checks match the ones below:
        # only a call it refuses runs them, to raise in the caller's terms.
        try:
            if scale is None:
                scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
            op = ops.restricted.restricted_softmax_op(q.device.type)
            if key_padding_mask is None:  # the schema's defaults, not parsed again per call
                out, _ = op(q, k, v, scale, window, window, 1, causal)
            else:
                out, _ = op(q, k, v, scale, window, window, 1, causal, None, 1, None, key_padding_mask)
            return out
        except Exception:
            pass
    where = "linattn.sliding_window_attention"
    check.check_qkv(where, q, k, v, causal=False, grouped=True)
    left, right = window_bounds(where, window, causal)
    if not _is_int(dilation) or dilation < 1:
        raise ValueError(f"{where}: dilation must be an int >= 1, got {dilation!r}")
    check.check_key_padding_mask(where, key_padding_mask, k)
    if global_mask is not None:
        if causal:
            raise ValueError(f"{where}: global_mask needs causal=False (a global row would see later keys)")
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"{where}: global_mask needs as many queries as keys, got q {tuple(q.shape)} and k "
                             f"{tuple(k.shape)}")
        check.check_key_padding_mask(where, global_mask, k, name="global_mask", meaning="True = global token")
    scale = check.scale_of(where, scale, q)
    check.sinks_checked(where, sinks, q)
    cap = check.softcap_of(where, softcap)
    check.check_alibi_slopes(where, alibi_slopes, q)
    dropout = check.dropout_of(where, dropout_p)
    segments = None
    if cu_seqlens is not None:
        if global_mask is not None:
            raise ValueError(f"{where}: global_mask is not supported with cu_seqlens")
        check_cu_seqlens(where, cu_seqlens, q, k, key_padding_mask)
        segments = sequence_ids(where, cu_seqlens, q.shape[2]).view(1, 1, -1)
    pattern = ops.restricted.Pattern(window=(left, right), dilation=int(dilation), causal=bool(causal),
                                     global_mask=global_mask, key_padding_mask=key_padding_mask, q_segments=segments,
                                     k_segments=segments, softcap=cap, alibi_slopes=alibi_slopes, dropout_p=dropout,
                                     dropout_seed=ops.restricted.dropout_seed_from(generator) if dropout else None)
    out, lse = ops.restricted.restricted_softmax(q, k, v, float(scale), pattern)
    if sinks is not None:
        out = with_sinks(out, lse, sinks)
        lse = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, -1, 1)) if return_lse else lse
    return (out, lse) if return_lse else out


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax attention whose rows also count a key of score sinks[h] and value 0, from the one
    without it: out · e^lse / (e^lse + e^sink) = out · sigmoid(lse − sink), exactly (the
    operator's lse takes a cotangent, so gradients reach q, k and the sinks through it); in fp32, or
    float64 for float64 inputs. A row that sees no key (lse −inf) stays 0."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    factor = torch.sigmoid(lse.to(dtype) - sinks.to(dtype).view(1, -1, 1))
    return (out * factor.unsqueeze(-1)).to(out.dtype)


def window_mask(length_q, length_k, window, *, causal=False, dilation=1, global_mask=None,
                key_padding_mask=None, batch=1, device=None):
    """The dense (B, 1, T_q, T_k) bool mask of sliding_window_attention (True = the query sees
    the key), straight from the definition (ops.restricted.Pattern.dense_mask): for the float64
    reference, need_weights, and comparisons with dense-mask attention. The operators never build it."""
    left, right = window_bounds("linattn.window_mask", window, causal)
    pattern = ops.restricted.Pattern(window=(left, right), dilation=dilation, global_mask=global_mask,
                                     key_padding_mask=key_padding_mask)
    visible = pattern.dense_mask(length_q, length_k, device=device)
    return visible.expand(max(batch, visible.shape[0]), 1, length_q, length_k)
