"""flash-attn's decoding call, ``flash_attn_with_kvcache``, on linattn's restricted-softmax operator
(re-exported by linattn.flash_attn_compat): new keys and values appended to the caches in place at
each row's length, then attention over each row's cached keys with flash-attn's bottom-right
alignment. Exact softmax, any T and head dim, every dtype."""
from typing import Optional, Union

import torch

from . import _validation as check
from .window import sliding_window_attention


def _refuse(where: str, **given) -> None:
    reasons = {"cache_leftpad": "left-padded caches are not supported; pass each row's length in cache_seqlens",
               "block_table": "a paged KV cache is not supported"}
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"{where}: {name} is not supported ({reasons[name]})")


def _lengths(where: str, cache_seqlens, batch: int, capacity: int, device):
    """Each row's cached length: an int (every row), or a (B,) int32 tensor on the caches' device."""
    if cache_seqlens is None:
        return capacity
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity:
            raise ValueError(f"{where}: cache_seqlens must be in [0, {capacity}] (the caches' length), "
                             f"got {cache_seqlens}")
        return cache_seqlens
    if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32
            or tuple(cache_seqlens.shape) != (batch,)):
        got = (f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}" if isinstance(cache_seqlens, torch.Tensor)
               else repr(cache_seqlens))
        raise ValueError(f"{where}: cache_seqlens must be an int or an int32 tensor (B={batch},), got {got}")
    if cache_seqlens.device != device:
        raise ValueError(f"{where}: cache_seqlens must be on the caches' device {device}, got {cache_seqlens.device}")
    return cache_seqlens.to(torch.int64)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
             interleaved: bool) -> torch.Tensor:
    """x (B, T, H, D) with its first 2·R dims rotated at positions (B, T) by the angles whose cos
    and sin are rows of (max position, R): pairs (2i, 2i + 1) when interleaved (GPT-J), else
    (i, i + R) (GPT-NeoX), flash-attn's apply_rotary_emb; in fp32 (float64 for float64 x)."""
    rotary = 2 * cos.shape[1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    c, s = (t.to(dtype)[positions][:, :, None] for t in (cos, sin))  # (B, T, 1, R)
    part = x[..., :rotary].to(dtype)
    if interleaved:
        first, second = part[..., 0::2], part[..., 1::2]
        turned = torch.stack([first * c - second * s, first * s + second * c], dim=-1).flatten(-2)
    else:
        first, second = part[..., :rotary // 2], part[..., rotary // 2:]
        turned = torch.cat([first * c - second * s, first * s + second * c], dim=-1)
    return torch.cat([turned.to(x.dtype), x[..., rotary:]], dim=-1)


def _check_rotary(where, cos, sin, head_dim: int, device) -> None:
    if (cos is None) != (sin is None):
        raise ValueError(f"{where}: rotary_cos and rotary_sin must be given together")
    if cos is None:
        return
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        check.check_tensor(where, name, t, 2, "(positions, rotary_dim / 2)")
    if cos.shape != sin.shape or 2 * cos.shape[1] > head_dim or cos.device != device:
        raise ValueError(f"{where}: rotary_cos and rotary_sin must be (positions, rotary_dim / 2) with rotary_dim <= "
                         f"the head dim {head_dim}, on {device}, got {tuple(cos.shape)} and {tuple(sin.shape)}")


def _append(where, k_cache, v_cache, k, v, rows, lengths) -> None:
    """k and v (B, T_new, H_k, ·) written into the caches at positions lengths[b] .. + T_new of
    cache row rows[b], in place."""
    if (k is None) != (v is None):
        raise ValueError(f"{where}: k and v (the new keys and values) must be given together")
    if k is None:
        return
    check.check_tensor(where, "k", k, 4, "(B, T_new, H_k, D)")
    check.check_tensor(where, "v", v, 4, "(B, T_new, H_k, dv)")
    batch, new = k.shape[:2]
    if (tuple(k.shape) != (batch, new, *k_cache.shape[2:]) or tuple(v.shape) != (batch, new, *v_cache.shape[2:])
            or v.shape[:2] != k.shape[:2]):
        raise ValueError(f"{where}: k and v must have shapes (B, T_new, {tuple(k_cache.shape[2:])}) and "
                         f"(B, T_new, {tuple(v_cache.shape[2:])}), got {tuple(k.shape)} and {tuple(v.shape)}")
    steps = torch.arange(new, device=k_cache.device)
    if isinstance(lengths, int):
        if lengths + new > k_cache.shape[1]:
            raise ValueError(f"{where}: appending {new} keys at length {lengths} overflows the caches' "
                             f"{k_cache.shape[1]} positions")
        positions = (lengths + steps).expand(batch, new)
    else:
        positions = lengths[:, None] + steps
    index = (rows[:, None].expand(batch, new), positions)
    k_cache[index] = k.to(k_cache.dtype)
    v_cache[index] = v.to(v_cache.dtype)


def _attend(q, keys, values, lengths, *, scale, causal, window, softcap, alibi_slopes):
    """Attention of q (B, T_q, H, D) over the first lengths keys of (B, T, H_k, ·) caches (an int:
    every row); (out (B, T_q, H, dv), lse (B, H, T_q))."""
    left, right = window
    if isinstance(lengths, int):  # every row the same: the keys end where flash-attn aligns
        return _attend_uniform(q, keys[:, :lengths], values[:, :lengths], scale=scale, causal=causal,
                               window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    if q.shape[1] == 1:  # one query a row, at its row's last key: its keys are a per-row mask
        return _attend_one_query(q, keys, values, lengths, scale=scale, left=left, softcap=softcap,
                                 alibi_slopes=alibi_slopes)
    if not torch.compiler.is_compiling():
        host = lengths.tolist()  # several queries a row: alignment differs per row (a host read)
        if len(set(host)) == 1:
            return _attend(q, keys, values, host[0], scale=scale, causal=causal, window=window, softcap=softcap,
                           alibi_slopes=alibi_slopes)
        outs, lses = zip(*(_attend(q[b:b + 1], keys[b:b + 1], values[b:b + 1], n, scale=scale, causal=causal,
                                   window=window, softcap=softcap,
                                   alibi_slopes=alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1
                                   else alibi_slopes[b:b + 1])
                           for b, n in enumerate(host)))
        return torch.cat(outs), torch.cat(lses)
    raise ValueError("linattn.flash_attn_compat.flash_attn_with_kvcache: several queries a row with per-row "
                     "cache_seqlens cannot be compiled (each row aligns differently); pass an int cache_seqlens")


def _attend_uniform(q, keys, values, *, scale, causal, window, softcap, alibi_slopes):
    out, lse = sliding_window_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), window,
                                        causal=causal, scale=scale, softcap=softcap or None,
                                        alibi_slopes=alibi_slopes, return_lse=True)
    return out.transpose(1, 2), lse


def _attend_one_query(q, keys, values, lengths, *, scale, left, softcap, alibi_slopes):
    """Decoding: row b's query at position lengths[b] − 1 sees keys [lengths[b] − 1 − left,
    lengths[b]) (all of them for left −1): a key mask, computed on the device. On eager CPU tensors
    the caches are cut to the longest row (a free host read); elsewhere every position is masked."""
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        longest = int(lengths.max()) if lengths.numel() else 0
        keys, values = keys[:, :longest], values[:, :longest]
    positions = torch.arange(keys.shape[1], device=keys.device)
    hidden = positions >= lengths[:, None]
    if left >= 0:
        hidden |= positions < (lengths[:, None] - 1 - left)
    out, lse = sliding_window_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), (-1, -1),
                                        key_padding_mask=hidden, scale=scale, softcap=softcap or None,
                                        alibi_slopes=alibi_slopes, return_lse=True)
    if alibi_slopes is not None:
        # ALiBi's −slope·|a − j| with the operator's alignment a = T − 1 differs from the row's own
        # (lengths[b] − 1) by slope·(T − lengths[b]) on every visible key: the softmax cancels it,
        # the lse keeps it.
        slopes = alibi_slopes.view(-1 if alibi_slopes.dim() == 2 else 1, alibi_slopes.shape[-1], 1).to(lse.dtype)
        lse = lse + slopes * (keys.shape[1] - lengths).to(lse.dtype).view(-1, 1, 1)
    return out.transpose(1, 2), lse


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                            rotary_cos=None, rotary_sin=None, cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None, cache_leftpad=None, block_table=None,
                            softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                            softcap: float = 0.0, rotary_interleaved: bool = True, alibi_slopes=None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """flash_attn.flash_attn_with_kvcache: q (B, T_q, H, D); caches k_cache (B_c, T, H_k, D) and
    v_cache (B_c, T, H_k, dv), row b of the batch using cache row cache_batch_idx[b] (default b);
    cache_seqlens (an int or (B,) int32) the rows' cached lengths (default T). New k, v (B, T_new,
    H_k, ·), when given, are written into the caches in place after each row's cached keys; then
    each row attends to its first cache_seqlens[b] + T_new keys, causal and window_size aligned
    to the bottom right (query i at key position cache_seqlens[b] + T_new − T_q + i), with
    grouped-query heads, softcap and alibi_slopes. -> out (B, T_q, H, dv), and softmax_lse
    (B, H, T_q) fp32 with return_softmax_lse. One query a row (decoding) runs as one call with a
    per-row key mask made on the device; several queries a row with per-row lengths read the
    lengths on the host and run row by row where they differ. rotary_cos / rotary_sin
    (positions, R) rotate the first 2·R dims of the new keys at their positions and of q at its
    (or, neither causal nor windowed, all at cache_seqlens[b]), interleaved (GPT-J) or halves
    (GPT-NeoX), before the keys are cached. Refused by name: cache_leftpad and block_table.
    num_splits is accepted and not needed."""
    where = "linattn.flash_attn_compat.flash_attn_with_kvcache"
    _refuse(where, cache_leftpad=cache_leftpad, block_table=block_table)
    check.check_tensor(where, "q", q, 4, "(B, T_q, H, D)")
    check.check_tensor(where, "k_cache", k_cache, 4, "(B_c, T, H_k, D)")
    check.check_tensor(where, "v_cache", v_cache, 4, "(B_c, T, H_k, dv)")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"{where}: k_cache and v_cache must share (B_c, T, H_k), got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    batch = q.shape[0]
    if cache_batch_idx is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"{where}: without cache_batch_idx the caches need one row per batch entry "
                             f"(B={batch}), got k_cache {tuple(k_cache.shape)}")
        rows = torch.arange(batch, device=k_cache.device)
    else:
        if (not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype not in (torch.int32, torch.int64)
                or tuple(cache_batch_idx.shape) != (batch,)):
            raise ValueError(f"{where}: cache_batch_idx must be an int32 tensor (B={batch},) of cache rows")
        rows = cache_batch_idx.to(device=k_cache.device, dtype=torch.int64)
    lengths = _lengths(where, cache_seqlens, batch, k_cache.shape[1], k_cache.device)
    if k is not None and cache_seqlens is None:
        raise ValueError(f"{where}: new k and v need cache_seqlens (where each row's keys end)")
    window = tuple(window_size) if isinstance(window_size, (tuple, list)) and len(window_size) == 2 else None
    if window is None:
        raise TypeError(f"{where}: window_size must be a (left, right) pair, got {window_size!r}")
    _check_rotary(where, rotary_cos, rotary_sin, q.shape[3], q.device)
    if rotary_cos is not None:
        # New keys at positions lengths[b] + t; queries there too when causal or windowed, else all
        # at lengths[b] (flash-attn's rule).
        start = torch.as_tensor(lengths, device=q.device).to(torch.int64).expand(batch)[:, None]
        if k is not None:
            k = _rotated(k, rotary_cos, rotary_sin, start + torch.arange(k.shape[1], device=q.device),
                         rotary_interleaved)
        along = causal or window != (-1, -1)
        steps = torch.arange(q.shape[1], device=q.device) if along else torch.zeros(q.shape[1], dtype=torch.int64,
                                                                                    device=q.device)
        q = _rotated(q, rotary_cos, rotary_sin, start + steps, rotary_interleaved)
    _append(where, k_cache, v_cache, k, v, rows, lengths)
    total = lengths + (0 if k is None else k.shape[1])
    keys, values = (k_cache, v_cache) if cache_batch_idx is None else (k_cache[rows], v_cache[rows])
    out, lse = _attend(q, keys, values, total, scale=softmax_scale, causal=bool(causal), window=window,
                       softcap=softcap, alibi_slopes=alibi_slopes)
    return (out, lse) if return_softmax_lse else out
