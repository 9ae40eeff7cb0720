"""Methods that form softmax attention weights: exact softmax (docs/methods.md §0), Linformer's
softmax over projected keys (§4) and additive attention (§9)."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import functional
from ...window import window_bounds, window_mask
from ..masks import causal_pattern, merged_bias
from ..decoding import decode_softmax
from .base import MethodModule, _check_choice, _check_positive_int, _drop_keys, _softmax_over_visible


class SoftmaxMethod(MethodModule):
    """Exact softmax attention (docs/methods.md §0) with nn.MultiheadAttention's mask semantics."""

    name = "softmax"
    decoder = staticmethod(decode_softmax)
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

    @classmethod
    def swap_options(cls, options: dict, first_module: nn.Module) -> dict:
        """sharing="layerwise": one projection for every module swap_attention replaces, made here
        (on the first module's device and dtype) unless the caller passes shared_projection."""
        if options.get("sharing") != "layerwise" or options.get("shared_projection") is not None:
            return options
        max_seq_len = options.get("max_seq_len")
        if max_seq_len is None:
            return options  # building the modules will say it is required
        weight = next(first_module.parameters())
        shape = (options.get("k", 256), max_seq_len)
        return {**options,
                "shared_projection": nn.Parameter(cls.initial_projection(shape, device=weight.device, dtype=weight.dtype))}

    @classmethod
    def probe_options(cls, options: dict) -> dict:
        return options if "max_seq_len" in options else {**options, "max_seq_len": 1}

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
