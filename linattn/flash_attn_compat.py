"""flash-attn's functional interface on linattn's restricted-softmax operator, so that code written
against ``flash_attn.flash_attn_func`` / ``flash_attn_varlen_func`` (and their qkv- and kv-packed
forms, and ``flash_attn_with_kvcache`` for decoding: linattn/flash_attn_kvcache.py) runs unchanged
on CPUs and on GPUs flash-attn does not serve:

    from linattn.flash_attn_compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same layouts ((B, T, H, D); packed (total, H, D) with int32 ``cu_seqlens``), flash-attn 2.1's
bottom-right causal alignment, ``window_size``, ``softcap``, ``softmax_scale``, grouped-query heads
(k and v with fewer heads, each serving H / H_k query heads: read in place, never repeated),
``alibi_slopes`` and ``return_attn_probs`` (the logsumexp, as flash-attn returns it; no
probability matrix). Exact softmax, any T and head dim, every dtype, forward and backward. What
the operator does not do raises, naming the argument: a paged ``block_table``,
per-sequence ALiBi slopes in a packed call, and causal, windowed or ALiBi packed calls whose query
and key offsets differ (packed cross-attention is bidirectional over each key sequence)."""
from typing import Optional, Tuple

import torch

from . import _validation as check
from . import ops
from .varlen import check_cu_seqlens, sequence_ids
from .flash_attn_kvcache import flash_attn_with_kvcache  # noqa: F401  (part of this interface)
from .window import sliding_window_attention


def _check_kv_heads(where: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> None:
    """k and v have as many heads, dividing q's (dim `head_dim` of the layout), in the caller's terms
    (the operator reads the shared heads in place)."""
    heads, kv_heads = q.shape[head_dim], k.shape[head_dim]
    if v.shape[head_dim] != kv_heads or not check.shares_heads(heads, kv_heads):
        raise ValueError(f"{where}: k and v must have the same number of heads, dividing q's {heads}, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")


def _window(where: str, window_size) -> Tuple[int, int]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"{where}: window_size must be a (left, right) pair, got {window_size!r}")
    return tuple(window_size)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                    softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """flash_attn.flash_attn_func: q (B, T_q, H, D), k (B, T_k, H_k, D), v (B, T_k, H_k, dv) ->
    out (B, T_q, H, dv); with return_attn_probs, (out, softmax_lse (B, H, T_q) fp32, None).
    `deterministic` is accepted: every path here is deterministic."""
    where = "linattn.flash_attn_compat.flash_attn_func"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.check_tensor(where, name, t, 4, "(B, T, H, D)")
    _check_kv_heads(where, q, k, v, head_dim=2)
    out, lse = sliding_window_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        _window(where, window_size), causal=bool(causal), scale=softmax_scale,
                                        softcap=softcap or None, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                        return_lse=True)
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table=None):
    """flash_attn.flash_attn_varlen_func for packed sequences: q (total_q, H, D), k (total_k, H_k, D),
    v (total_k, H_k, dv), cu_seqlens_q / cu_seqlens_k (N + 1,) int32 offsets -> out (total_q, H, dv);
    with return_attn_probs, (out, softmax_lse (H, total_q) fp32, None). Query sequence n attends to
    key sequence n alone (no host synchronisation: the offsets become per-token ids on the device),
    except that distinct offset tensors are compared once (torch.equal; a synchronisation on a GPU).
    Self-attention (equal offsets) takes every option; cross-attention (different offsets: packed
    encoder-decoder batches) is bidirectional over each key sequence, so causal, a window and ALiBi
    (whose alignment would be per sequence) are refused there. max_seqlen_q/k are accepted and not
    needed."""
    where = "linattn.flash_attn_compat.flash_attn_varlen_func"
    if block_table is not None:
        raise ValueError(f"{where}: a paged KV cache (block_table) is not supported")
    if alibi_slopes is not None and alibi_slopes.dim() != 1:
        raise ValueError(f"{where}: alibi_slopes must be one slope per head (H,) in a packed call, got "
                         f"{tuple(alibi_slopes.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.check_tensor(where, name, t, 3, "(total, H, D)")
    _check_kv_heads(where, q, k, v, head_dim=1)
    packed = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, H, total, ·)
    same_offsets = cu_seqlens_k is cu_seqlens_q or (
        isinstance(cu_seqlens_k, torch.Tensor) and isinstance(cu_seqlens_q, torch.Tensor)
        and cu_seqlens_k.shape == cu_seqlens_q.shape and torch.equal(cu_seqlens_q, cu_seqlens_k))
    if same_offsets:
        out, lse = sliding_window_attention(*packed, _window(where, window_size), causal=bool(causal),
                                            scale=softmax_scale, cu_seqlens=cu_seqlens_q, softcap=softcap or None,
                                            alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_lse=True)
    else:
        out, lse = _packed_cross_attention(where, *packed, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                                           _window(where, window_size), softcap, alibi_slopes, dropout_p)
    out = out[0].transpose(0, 1)
    return (out, lse[0], None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                              deterministic: bool = False, return_attn_probs: bool = False):
    """flash_attn.flash_attn_qkvpacked_func: qkv (B, T, 3, H, D) -> flash_attn_func of its three
    views (the gradient lands in the packed tensor)."""
    check.check_tensor("linattn.flash_attn_compat.flash_attn_qkvpacked_func", "qkv", qkv, 5, "(B, T, 3, H, D)")
    return flash_attn_func(*_unpacked("flash_attn_qkvpacked_func", "qkv", qkv, 2, 3), dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                             softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """flash_attn.flash_attn_kvpacked_func: q (B, T_q, H, D), kv (B, T_k, 2, H_k, D)."""
    check.check_tensor("linattn.flash_attn_compat.flash_attn_kvpacked_func", "kv", kv, 5, "(B, T_k, 2, H_k, D)")
    return flash_attn_func(q, *_unpacked("flash_attn_kvpacked_func", "kv", kv, 2, 2), dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                     causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                                     alibi_slopes=None, deterministic: bool = False, return_attn_probs: bool = False):
    """flash_attn.flash_attn_varlen_qkvpacked_func: qkv (total, 3, H, D), cu_seqlens (N + 1,) int32."""
    check.check_tensor("linattn.flash_attn_compat.flash_attn_varlen_qkvpacked_func", "qkv", qkv, 4,
                       "(total, 3, H, D)")
    return flash_attn_varlen_func(*_unpacked("flash_attn_varlen_qkvpacked_func", "qkv", qkv, 1, 3), cu_seqlens,
                                  cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                                    alibi_slopes=None, deterministic: bool = False, return_attn_probs: bool = False):
    """flash_attn.flash_attn_varlen_kvpacked_func: q (total_q, H, D), kv (total_k, 2, H_k, D)."""
    check.check_tensor("linattn.flash_attn_compat.flash_attn_varlen_kvpacked_func", "kv", kv, 4,
                       "(total_k, 2, H_k, D)")
    return flash_attn_varlen_func(q, *_unpacked("flash_attn_varlen_kvpacked_func", "kv", kv, 1, 2), cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _unpacked(function: str, name: str, packed: torch.Tensor, dim: int, parts: int):
    """The `parts` views of a packed tensor along `dim` (no copies)."""
    if packed.shape[dim] != parts:
        raise ValueError(f"linattn.flash_attn_compat.{function}: {name} must have {parts} at dim {dim}, got "
                         f"{tuple(packed.shape)}")
    return packed.unbind(dim)


def _packed_cross_attention(where, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window, softcap, alibi_slopes,
                            dropout_p):
    """Query sequence n of the packing attends to every key of key sequence n: the offsets as
    per-token sequence ids of queries and keys (segments of the restricted softmax), q (1, H, total_q,
    D) and k, v (1, H_k, total_k, ·). (out, lse)."""
    if causal or tuple(window) != (-1, -1) or alibi_slopes is not None:
        raise ValueError(f"{where}: with different cu_seqlens_q and cu_seqlens_k (cross-attention between packed "
                         "sequences) each query sees its whole key sequence: causal, window_size and alibi_slopes "
                         f"are not supported there, got causal={causal!r}, window_size={tuple(window)!r}" +
                         ("" if alibi_slopes is None else " and alibi_slopes"))
    ids = []
    for name, offsets, t in (("cu_seqlens_q", cu_seqlens_q, q), ("cu_seqlens_k", cu_seqlens_k, k)):
        named = f"{where} ({name})"
        check_cu_seqlens(named, offsets, t, t, None)
        ids.append(sequence_ids(named, offsets, t.shape[2]).view(1, 1, -1))
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{where}: cu_seqlens_q and cu_seqlens_k must hold as many sequences, got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)} offsets")
    check.check_qkv(where, q, k, v, causal=False, grouped=True)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    cap = check.softcap_of(where, softcap or None)
    dropout = check.dropout_of(where, dropout_p)
    pattern = ops.restricted.Pattern(q_segments=ids[0], k_segments=ids[1], softcap=cap, dropout_p=dropout,
                                     dropout_seed=ops.restricted.dropout_seed_from() if dropout else None)
    return ops.restricted.restricted_softmax(q, k, v, float(scale), pattern)
