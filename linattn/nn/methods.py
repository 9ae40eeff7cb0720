"""The attention methods behind linattn.nn.MultiheadAttention(method=...), on (N, H, L, hd) heads.

Each method is a small nn.Module (its learned or drawn tensors are its own parameters and
buffers) with one forward:

    forward(q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights)
        -> (out (N, H, L, hd_v), weights (N, H, L, S) or None)

Softmax takes torch's masks as they are (bool or float, attn_mask (L, S) or (N·H, L, S)).
The kernelized methods never see an attn_mask: the module has turned it into `causal`, and
key_padding_mask into a bool mask (True = padded), or rejected it (see masks.py).

What dropout means differs, because only softmax and Linformer form attention weights:
  - softmax, linformer: dropout on the attention probabilities, as nn.MultiheadAttention does;
  - linear, performer, efficient: whole keys (columns of the implicit attention matrix) are
    dropped per batch and head with probability p and the rest scaled by 1/(1 − p), applied to
    the values, so out = weights @ v still holds, with the same expectation as torch's dropout;
    the normalizer is left as it is.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional, lsh, reference
from .._ops import accumulate_dtype
from ..feature_maps import (
    FEATURE_MAPS, PERFORMER_KERNELS, efficient_feature_maps, favor_features, random_features,
)
from ..sparse import layout_mask
from ..window import window_bounds, window_mask
from .masks import causal_pattern, merged_bias


def _drop_keys(v: torch.Tensor, dropout_p: float):
    """Values with whole keys dropped (see the module docstring), and the (N, H, 1, S) scale
    applied to them, for the weights."""
    if dropout_p <= 0.0:
        return v, None
    keep = torch.empty(v.shape[:3], device=v.device, dtype=v.dtype).bernoulli_(1.0 - dropout_p)
    scale = keep / (1.0 - dropout_p)
    return v * scale.unsqueeze(-1), scale.unsqueeze(-2)


def _normalized_weights(phi_q, phi_k, causal: bool, key_padding_mask, eps: float, phi_visible=None) -> torch.Tensor:
    """The attention matrix that normalized linear attention applies implicitly:
    A_ij = φ(q_i)·φ(k_j) / (Σ_j' φ(q_i)·φ(k_j') + eps) over visible keys; the keys of
    phi_visible (every query sees them) come as extra columns after the sequence's."""
    if key_padding_mask is not None:
        phi_k = phi_k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        scores = scores.masked_fill(causal_pattern(*scores.shape[-2:], scores.device), 0.0)
    if phi_visible is not None:
        scores = torch.cat([scores, phi_q @ phi_visible.transpose(-1, -2)], dim=-1)
    return scores / (scores.sum(-1, keepdim=True) + eps)


def _split_visible(v, visible_kv, dropout_p):
    """Key dropout over the sequence's values and the always-visible ones together; returns
    (v, visible values or None, the weights' column scale or None)."""
    if visible_kv is None:
        v, key_scale = _drop_keys(v, dropout_p)
        return v, None, key_scale
    both, key_scale = _drop_keys(torch.cat([v, visible_kv[1]], dim=2), dropout_p)
    return both[:, :, : v.shape[2]], both[:, :, v.shape[2]:], key_scale


def _state_of(phi_visible: torch.Tensor, values: torch.Tensor):
    """The recurrent state (S, z) of keys every query sees, in the accumulation dtype."""
    acc = accumulate_dtype(values.dtype)
    phi, values = phi_visible.to(acc), values.to(acc)
    return phi.transpose(-1, -2) @ values, phi.sum(-2)


class MethodModule(nn.Module):
    """Base of the methods. A state_dict without any of a method's own tensors (one saved from
    torch.nn.MultiheadAttention or timm's Attention) leaves them at their current values instead
    of reporting them missing, so pretrained weights load with strict=True."""

    # Whether add_bias_kv / add_zero_attn keys (which every query sees) can be appended.
    supports_extra_keys = True
    # Whether is_causal is only a hint that needs its attn_mask, as in torch (softmax reproduces
    # torch's module, refusals included); the other methods take is_causal=True alone as causal.
    is_causal_needs_mask = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if any(key.startswith(prefix) for key in state_dict):
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )


def _check_choice(method: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"linattn method {method!r}: {name} must be one of {list(choices)}, got {value!r}")


def _check_positive_int(method: str, name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int" + (" or None" if allow_none else "")
        raise ValueError(f"linattn method {method!r}: {name} must be {expected}, got {value!r}")


def _check_eps(method: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or math.isinf(eps):
        raise ValueError(f"linattn method {method!r}: eps must be a finite float > 0, got {eps!r}")


class SoftmaxMethod(MethodModule):
    """Exact softmax attention (docs/methods.md §0) with nn.MultiheadAttention's mask semantics."""

    name = "softmax"
    options = ()
    supports_causal = True
    takes_any_mask = True
    is_causal_needs_mask = True

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        batch, heads = q.shape[:2]
        bias = merged_bias(attn_mask, key_padding_mask, batch, heads, q.dtype)
        if causal and attn_mask is None and bias is not None:
            # A causal request plus key padding: put both in the one additive mask.
            bias = bias.masked_fill(causal_pattern(q.shape[2], k.shape[2], q.device), float("-inf"))
        causal_flag = causal and bias is None
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=causal_flag)
            return out, None
        # The same steps as nn.MultiheadAttention's need_weights path: scale q, add the mask.
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias
        if causal_flag:
            scores = scores.masked_fill(causal_pattern(q.shape[2], k.shape[2], q.device), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return weights @ v, weights


class LinearMethod(MethodModule):
    """Kernelized linear attention (Katharopoulos et al.), docs/methods.md §1; options feature_map
    ("elu" for elu+1, or "relu") and eps."""

    name = "linear"
    options = ("feature_map", "eps")
    supports_causal = True
    takes_any_mask = False

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, feature_map="elu", eps=1e-6):
        super().__init__()
        _check_choice(self.name, "feature_map", feature_map, ("elu", "relu"))
        _check_eps(self.name, eps)
        self.feature_map, self.eps = feature_map, float(eps)

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map!r}, eps={self.eps}"

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights, visible_kv=None):
        """visible_kv: (keys, values) (N, H, e, hd) that every query sees (nn.MultiheadAttention's
        bias_kv / zero_attn in causal mode); they enter as the initial recurrent state."""
        phi = FEATURE_MAPS[self.feature_map]
        v, visible_values, key_scale = _split_visible(v, visible_kv, dropout_p)
        phi_visible = None if visible_kv is None else phi(visible_kv[0])
        out = functional.linear_attention(
            q, k, v, causal=causal, feature_map=self.feature_map, eps=self.eps, key_padding_mask=key_padding_mask,
            initial_state=None if visible_kv is None else _state_of(phi_visible, visible_values),
        )
        if not need_weights:
            return out, None
        weights = _normalized_weights(phi(q), phi(k), causal, key_padding_mask, self.eps, phi_visible)
        return out, weights if key_scale is None else weights * key_scale


class PerformerMethod(MethodModule):
    """Performer FAVOR+ (docs/methods.md §2). Options:
      nb_features: random features m (default ⌈hd·ln hd⌉);
      orthogonal, scaling: how the projection is drawn (linattn.random_features);
      kernel: "softmax" (estimates softmax attention) or "relu";
      feature_redraw_interval: in training, draw a new projection every this many forward calls
        (None: never); eval mode never redraws. Under torch.compile the count is not kept (a
        compiled graph cannot redraw): call redraw_projection() between steps instead;
      seed: seeds the draws (reproducible projections); eps: added to the normalizer.
    The projection is a buffer, so it is saved in the state_dict and moves with the module."""

    name = "performer"
    options = ("nb_features", "orthogonal", "scaling", "kernel", "feature_redraw_interval", "seed", "eps")
    supports_causal = True
    takes_any_mask = False

    def __init__(
        self, num_heads: int, head_dim: int, device=None, dtype=None, *, nb_features=None, orthogonal=True,
        scaling="norm", kernel="softmax", feature_redraw_interval=1000, seed=None, eps=1e-6,
    ):
        super().__init__()
        if nb_features is None:
            nb_features = max(1, math.ceil(head_dim * math.log(head_dim))) if head_dim > 1 else 1
        _check_positive_int(self.name, "nb_features", nb_features)
        _check_positive_int(self.name, "feature_redraw_interval", feature_redraw_interval, allow_none=True)
        _check_choice(self.name, "kernel", kernel, PERFORMER_KERNELS)
        _check_choice(self.name, "scaling", scaling, ("norm", "sqrt_d"))
        _check_choice(self.name, "orthogonal", orthogonal, (True, False))
        _check_eps(self.name, eps)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"linattn method 'performer': seed must be an int or None, got {seed!r}")
        self.nb_features, self.head_dim = nb_features, head_dim
        self.orthogonal, self.scaling, self.kernel = orthogonal, scaling, kernel
        self.feature_redraw_interval, self.eps = feature_redraw_interval, float(eps)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._calls_since_redraw = 0
        self.register_buffer("projection", self._draw(device, dtype))

    def reset_parameters(self) -> None:
        """Draws the projection afresh, in place: with a seed, the one drawn at construction
        (so meta-device init then to_empty() and reset_parameters() gives the same module)."""
        if self.seed is not None:
            self._generator.manual_seed(self.seed)
        self.redraw_projection()

    def extra_repr(self) -> str:
        return (
            f"nb_features={self.nb_features}, kernel={self.kernel!r}, orthogonal={self.orthogonal}, "
            f"feature_redraw_interval={self.feature_redraw_interval}"
        )

    def _draw(self, device, dtype) -> torch.Tensor:
        return random_features(
            self.nb_features, self.head_dim, orthogonal=self.orthogonal, scaling=self.scaling,
            generator=self._generator, device=device, dtype=dtype,
        )

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draws a new random projection in place (same shape, device and dtype)."""
        self.projection.copy_(self._draw(self.projection.device, self.projection.dtype))
        self._calls_since_redraw = 0

    def _maybe_redraw(self) -> None:
        if not self.training or self.feature_redraw_interval is None or torch.compiler.is_compiling():
            return
        if self._calls_since_redraw >= self.feature_redraw_interval:
            self.redraw_projection()
        self._calls_since_redraw += 1

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights, visible_kv=None):
        """visible_kv: as for LinearMethod (causal only here, where key features do not depend
        on the sequence, so the visible keys' state is on the same scale)."""
        self._maybe_redraw()
        v, visible_values, key_scale = _split_visible(v, visible_kv, dropout_p)
        phi_visible = None
        if visible_kv is not None:
            phi_visible = favor_features(visible_kv[0], self.projection, is_query=False, kernel=self.kernel, causal=True)
        out = functional.performer_attention(
            q, k, v, self.projection, causal=causal, kernel=self.kernel, eps=self.eps,
            key_padding_mask=key_padding_mask,
            initial_state=None if visible_kv is None else _state_of(phi_visible, visible_values),
        )
        if not need_weights:
            return out, None
        phi_q = favor_features(q, self.projection, is_query=True, kernel=self.kernel, causal=causal)
        phi_k = favor_features(
            k, self.projection, is_query=False, kernel=self.kernel, causal=causal, key_padding_mask=key_padding_mask
        )
        weights = _normalized_weights(phi_q, phi_k, causal, key_padding_mask, self.eps, phi_visible).to(q.dtype)
        return out, weights if key_scale is None else weights * key_scale


class EfficientMethod(MethodModule):
    """Efficient Attention (Shen et al.), docs/methods.md §3: non-causal, no options."""

    name = "efficient"
    options = ()
    supports_causal = False
    takes_any_mask = False

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        v, key_scale = _drop_keys(v, dropout_p)
        out = functional.efficient_attention(q, k, v, key_padding_mask=key_padding_mask)
        if not need_weights:
            return out, None
        rho_q, rho_k = efficient_feature_maps(q, k, key_padding_mask)
        weights = (rho_q @ rho_k.transpose(-1, -2)).to(q.dtype)
        return out, weights if key_scale is None else weights * key_scale


def _softmax_over_visible(scores, visible) -> torch.Tensor:
    """Softmax of `scores` over the visible keys only (a row without any is 0): the weights the
    restricted-softmax methods apply implicitly, for need_weights."""
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)


def _masked_softmax_weights(q, k, visible) -> torch.Tensor:
    """_softmax_over_visible of the scaled dot-product scores."""
    return _softmax_over_visible((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), visible)


class LocalMethod(MethodModule):
    """Sliding-window softmax attention (docs/methods.md §5) through linattn.sliding_window_attention.
    Options:
      window: an int w (each query sees the keys within w positions; causal: the w before it
        and itself) or a (left, right) pair with flash-attn's window_size meaning; default 128;
      dilation: keep every d-th key of the window (Longformer's dilated windows), default 1.
    Accepts key padding and causal masks; dropout drops whole keys, as for the linear methods."""

    name = "local"
    options = ("window", "dilation")
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False  # bias_kv / zero_attn keys would fall outside most windows

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, window=128, dilation=1):
        super().__init__()
        where = f"linattn method {self.name!r}"
        window_bounds(where, window, causal=False)  # raises on a bad window
        _check_positive_int(self.name, "dilation", dilation)
        self.window, self.dilation = window, dilation

    def extra_repr(self) -> str:
        return f"window={self.window!r}, dilation={self.dilation}"

    def global_mask(self, k, given):
        """The global tokens for keys k: the ones given (longformer), or none."""
        return given

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights, global_mask=None):
        v, key_scale = _drop_keys(v, dropout_p)
        global_mask = self.global_mask(k, global_mask)
        out = functional.sliding_window_attention(
            q, k, v, self.window, causal=causal, dilation=self.dilation, global_mask=global_mask,
            key_padding_mask=key_padding_mask,
        )
        if not need_weights:
            return out, None
        visible = window_mask(
            q.shape[2], k.shape[2], self.window, causal=causal, dilation=self.dilation, global_mask=global_mask,
            key_padding_mask=key_padding_mask, batch=q.shape[0], device=q.device,
        )
        weights = _masked_softmax_weights(q, k, visible)
        return out, weights if key_scale is None else weights * key_scale


class LongformerMethod(LocalMethod):
    """Longformer (docs/methods.md §5): a sliding window plus global tokens, which see every key and
    are seen by every query. Options: window and dilation as for "local", and global_tokens:
    how many leading tokens are global (default 1: a [CLS] token). MultiheadAttention's
    forward(..., global_mask=(N, L) bool) overrides it per call. Self-attention, non-causal."""

    name = "longformer"
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
    later keys inside the layout too); dropout drops whole keys, as for the linear methods."""

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
        v, key_scale = _drop_keys(v, dropout_p)
        layout = self.layout(k.shape[2], k.device)
        out = functional.block_sparse_attention(q, k, v, layout, self.block_size, causal=causal,
                                                key_padding_mask=key_padding_mask)
        if not need_weights:
            return out, None
        visible = layout_mask(layout, self.block_size, q.shape[2], k.shape[2], causal=causal,
                              key_padding_mask=key_padding_mask)
        weights = _masked_softmax_weights(q, k, visible)
        return out, weights if key_scale is None else weights * key_scale


class HybridMethod(MethodModule):
    """Linear attention plus sliding-window softmax (docs/methods.md §8): per head,
    out = g ⊙ linear(q, k, v) + (1 − g) ⊙ local(q, k, v) with g = sigmoid(gate), a learned
    per-head parameter (`core.gate`, initialised to 0: an even mix). Options: window (128),
    feature_map ("elu" / "relu") and eps for the linear part. Key padding and causal masks;
    dropout drops whole keys in both parts alike."""

    name = "hybrid"
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
    Self-attention only; key padding and causal masks; dropout drops whole keys. need_weights
    builds the dense (T, T) weights (O(T²))."""

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
        v, key_scale = _drop_keys(v, dropout_p)
        rotations = self.rotations(q.shape[2], q.device, q.dtype)
        out = lsh.lsh_attention(q, v, n_hashes=self.n_hashes, bucket_size=self.bucket_size, causal=causal,
                                key_padding_mask=key_padding_mask, rotations=rotations)
        if not need_weights:
            return out, None
        weights = reference.lsh_attention_weights(q, lsh.lsh_buckets(q, rotations), self.bucket_size, causal=causal,
                                                  key_padding_mask=key_padding_mask).to(q.dtype)
        return out, weights if key_scale is None else weights * key_scale


class AdditiveMethod(MethodModule):
    """Additive (Bahdanau) attention (docs/methods.md §9) through linattn.additive_attention: score
    w_h · tanh(q_i + k_j) with a learned per-head vector `core.w` (H, head_dim), initialised
    N(0, 1/head_dim). Option window (None: every key; an int or (left, right) as for "local").
    Key padding and causal masks; dropout drops whole keys. need_weights builds the dense
    (T, S, head_dim) tanh tensor."""

    name = "additive"
    options = ("window",)
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, window=None):
        super().__init__()
        if window is not None:
            window_bounds("linattn method 'additive'", window, causal=False)  # raises on a bad window
        self.window = window
        self.w = nn.Parameter(torch.empty(num_heads, head_dim, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.w, std=self.w.shape[1] ** -0.5)

    def extra_repr(self) -> str:
        return f"heads={self.w.shape[0]}, window={self.window!r}"

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        v, key_scale = _drop_keys(v, dropout_p)
        w = self.w.to(q.dtype)
        out = functional.additive_attention(q, k, v, w, window=self.window, causal=causal,
                                            key_padding_mask=key_padding_mask)
        if not need_weights:
            return out, None
        visible = window_mask(q.shape[2], k.shape[2], (-1, -1) if self.window is None else self.window, causal=causal,
                              key_padding_mask=key_padding_mask, batch=q.shape[0], device=q.device)
        scores = torch.einsum("bhtsd,hd->bhts", torch.tanh(q[:, :, :, None] + k[:, :, None]), w)
        weights = _softmax_over_visible(scores, visible)
        return out, weights if key_scale is None else weights * key_scale


LINFORMER_SHARING = ("none", "headwise", "kv", "layerwise")


class LinformerMethod(MethodModule):
    """Linformer (Wang et al.), docs/methods.md §4: keys and values projected along the sequence to k
    rows by learned E, F (k, max_seq_len), then softmax attention. Options:
      max_seq_len (required): the longest key sequence; shorter ones use E[:, :S], longer raise;
      k: projected length (default 256);
      sharing: "none" (E, F per head), "headwise" (one E, F for all heads), "kv" (E = F, one for
        all heads), "layerwise" (one E = F for every swapped layer of a model: swap_attention
        shares it; a module built alone owns its own);
      shared_projection: the (k, max_seq_len) Parameter to share under "layerwise".
    Non-causal only."""

    name = "linformer"
    options = ("max_seq_len", "k", "sharing", "shared_projection")
    supports_causal = False
    takes_any_mask = False

    def __init__(
        self, num_heads: int, head_dim: int, device=None, dtype=None, *, max_seq_len=None, k=256,
        sharing="headwise", shared_projection: Optional[nn.Parameter] = None,
    ):
        super().__init__()
        if max_seq_len is None:
            raise ValueError(
                "linattn method 'linformer': needs max_seq_len, the longest key sequence it will see "
                "(its projections E, F are (k, max_seq_len))"
            )
        _check_positive_int(self.name, "max_seq_len", max_seq_len)
        _check_positive_int(self.name, "k", k)
        _check_choice(self.name, "sharing", sharing, LINFORMER_SHARING)
        self.max_seq_len, self.k, self.sharing = max_seq_len, k, sharing
        shape = (num_heads, k, max_seq_len) if sharing == "none" else (k, max_seq_len)
        if shared_projection is not None:
            if sharing != "layerwise" or tuple(shared_projection.shape) != shape:
                raise ValueError(
                    f"linattn method 'linformer': shared_projection must be a {shape} Parameter used with "
                    f"sharing='layerwise', got {tuple(shared_projection.shape)} with sharing={sharing!r}"
                )
            self.E = shared_projection
        else:
            self.E = nn.Parameter(self.initial_projection(shape, device, dtype))
        if sharing in ("none", "headwise"):
            self.F = nn.Parameter(self.initial_projection(shape, device, dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialises E (and F) in place, as at construction; a layerwise-shared projection
        is re-initialised by each module that holds it, which leaves it a valid draw."""
        for projection in (self.E, getattr(self, "F", None)):
            if projection is not None:
                projection.copy_(self.initial_projection(projection.shape, projection.device, projection.dtype))

    @staticmethod
    def initial_projection(shape, device=None, dtype=None) -> torch.Tensor:
        # N(0, 1/k): a projected key is then a sum of keys of about its own scale.
        return torch.randn(shape, device=device, dtype=dtype) * shape[-2] ** -0.5

    def extra_repr(self) -> str:
        return f"max_seq_len={self.max_seq_len}, k={self.k}, sharing={self.sharing!r}"

    def value_projection(self) -> torch.Tensor:
        return self.F if self.sharing in ("none", "headwise") else self.E

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        length = k.shape[2]
        if length > self.max_seq_len:
            raise ValueError(
                f"linattn method 'linformer': the key sequence has {length} tokens, more than "
                f"max_seq_len={self.max_seq_len} that its projections were built for"
            )
        E = self.E[..., :length].to(k.dtype)
        F_ = self.value_projection()[..., :length].to(v.dtype)
        if key_padding_mask is not None:
            # Zeroing the projection's columns of padded keys = zeroing those keys and values.
            keep = (~key_padding_mask)[:, None, None, :].to(k.dtype)  # (N, 1, 1, S)
            E, F_ = E * keep, F_ * keep
        k_proj, v_proj = E @ k, F_ @ v  # (N, H, k, hd)
        if not need_weights:
            return F.scaled_dot_product_attention(q, k_proj, v_proj, dropout_p=dropout_p), None
        probs = torch.softmax((q * math.sqrt(1.0 / q.shape[-1])) @ k_proj.transpose(-1, -2), dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        # out = P F V: the equivalent weights over the original keys are P F.
        return probs @ v_proj, probs @ F_


METHODS = {
    cls.name: cls for cls in (
        SoftmaxMethod, LinearMethod, PerformerMethod, EfficientMethod, LinformerMethod, LocalMethod, LongformerMethod,
        BigBirdMethod, HybridMethod, ReformerMethod, AdditiveMethod,
    )
}


def methods_summary(indent: str = "") -> str:
    """One line per method: its name and the first sentence of its class's docstring (what the
    module's docstring and the documentation list, so the list is never out of date)."""
    lines = []
    for name, cls in METHODS.items():
        first = " ".join(cls.__doc__.split("\n\n")[0].split())
        sentence = first.split(". ")[0].rstrip(".:") + "."
        lines.append(f'{indent}- "{name}": {sentence}')
    return "\n".join(lines)


def build_method(method: str, *, num_heads: int, head_dim: int, device=None, dtype=None, **options) -> nn.Module:
    """The method module for `method` with `options`, or a ValueError listing what is valid."""
    if method not in METHODS:
        raise ValueError(f"linattn: unknown method {method!r}; available methods: {sorted(METHODS)}")
    cls = METHODS[method]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        valid = list(cls.options) or "none"
        raise ValueError(f"linattn method {method!r}: unknown option(s) {unknown}; valid options: {valid}")
    return cls(num_heads, head_dim, device, dtype, **options)
