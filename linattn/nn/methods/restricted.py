"""Restricted softmax methods (docs/methods.md §5–§8): a sliding window, Longformer, BigBird,
Reformer's LSH buckets, and the hybrid of linear attention with a window."""
import math

import torch
from torch import nn

from ... import functional, lsh, ops, reference
from ...sparse import layout_mask
from ...window import window_bounds, window_mask, with_sinks
from ..decoding import decode_hybrid, decode_local
from ... import _validation as check
from .base import (MethodModule, _check_choice, _check_positive_int, _drop_keys, _dropped_weights,
                   _masked_softmax_weights, _probability_dropout, _softmax_over_visible)
from .kernelized import LinearMethod


class LocalMethod(MethodModule):
    """Sliding-window softmax attention (docs/methods.md §5) through linattn.sliding_window_attention.
    Options:
      window: an int w (each query sees the keys within w positions; causal: the w before it
        and itself) or a (left, right) pair with flash-attn's window_size meaning; default 128;
      dilation: keep every d-th key of the window (Longformer's dilated windows), default 1;
      sinks: True adds gpt-oss's attention sinks, a learned logit per head (the parameter
        `sinks`, zeros at first) that every row's softmax counts as one more key of value 0;
        default False;
      softcap: c > 0 caps the scaled scores s to c·tanh(s / c) (Gemma-2's logit soft-capping);
        default None (no cap).
    Accepts key padding and causal masks; dropout drops attention probabilities (each pair, after
    the softmax, as torch does) in the operator."""

    name = "local"
    decoder = staticmethod(decode_local)
    hf_implementations = ("linattn_local",)
    options = ("window", "dilation", "sinks", "softcap")
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False  # bias_kv / zero_attn keys would fall outside most windows

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, window=128, dilation=1,
                 sinks=False, softcap=None):
        super().__init__()
        where = f"linattn method {self.name!r}"
        self.softcap = check.softcap_of(where, softcap) or None
        window_bounds(where, window, causal=False)  # raises on a bad window
        _check_positive_int(self.name, "dilation", dilation)
        if not isinstance(sinks, bool):
            raise TypeError(f"{where}: sinks must be True or False, got {sinks!r}")
        self.window, self.dilation = window, dilation
        self.sinks = nn.Parameter(torch.zeros(num_heads, device=device, dtype=dtype)) if sinks else None

    def extra_repr(self) -> str:
        sinks = ", sinks=True" if self.sinks is not None else ""
        cap = f", softcap={self.softcap:g}" if self.softcap else ""
        return f"window={self.window!r}, dilation={self.dilation}{sinks}{cap}"

    def scores(self, q, k) -> torch.Tensor:
        """The scaled scores, soft-capped when the method caps (for need_weights and decoding)."""
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        return ops.restricted.soft_capped(scores, self.softcap)

    def global_mask(self, k, given):
        """The global tokens for keys k: the ones given (longformer), or none."""
        return given

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights, global_mask=None):
        dropout, seed = _probability_dropout(dropout_p, need_weights)
        global_mask = self.global_mask(k, global_mask)
        out = functional.sliding_window_attention(
            q, k, v, self.window, causal=causal, dilation=self.dilation, global_mask=global_mask,
            key_padding_mask=key_padding_mask, sinks=self.sinks, softcap=self.softcap, **dropout,
        )
        if not need_weights:
            return out, None
        visible = window_mask(
            q.shape[2], k.shape[2], self.window, causal=causal, dilation=self.dilation, global_mask=global_mask,
            key_padding_mask=key_padding_mask, batch=q.shape[0], device=q.device,
        )
        scores = self.scores(q, k)
        weights = _softmax_over_visible(scores, visible)
        if self.sinks is not None:  # the keys' share of each row, the sink taking the rest
            lse = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
            weights = with_sinks(weights, lse, self.sinks)
        return out, _dropped_weights(weights, seed, dropout_p)


class LongformerMethod(LocalMethod):
    """Longformer (docs/methods.md §5): a sliding window plus global tokens, which see every key and
    are seen by every query. Options: window and dilation as for "local", and global_tokens:
    how many leading tokens are global (default 1: a [CLS] token). MultiheadAttention's
    forward(..., global_mask=(N, L) bool) overrides it per call. Self-attention, non-causal."""

    name = "longformer"
    decoder = None  # global tokens see later keys: no causal form
    hf_implementations = ()
    takes_global_tokens = True
    options = ("window", "dilation", "global_tokens")
    supports_causal = False

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, window=128, dilation=1,
                 global_tokens=1):
        super().__init__(num_heads, head_dim, device, dtype, window=window, dilation=dilation)
        if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
            raise ValueError(f"linattn method 'longformer': global_tokens must be an int >= 0, got {global_tokens!r}")
        self.global_tokens = global_tokens

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, global_tokens={self.global_tokens}"

    def global_mask(self, k, given):
        if given is not None:
            return given
        positions = torch.arange(k.shape[2], device=k.device)
        return (positions < self.global_tokens).expand(k.shape[0], k.shape[2])


class BigBirdMethod(MethodModule):
    """BigBird block-sparse attention (docs/methods.md §6) through linattn.block_sparse_attention.
    Options: block_size (64), num_random (3 random blocks per block row), num_global (2: the
    first and the last block), seed (the random blocks follow from it, per sequence length and
    head, so they are fixed for a layer; default 0; see layout()). Key padding and causal masks (causal hides
    later keys inside the layout too); dropout drops attention probabilities in the operator, as local."""

    name = "bigbird"
    options = ("block_size", "num_random", "num_global", "seed")
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, block_size=64, num_random=3,
                 num_global=2, seed=0):
        super().__init__()
        _check_positive_int(self.name, "block_size", block_size)
        for option, value in (("num_random", num_random), ("num_global", num_global), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"linattn method 'bigbird': {option} must be an int >= 0, got {value!r}")
        self.num_heads, self.block_size, self.num_random, self.num_global, self.seed = (
            num_heads, block_size, num_random, num_global, seed)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, num_random={self.num_random}, num_global={self.num_global}, "
                f"seed={self.seed}")

    def layout(self, length: int, device) -> torch.Tensor:
        """(H, ⌈T/b⌉, ⌈T/b⌉) BigBird layout: window of 3 blocks, global blocks, and per block row
        and head the num_random blocks (not already present) with the highest score of a fixed
        integer hash of (seed, head, row, column). Unlike linattn.bigbird_layout's generator
        draws, this is made of tensor ops only, so torch.compile(fullgraph=True) traces it for
        any length, and it is the same in every call and process for a given seed."""
        n = (length + self.block_size - 1) // self.block_size
        blocks = torch.arange(n, device=device)
        present = (blocks[:, None] - blocks[None, :]).abs() <= 1
        first, last = (self.num_global + 1) // 2, self.num_global // 2
        is_global = (blocks < first) | (blocks >= n - last)
        present = (present | is_global[:, None] | is_global[None, :]).expand(self.num_heads, n, n)
        if self.num_random == 0:
            return present
        heads = torch.arange(self.num_heads, device=device)[:, None, None]
        mixed = (heads * 1000003 + blocks[:, None] * 10007 + blocks[None, :] * 101 + self.seed * 7919 + 17) * 2654435761
        score = (mixed % 4294967296).to(torch.float64).masked_fill(present, -1.0)
        kth = score.topk(min(self.num_random, n), dim=-1).values[..., -1:]
        return present | ((score >= kth) & (score >= 0))

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        if q.shape[2] != k.shape[2]:
            raise ValueError("linattn method 'bigbird': self-attention only (as many queries as keys), got "
                             f"{q.shape[2]} queries and {k.shape[2]} keys")
        dropout, seed = _probability_dropout(dropout_p, need_weights)
        layout = self.layout(k.shape[2], k.device)
        out = functional.block_sparse_attention(q, k, v, layout, self.block_size, causal=causal,
                                                key_padding_mask=key_padding_mask, **dropout)
        if not need_weights:
            return out, None
        visible = layout_mask(layout, self.block_size, q.shape[2], k.shape[2], causal=causal,
                              key_padding_mask=key_padding_mask)
        return out, _dropped_weights(_masked_softmax_weights(q, k, visible), seed, dropout_p)


class HybridMethod(MethodModule):
    """Linear attention plus sliding-window softmax (docs/methods.md §8): per head,
    out = g ⊙ linear(q, k, v) + (1 − g) ⊙ local(q, k, v) with g = sigmoid(gate), a learned
    per-head parameter (`core.gate`, initialised to 0: an even mix). Options: window (128),
    feature_map ("elu" / "relu") and eps for the linear part. Key padding and causal masks;
    dropout drops whole keys in both parts alike."""

    name = "hybrid"
    decoder = staticmethod(decode_hybrid)
    options = ("window", "feature_map", "eps")
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, window=128, feature_map="elu",
                 eps=1e-6):
        super().__init__()
        self.local = LocalMethod(num_heads, head_dim, device, dtype, window=window)
        self.linear = LinearMethod(num_heads, head_dim, device, dtype, feature_map=feature_map, eps=eps)
        self.gate = nn.Parameter(torch.zeros(num_heads, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.gate.zero_()

    def extra_repr(self) -> str:
        return f"heads={self.gate.numel()}"

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        v, key_scale = _drop_keys(v, dropout_p)
        options = dict(causal=causal, key_padding_mask=key_padding_mask, attn_mask=None, dropout_p=0.0,
                       need_weights=need_weights)
        linear_out, linear_weights = self.linear(q, k, v, **options)
        local_out, local_weights = self.local(q, k, v, **options)
        g = torch.sigmoid(self.gate).to(linear_out.dtype)[None, :, None, None]
        out = g * linear_out + (1 - g) * local_out
        if not need_weights:
            return out, None
        weights = g * linear_weights.to(out.dtype) + (1 - g) * local_weights.to(out.dtype)
        return out, weights if key_scale is None else weights * key_scale


class ReformerMethod(MethodModule):
    """Reformer LSH attention (docs/methods.md §7) through linattn.lsh_attention. Shared QK: the query
    projection serves as the keys too (the key projection is unused, as in Reformer). Options:
    n_hashes (4), bucket_size (64), seed (0): the random rotations are a fixed function of the
    seed, the round and the bucket count (integer hashes through Box-Muller, tensor ops only), so
    a layer hashes the same way in every call and torch.compile traces it at any length;
    redraw_in_training (False): in training mode, draw fresh rotations from torch's random
    generator at every forward call instead (the Reformer paper's stochastic hashing; seed it
    with torch.manual_seed), keeping the fixed ones for eval.
    Self-attention only; key padding and causal masks; dropout drops each round's attention
    probabilities in the operator. need_weights builds the dense (T, T) weights (O(T²))."""

    name = "reformer"
    options = ("n_hashes", "bucket_size", "seed", "redraw_in_training")
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, n_hashes=4, bucket_size=64, seed=0,
                 redraw_in_training=False):
        super().__init__()
        _check_positive_int(self.name, "n_hashes", n_hashes)
        _check_positive_int(self.name, "bucket_size", bucket_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"linattn method 'reformer': seed must be an int >= 0, got {seed!r}")
        _check_choice(self.name, "redraw_in_training", redraw_in_training, (True, False))
        self.head_dim, self.n_hashes, self.bucket_size, self.seed = head_dim, n_hashes, bucket_size, seed
        self.redraw_in_training = redraw_in_training

    def extra_repr(self) -> str:
        return (f"n_hashes={self.n_hashes}, bucket_size={self.bucket_size}, seed={self.seed}, "
                f"redraw_in_training={self.redraw_in_training}")

    def rotations(self, length: int, device, dtype) -> torch.Tensor:
        """(n_hashes, head_dim, n_buckets / 2) standard-normal rotations for a sequence length:
        fresh from torch's generator in training with redraw_in_training, else the fixed ones."""
        half = lsh.lsh_buckets_count(length, self.bucket_size) // 2
        if self.training and self.redraw_in_training:
            return torch.randn(self.n_hashes, self.head_dim, half, device=device, dtype=dtype)
        idx = torch.arange(self.n_hashes * self.head_dim * half, device=device, dtype=torch.int64)

        def uniform(salt: int) -> torch.Tensor:
            mixed = ((idx * 2654435761 + self.seed * 97531 + half * 7919 + salt) % 4294967296) * 2246822519
            mixed = (mixed ^ (mixed // 65536)) % 4294967296
            return (mixed.to(torch.float64) + 0.5) / 4294967296.0

        normal = torch.sqrt(-2 * torch.log(uniform(11))) * torch.cos(2 * math.pi * uniform(12345))
        return normal.view(self.n_hashes, self.head_dim, half).to(dtype)

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        if q.shape[2] != k.shape[2]:
            raise ValueError("linattn method 'reformer': self-attention only (as many queries as keys), got "
                             f"{q.shape[2]} queries and {k.shape[2]} keys")
        dropout, seed = _probability_dropout(dropout_p, need_weights)
        rotations = self.rotations(q.shape[2], q.device, q.dtype)
        out = lsh.lsh_attention(q, v, n_hashes=self.n_hashes, bucket_size=self.bucket_size, causal=causal,
                                key_padding_mask=key_padding_mask, rotations=rotations, **dropout)
        if not need_weights:
            return out, None
        buckets = lsh.lsh_buckets(q, rotations)
        keep = None if seed is None else lsh.lsh_dropout_keep(seed, buckets, dropout_p)
        weights = reference.lsh_attention_weights(q, buckets, self.bucket_size, causal=causal,
                                                  key_padding_mask=key_padding_mask, keep=keep, dropout_p=dropout_p)
        return out, weights.to(q.dtype)
