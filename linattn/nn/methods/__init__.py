"""The attention methods behind linattn.nn.MultiheadAttention(method=...), on (N, H, L, hd) heads.

Each method is a small nn.Module (its learned or drawn tensors are its own parameters and
buffers) with one forward:

    forward(q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights)
        -> (out (N, H, L, hd_v), weights (N, H, L, S) or None)

Softmax takes torch's masks as they are (bool or float, attn_mask (L, S) or (N·H, L, S)).
The kernelized methods never see an attn_mask: the module has turned it into `causal`, and
key_padding_mask into a bool mask (True = padded), or rejected it (see masks.py).

What dropout means differs, because only the softmax methods form attention weights:
  - softmax, linformer: dropout on the attention probabilities, as nn.MultiheadAttention does;
  - local, longformer, bigbird, reformer, forgetting: the same, pair by pair in the restricted-softmax
    operator (its Philox mask, the same on every device; reformer per hashing round;
    need_weights returns the dropped weights);
  - deltanet, gated_deltanet, kda: whole keys are skipped (they write nothing) with probability p;
  - linear, gla, performer, efficient: whole keys (columns of the implicit attention matrix) are
    dropped per batch and head with probability p and the rest scaled by 1/(1 − p), applied to
    the values, so out = weights @ v still holds, with the same expectation as torch's dropout;
    the normalizer is left as it is.
"""
from torch import nn

from .base import MethodModule, _drop_keys  # noqa: F401  (hf uses _drop_keys)
# Importing the families defines (and so registers) their methods.
from .softmax import AdditiveMethod, LinformerMethod, SoftmaxMethod  # noqa: F401
from .kernelized import EfficientMethod, GatedLinearMethod, LinearMethod, PerformerMethod  # noqa: F401
from .restricted import BigBirdMethod, HybridMethod, LocalMethod, LongformerMethod, ReformerMethod  # noqa: F401
from .forgetting import ForgettingMethod  # noqa: F401
from .delta import DeltaNetMethod, GatedDeltaNetMethod, KimiDeltaMethod  # noqa: F401
from .linearized import LinearizedMethod  # noqa: F401

# Every MethodModule subclass with a name, in the order of definition (softmax's family first).
METHODS = dict(MethodModule.registry)


def methods_summary(indent: str = "") -> str:
    """One line per method: its name and the first sentence of its class's docstring (what the
    module's docstring and the documentation list, so the list is never out of date)."""
    lines = []
    for name, cls in METHODS.items():
        first = " ".join(cls.__doc__.split("\n\n")[0].split())
        sentence = first.split(". ")[0].rstrip(".:") + "."
        lines.append(f'{indent}- "{name}": {sentence}')
    return "\n".join(lines)


def method_class(method: str) -> type:
    """The class of `method`, or a ValueError listing the methods."""
    if method not in METHODS:
        raise ValueError(f"linattn: unknown method {method!r}; available methods: {sorted(METHODS)}")
    return METHODS[method]


def build_method(method: str, *, num_heads: int, head_dim: int, device=None, dtype=None, **options) -> nn.Module:
    """The method module for `method` with `options`, or a ValueError listing what is valid."""
    cls = method_class(method)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        valid = list(cls.options) or "none"
        raise ValueError(f"linattn method {method!r}: unknown option(s) {unknown}; valid options: {valid}")
    return cls(num_heads, head_dim, device, dtype, **options)

