"""Kernelized methods (docs/methods.md §1–§3): linear attention, Performer and Efficient Attention,
which never form attention weights (need_weights computes the implicit ones)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import functional
from ...feature_maps import FEATURE_MAPS, PERFORMER_KERNELS, efficient_feature_maps, favor_features, random_features
from .base import (
    MethodModule, _check_choice, _check_eps, _check_positive_int, _drop_keys, _normalized_weights, _softplus_inverse,
    _split_visible,
)
from ..decoding import decode_gated_linear, decode_linear, decode_performer, state_of


class LinearMethod(MethodModule):
    """Kernelized linear attention (Katharopoulos et al.), docs/methods.md §1; options feature_map
    ("elu" for elu+1, or "relu") and eps."""

    name = "linear"
    decoder = staticmethod(decode_linear)
    hf_implementations = ("linattn_linear", "linattn_linear_relu")
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
            initial_state=None if visible_kv is None else state_of(phi_visible, visible_values),
        )
        if not need_weights:
            return out, None
        weights = _normalized_weights(phi(q), phi(k), causal, key_padding_mask, self.eps, phi_visible)
        return out, weights if key_scale is None else weights * key_scale


class ChannelGates(nn.Module):
    """GLA's per-channel log-gates from a head's key (docs/methods.md §1), for the "gla" method and the
    linearized "gla" student: g_t = logsigmoid(W_h k_t + b_h) / 16, one entry per state channel (<= 0),
    with W_h (H, channels, hd) initialised to 0 and b_h so that −g is log-uniform in [1e-4, 1e-2] over
    the channels: at construction the gates do not depend on the token (slow, varied forgetting, as the
    gated_deltanet method starts), and the projection learns to make them."""

    temperature = 16.0  # GLA's normaliser of the log-gates

    def __init__(self, heads: int, head_dim: int, channels: int, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(heads, channels, head_dim, **factory))
        self.bias = nn.Parameter(torch.empty(heads, channels, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        heads, channels = self.bias.shape
        rate = torch.logspace(-4, -2, channels, dtype=torch.float64)  # −g per channel
        # logsigmoid(b) / τ = −rate  <=>  softplus(−b) = τ·rate  <=>  b = −softplus⁻¹(τ·rate).
        self.weight.zero_()
        self.bias.copy_(-_softplus_inverse(self.temperature * rate).expand(heads, channels))

    def extra_repr(self) -> str:
        heads, channels, head_dim = self.weight.shape
        return f"heads={heads}, channels={channels}, head_dim={head_dim}"

    def forward(self, k, skipped=None):
        """(N, H, L, channels) log-gates for keys k (N, H, L, hd); skipped (N, L) bool: keys that fade nothing."""
        x = torch.einsum("nhtd,hed->nhte", k, self.weight.to(k.dtype)) + self.bias.to(k.dtype)[None, :, None]
        gate = F.logsigmoid(x) / self.temperature
        return gate if skipped is None else gate.masked_fill(skipped[:, None, :, None], 0.0)


class GatedLinearMethod(LinearMethod):
    """Gated linear attention (GLA, Yang et al. 2024), docs/methods.md §1: linear attention whose state
    fades feature channel by feature channel by learned, token-dependent gates; options feature_map
    ("elu" for elu+1, or "relu") and eps. A method sees each head's q, k and v, so the log-gates are a
    learned projection of the head's key (itself a projection of the input), squashed as GLA does,
    g_t = logsigmoid(W_h k_t + b_h) / 16 (`core.gates`: ChannelGates, initially token-independent slow
    forgetting). Causal only (the gates fade a state in time); key padding (a padded key writes
    nothing and fades nothing); dropout skips whole keys as for "linear"; need_weights gives the
    implicit (L, L) matrix out = weights @ v."""

    name = "gla"
    decoder = staticmethod(decode_gated_linear)
    hf_implementations = ()
    supports_extra_keys = False

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, feature_map="elu", eps=1e-6):
        super().__init__(num_heads, head_dim, device, dtype, feature_map=feature_map, eps=eps)
        self.gates = ChannelGates(num_heads, head_dim, head_dim, device, dtype)

    def log_gates(self, k, skipped=None):
        """(N, H, L, hd) log-gates for keys k (N, H, L, hd); skipped (N, L) bool: keys that fade nothing."""
        return self.gates(k, skipped)

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        if not causal:
            raise ValueError(f"linattn method {self.name!r}: the gates fade a state in time, so it is causal only; "
                             "call it with is_causal=True or a causal attn_mask")
        gate = self.log_gates(k, key_padding_mask)
        v, key_scale = _drop_keys(v, dropout_p)
        attend = dict(causal=True, feature_map=self.feature_map, eps=self.eps, key_padding_mask=key_padding_mask,
                      gate=gate)
        out = functional.linear_attention(q, k, v, **attend)
        if not need_weights:
            return out, None
        # The output is linear in v (the normalizer does not read it): the identity as values gives
        # the matrix it applies.
        length = k.shape[2]
        identity = torch.eye(length, device=v.device, dtype=v.dtype).expand(*v.shape[:2], length, length)
        weights = functional.linear_attention(q, k, identity, **attend)
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
    decoder = staticmethod(decode_performer)
    hf_implementations = ("linattn_performer",)
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
            initial_state=None if visible_kv is None else state_of(phi_visible, visible_values),
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
