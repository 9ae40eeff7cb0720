"""The delta rule as attention methods (docs/methods.md §11): "deltanet", "gated_deltanet" and "kda".

A method sees each head's q, k and v, not the layer's input, so the writing strength β and the
gate are learned projections of the head's key — itself the key projection of the input, so
β_t = σ(a_h · k_t + b_h) is a projection of x_t whose weight lies in that head's key space:
    β_t   = sigmoid(a_h · k_t + b_h)                                  (both methods)
    g_t   = −e^{A_h} · softplus(c_h · k_t + d_h)                        (gated_deltanet)
    g_t   = −e^{A_h} · softplus(C_h k_t + d_h), one entry per key channel (kda)
with a_h, c_h (H, hd) and C_h (H, hd, hd) initialised to 0, b_h to 0 (β = 1/2), A_h to 0 and d_h
so that softplus(d_h) is log-uniform in [1e-4, 1e-2] over the heads (gated_deltanet) or over each
head's key channels (kda, as Kimi Delta Attention's per-channel dt_bias): at construction β and the
gate do not depend on the token, and the projections learn to make them. (Mamba-2 and Gated DeltaNet
draw the step size from [1e-3, 1e-1] over many heads; with a layer's few heads that made half
of them forget within tens of tokens, and associative recall learned half as fast: 0.48 vs 0.68
at 8 pairs after 1000 steps of examples/associative_recall.py.) The read-out scale is 1: with L2-normalised q and k,
q·k is a cosine, so a query equal to a stored key reads back ≈ β·v, on the scale of the values
(as softmax's convex combination is). With the functional default dk^-1/2 the outputs are
√dk times smaller, and on associative recall (examples/associative_recall.py, d_model 64) the
model learned half as fast.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...delta_rule import delta_rule_attention
from ..decoding import decode_delta_rule
from .base import MethodModule, _softplus_inverse


class DeltaNetMethod(MethodModule):
    """The delta rule, DeltaNet (Yang et al. 2024), docs/methods.md §11: the state is corrected
    towards each value (online regression) instead of accumulating it; β from a learned
    projection of each head's key (linattn.nn.methods.delta). No options. Causal or not (non-causal:
    every query reads the final state); key padding (a padded key writes nothing); dropout skips
    whole keys (they write nothing). need_weights gives the implicit (T, T) matrix out = weights @ v."""

    name = "deltanet"
    decoder = staticmethod(decode_delta_rule)
    hf_implementations = ("linattn_deltanet",)
    options = ()
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False
    gated = False
    per_channel = False  # one gate per key channel (kda) rather than per head
    scale = 1.0  # the read-out scale (module docstring)

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, channels=None):
        """channels: the state's key width when per_channel (default head_dim; linattn.linearize's kda
        student runs the delta rule on wider features of the key)."""
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.beta_weight = nn.Parameter(torch.empty(num_heads, head_dim, **factory))
        self.beta_bias = nn.Parameter(torch.empty(num_heads, **factory))
        if self.gated:
            per_gate = (channels or head_dim,) if self.per_channel else ()  # gates per head and token
            self.gate_weight = nn.Parameter(torch.empty(num_heads, *per_gate, head_dim, **factory))
            self.gate_bias = nn.Parameter(torch.empty(num_heads, *per_gate, **factory))
            self.A_log = nn.Parameter(torch.empty(num_heads, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.beta_weight.zero_()
        self.beta_bias.zero_()
        if self.gated:  # softplus(d) log-uniform over the heads, or over each head's channels
            count = self.gate_bias.shape[-1]
            dt = torch.logspace(math.log10(1e-4), math.log10(1e-2), count, dtype=torch.float64)
            self.gate_weight.zero_()
            self.gate_bias.copy_(_softplus_inverse(dt).expand(self.gate_bias.shape))
            self.A_log.zero_()

    def extra_repr(self) -> str:
        return f"heads={self.beta_bias.numel()}"

    def _per_head(self, k, weight, bias):
        """a_h · k_t + b_h for every (batch, head, t): (N, H, T)."""
        return torch.einsum("nhtd,hd->nht", k, weight.to(k.dtype)) + bias.to(k.dtype)[None, :, None]

    def _per_channel(self, k, weight, bias):
        """C_h k_t + d_h for every (batch, head, t): (N, H, T, channels)."""
        return torch.einsum("nhtd,hed->nhte", k, weight.to(k.dtype)) + bias.to(k.dtype)[None, :, None]

    def beta_and_gate(self, k, skipped=None):
        """(β, g) for keys k (N, H, T, hd); g is None for DeltaNet, (N, H, T) for Gated DeltaNet,
        (N, H, T, channels) for KDA. skipped (N, T) or (N, H, T) bool: keys that neither write (β = 0) nor
        fade the state (g = 0)."""
        beta = torch.sigmoid(self._per_head(k, self.beta_weight, self.beta_bias))
        gate = None
        if self.gated:
            project = self._per_channel if self.per_channel else self._per_head
            step = F.softplus(project(k, self.gate_weight, self.gate_bias))
            rate = torch.exp(self.A_log.to(k.dtype))[None, :, None]
            gate = -(rate[..., None] if self.per_channel else rate) * step
        if skipped is not None:
            skipped = skipped.expand_as(beta) if skipped.dim() == 3 else skipped[:, None, :].expand_as(beta)
            beta = beta.masked_fill(skipped, 0.0)
            if gate is not None:
                gate = gate.masked_fill(skipped[..., None] if self.per_channel else skipped, 0.0)
        return beta, gate

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights):
        skipped = None if key_padding_mask is None else key_padding_mask[:, None, :]
        if dropout_p > 0.0:
            dropped = torch.rand(k.shape[:3], dtype=k.dtype, device=k.device) < dropout_p
            skipped = dropped if skipped is None else skipped | dropped
        beta, gate = self.beta_and_gate(k, skipped)
        out = delta_rule_attention(q, k, v, beta, gate=gate, causal=causal, scale=self.scale)
        if not need_weights:
            return out, None
        # The output is linear in v: the identity as values gives the matrix it applies.
        length = k.shape[2]
        identity = torch.eye(length, device=v.device, dtype=v.dtype).expand(*v.shape[:2], length, length)
        return out, delta_rule_attention(q, k, identity, beta, gate=gate, causal=causal, scale=self.scale)


class GatedDeltaNetMethod(DeltaNetMethod):
    """Gated DeltaNet (Yang, Kautz and Hatamizadeh 2025), docs/methods.md §11: the delta rule on a
    state that also fades by a learned, token-dependent gate e^{g_t}; β and g from learned
    projections of each head's key (linattn.nn.methods.delta). No options; masks, dropout and
    need_weights as for "deltanet"."""

    name = "gated_deltanet"
    hf_implementations = ("linattn_gated_deltanet",)
    gated = True


class KimiDeltaMethod(DeltaNetMethod):
    """Kimi Delta Attention (KDA, Kimi Team 2025), docs/methods.md §11: Gated DeltaNet whose gate is
    one learned, token-dependent factor per key channel, so each row of the state forgets at its own
    rate; β and the gates from learned projections of each head's key (linattn.nn.methods.delta).
    No options; masks, dropout and need_weights as for "deltanet"."""

    name = "kda"
    hf_implementations = ("linattn_kda",)
    gated = True
    per_channel = True
