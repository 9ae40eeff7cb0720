"""Reformer LSH attention (docs/methods.md §7) on the block-sparse engine. Exported from
linattn.functional.

Each hashing round sorts the tokens by (bucket, position); the sorted sequence is cut into
chunks of bucket_size, each attending to itself and the previous chunk, which is a block-local
layout. The block-sparse operator then takes the buckets as segment ids (pairs of different
buckets are excluded), the original positions (causal compares them; a token's own key scores
−1e5) and padding as a bucket no query has. Rounds run as extra heads of one call, and are
combined by the softmax of their per-row logsumexps (the operator passes gradients through lse).
Any length: the last chunk may be partial.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import ops
from . import _validation as check
from .sparse import _check_positive


def lsh_buckets_count(length: int, bucket_size: int) -> int:
    """Reformer's number of buckets for a sequence: about length / bucket_size, even, at least 2."""
    n = max(1, -(-length // bucket_size))
    return max(2, n + n % 2)


def lsh_rotations(n_hashes: int, head_dim: int, n_buckets: int, *, generator=None, device=None, dtype=None):
    """Random rotations (n_hashes, head_dim, n_buckets / 2) for lsh_buckets, drawn from
    `generator` (on its device) or the global generator."""
    gen_device = generator.device if generator is not None else device
    r = torch.randn(n_hashes, head_dim, n_buckets // 2, generator=generator, device=gen_device,
                    dtype=dtype or torch.float32)
    return r.to(device) if device is not None else r


def lsh_buckets(qk: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """(B, H, rounds, T) bucket ids h(x) = argmax([xR; −xR]) for each round's rotation R."""
    rotated = torch.einsum("bhtd,rdn->bhrtn", qk.detach(), rotations.to(qk.dtype))
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def chunk_layout(length: int, chunk: int, device=None) -> torch.Tensor:
    """(1, n, n) layout in which chunk t sees chunks t and t − 1."""
    blocks = torch.arange(-(-length // chunk), device=device)
    d = blocks[:, None] - blocks[None, :]
    return ((d == 0) | (d == 1)).unsqueeze(0)


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    n_hashes: int = 4,
    bucket_size: int = 64,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    rotations: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Reformer's shared-QK LSH attention.

    Args:
        qk: (B, H, T, D), the shared queries/keys (keys are its L2-normalized rows).
        v: (B, H, T, dv).
        n_hashes: hashing rounds; bucket_size: chunk length, and T / bucket_size buckets (even,
            at least 2).
        causal: token i sees only tokens j <= i (original positions).
        key_padding_mask: (B, T) bool, True = padded.
        generator: draws the rotations (reproducible results); or pass `rotations`
            (n_hashes, D, n_buckets / 2) directly. scale: default D ** -0.5.
        dropout_p: attention dropout (pass 0 in evaluation): each round's probabilities dropped
            pair by pair in the operator (sliding_window_attention's Philox mask, over the rounds'
            sorted rows: lsh_dropout_keep gives it in token order), the rounds still weighted by
            their undropped logsumexps; its seed drawn from `generator` after the rotations.
    Returns (B, H, T, dv). Differentiable in qk and v (the hashing itself is not).
    """
    where = "linattn.lsh_attention"
    check.check_qkv(where, qk, qk, v, causal=False)
    _check_positive(where, "n_hashes", n_hashes)
    _check_positive(where, "bucket_size", bucket_size)
    check.check_key_padding_mask(where, key_padding_mask, qk)
    B, H, T, D = qk.shape
    n_buckets = lsh_buckets_count(T, bucket_size)
    if rotations is None:
        rotations = lsh_rotations(n_hashes, D, n_buckets, generator=generator, device=qk.device, dtype=qk.dtype)
    elif tuple(rotations.shape) != (n_hashes, D, n_buckets // 2):
        raise ValueError(f"{where}: rotations must have shape (n_hashes={n_hashes}, D={D}, n_buckets/2="
                         f"{n_buckets // 2}) for T={T} and bucket_size={bucket_size}, got {tuple(rotations.shape)}")
    if scale is None:
        scale = D ** -0.5 if D > 0 else 1.0
    dropout = check.dropout_of(where, dropout_p)
    dv = v.shape[-1]
    R = n_hashes
    buckets = lsh_buckets(qk, rotations)  # (B, H, R, T)
    positions = torch.arange(T, device=qk.device)
    order = (buckets * T + positions).argsort(dim=-1)  # sorted rank -> original position

    def sorted_rows(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, C) -> (B, H·R, T, C) in each round's order
        C = x.shape[-1]
        rows = x.unsqueeze(2).expand(B, H, R, T, C).gather(3, order.unsqueeze(-1).expand(B, H, R, T, C))
        return rows.reshape(B, H * R, T, C)

    q_sorted = sorted_rows(qk)
    k_sorted = F.normalize(q_sorted, dim=-1)
    v_sorted = sorted_rows(v)
    segments = buckets.gather(3, order).reshape(B, H * R, T)
    key_segments = segments
    if key_padding_mask is not None:  # a padded key gets a bucket no query has
        padded = key_padding_mask[:, None, None, :].expand(B, H, R, T).gather(3, order).reshape(B, H * R, T)
        key_segments = segments.masked_fill(padded, -1)
    pattern = ops.restricted.Pattern(layout=chunk_layout(T, bucket_size, qk.device), block_size=int(bucket_size),
                                     causal=bool(causal), q_segments=segments, k_segments=key_segments,
                                     positions=order.reshape(B, H * R, T), dropout_p=dropout,
                                     dropout_seed=ops.restricted.dropout_seed_from(generator) if dropout else None)
    out, lse = ops.restricted.restricted_softmax(q_sorted, k_sorted, v_sorted, float(scale), pattern)
    # Back to the input order, then the rounds weighted by softmax over their logsumexps (a row
    # that sees nothing in any round, a padded token's, is 0).
    inverse = order.argsort(dim=-1)
    out = out.reshape(B, H, R, T, dv).gather(3, inverse.unsqueeze(-1).expand(B, H, R, T, dv))
    lse = lse.reshape(B, H, R, T).gather(3, inverse)
    top = lse.amax(dim=2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(lse - top)
    total = e.sum(dim=2, keepdim=True)
    weights = e / torch.where(total == 0, torch.ones_like(total), total)
    return (weights.unsqueeze(-1) * out.to(weights.dtype)).sum(dim=2).to(v.dtype)


def lsh_dropout_keep(seed: torch.Tensor, buckets: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """(B, H, rounds, T, T) bool: the pairs lsh_attention's dropout keeps under `seed`, per round in
    token order (the operator draws them over each round's rows sorted by (bucket, position): head
    h·rounds + r, rows and keys at their ranks), for the dense weights of need_weights and tests."""
    B, H, R, T = buckets.shape
    positions = torch.arange(T, device=buckets.device)
    rank = (buckets * T + positions).argsort(dim=-1).argsort(dim=-1)  # original position -> sorted row
    sorted_keep = ops.restricted.dropout_keep_mask(seed, B, H * R, T, T, dropout_p, device=buckets.device)
    sorted_keep = sorted_keep.view(B, H, R, T, T)
    rows = sorted_keep.gather(3, rank.unsqueeze(-1).expand(B, H, R, T, T))
    return rows.gather(4, rank.unsqueeze(-2).expand(B, H, R, T, T))
