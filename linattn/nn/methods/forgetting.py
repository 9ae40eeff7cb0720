"""The Forgetting Transformer (FoX; Lin et al., ICLR 2025) as an attention method, "forgetting"
(docs/methods.md §5.1): softmax attention whose scores decay by a forget gate per token and head.

A method sees each head's q, k and v, not the layer's input, so the forget gate is a learned
projection of the head's key, as the delta methods' β is (linattn.nn.methods.delta: a projection of
x_t whose weight lies in the head's key space):
    log f_t = logsigmoid(a_h · k_t + b_h),
a_h (H, hd) initialised to 0 and b_h so that −log f_t = softplus(−b_h) is log-uniform in
[1e-5, 1e-3] over the heads. At construction the layer is the softmax it replaces but for a decay
of at most e^{−0.001·distance} (a key 1000 tokens back keeps e^{−1} of its weight in the fastest
head), so a pretrained model swapped to it starts where it was and learns to forget. FoX's own
initialisation (a = 0, b = 0: f = 1/2) would halve every score's weight per token at the start.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...forgetting import forgetting_attention
from ...reference import forget_decay
from ...window import window_bounds, window_mask
from ... import _validation as check
from ... import ops
from ..decoding import decode_forgetting
from .base import MethodModule, _dropped_weights, _probability_dropout, _softmax_over_visible, _softplus_inverse


class ForgettingMethod(MethodModule):
    """The Forgetting Transformer's attention (FoX), docs/methods.md §5.1: softmax attention with a learned
    forget gate per token and head (from a projection of each head's key; linattn.nn.methods.forgetting),
    through linattn.forgetting_attention. Options: window (default −1: every earlier key; an int or flash-attn's
    (left, right) pair, as "local"), softcap (Gemma-2's, default None). Causal or not (non-causal: later keys
    fade by the gates between, read backwards); key padding; dropout drops attention probabilities in the
    operator, as local; incremental decoding keeps the keys, values and gates seen (a growing cache)."""

    name = "forgetting"
    decoder = staticmethod(decode_forgetting)
    options = ("window", "softcap")
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False  # bias_kv / zero_attn keys have no position to fade from

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, window=-1, softcap=None):
        super().__init__()
        where = f"linattn method {self.name!r}"
        window_bounds(where, window, causal=False)  # raises on a bad window
        self.window = window
        self.softcap = check.softcap_of(where, softcap) or None
        factory = dict(device=device, dtype=dtype)
        self.forget_weight = nn.Parameter(torch.empty(num_heads, head_dim, **factory))
        self.forget_bias = nn.Parameter(torch.empty(num_heads, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        rates = torch.logspace(math.log10(1e-5), math.log10(1e-3), self.forget_bias.numel(), dtype=torch.float64)
        self.forget_weight.zero_()
        self.forget_bias.copy_(-_softplus_inverse(rates))  # softplus(−b) = −log σ(b) = the rate

    def extra_repr(self) -> str:
        cap = f", softcap={self.softcap:g}" if self.softcap else ""
        return f"heads={self.forget_bias.numel()}, window={self.window!r}{cap}"

    def log_forget(self, k: torch.Tensor) -> torch.Tensor:
        """log f_t (N, H, S) for keys k (N, H, S, hd), in float32 at least."""
        dtype = torch.promote_types(k.dtype, torch.float32)
        logits = torch.einsum("nhtd,hd->nht", k.to(dtype), self.forget_weight.to(dtype))
        return F.logsigmoid(logits + self.forget_bias.to(dtype)[None, :, None])

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        dropout, seed = _probability_dropout(dropout_p, need_weights)
        log_f = self.log_forget(k)
        out = forgetting_attention(q, k, v, log_f, causal=causal, window=self.window,
                                   key_padding_mask=key_padding_mask, softcap=self.softcap, **dropout)
        if not need_weights:
            return out, None
        visible = window_mask(q.shape[2], k.shape[2], self.window, causal=causal, key_padding_mask=key_padding_mask,
                              batch=q.shape[0], device=q.device)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        scores = ops.restricted.soft_capped(scores, self.softcap) + forget_decay(log_f, q.shape[2], k.shape[2]).to(scores.dtype)
        return out, _dropped_weights(_softmax_over_visible(scores, visible), seed, dropout_p)
