"""The base of the methods: capabilities, option checks, and what several methods share (key
dropout, probability dropout through the operator, the implicit weights of normalized linear
attention, states of always-visible keys)."""
import math

import torch
from torch import nn

from ... import ops
from ..masks import causal_pattern


def _drop_keys(v: torch.Tensor, dropout_p: float):
    """Values with whole keys dropped (see the module docstring), and the (N, H, 1, S) scale
    applied to them, for the weights."""
    if dropout_p <= 0.0:
        return v, None
    keep = torch.empty(v.shape[:3], device=v.device, dtype=v.dtype).bernoulli_(1.0 - dropout_p)
    scale = keep / (1.0 - dropout_p) if dropout_p < 1.0 else keep  # p = 1 drops every key (0, not 0/0)
    return v * scale.unsqueeze(-1), scale.unsqueeze(-2)


def _probability_dropout(dropout_p: float, need_weights: bool):
    """Attention dropout for the methods whose operator drops each probability after the softmax
    (local, longformer, bigbird, reformer: torch's and flash-attn's meaning, the same mask on every
    device): the functional's keyword arguments, and for need_weights the seed the operator will
    draw (their weights are dropped alike: ops.restricted.dropout_keep_mask), else None."""
    if dropout_p <= 0.0:
        return {}, None
    if not need_weights:  # the operator draws its seed from torch's generator (a graph op when compiled)
        return {"dropout_p": dropout_p}, None
    state = int(torch.randint(0, 2 ** 62, (1,)))
    seed = ops.restricted.dropout_seed_from(torch.Generator().manual_seed(state))
    return {"dropout_p": dropout_p, "generator": torch.Generator().manual_seed(state)}, seed


def _dropped_weights(weights: torch.Tensor, seed, dropout_p: float) -> torch.Tensor:
    """need_weights' (B, H, L, S) weights as the operator dropped them under `seed` (None: as they are)."""
    if seed is None:
        return weights
    keep = ops.restricted.dropout_keep_mask(seed, *weights.shape, dropout_p, device=weights.device)
    return weights * keep / (1.0 - dropout_p)


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


def _softmax_over_visible(scores, visible) -> torch.Tensor:
    """Softmax of `scores` over the visible keys only (a row without any is 0): the weights the
    restricted-softmax methods apply implicitly, for need_weights."""
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)


def _masked_softmax_weights(q, k, visible) -> torch.Tensor:
    """_softmax_over_visible of the scaled dot-product scores."""
    return _softmax_over_visible((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), visible)


class MethodModule(nn.Module):
    """Base of the methods. A state_dict without any of a method's own tensors (one saved from
    torch.nn.MultiheadAttention or timm's Attention) leaves them at their current values instead
    of reporting them missing, so pretrained weights load with strict=True."""

    # Whether add_bias_kv / add_zero_attn keys (which every query sees) can be appended.
    supports_extra_keys = True
    # Whether is_causal is only a hint that needs its attn_mask, as in torch (softmax reproduces
    # torch's module, refusals included); the other methods take is_causal=True alone as causal.
    is_causal_needs_mask = False
    # Whether forward takes global_mask (Longformer's global tokens).
    takes_global_tokens = False
    # Incremental decoding (linattn.nn.decoding): decoder(core, q, k, v, entry, visible_kv, where)
    # -> (out, entry), or None for a method that cannot decode.
    decoder = None
    # The names this method registers with transformers' AttentionInterface (linattn.hf).
    hf_implementations = ()

    @classmethod
    def swap_options(cls, options: dict, first_module: nn.Module) -> dict:
        """The options swap_attention builds every replacement with, given the first module it
        replaces (a method can derive shared tensors from it)."""
        return options

    @classmethod
    def probe_options(cls, options: dict) -> dict:
        """Options that let a probe instance be built only to validate `options` (swap_attention
        on a model with nothing to replace still checks them)."""
        return options

    # Every subclass with a name of its own joins the registry (linattn.nn.METHODS), in the
    # order of definition: a new method is its class and nothing else to list it.
    registry = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            if name in MethodModule.registry:
                raise ValueError(f"linattn: method name {name!r} is taken by {MethodModule.registry[name].__qualname__}")
            MethodModule.registry[name] = cls

    def __init__(self):
        super().__init__()
        self._absent_prefix = None  # set while loading a state_dict that has none of our tensors
        self.register_load_state_dict_post_hook(MethodModule._forgive_absent_tensors)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._absent_prefix = None if any(key.startswith(prefix) for key in state_dict) else prefix
        if self._absent_prefix is None:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )

    @staticmethod
    def _forgive_absent_tensors(module, incompatible_keys) -> None:
        """The tensors of the method's submodules too (a linearized layer's feature maps) stay as
        they are when the state_dict has none of the method's tensors."""
        prefix, module._absent_prefix = module._absent_prefix, None
        if prefix:
            incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix)]


def _check_choice(method: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"linattn method {method!r}: {name} must be one of {list(choices)}, got {value!r}")


def _check_positive_int(method: str, name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int" + (" or None" if allow_none else "")
        raise ValueError(f"linattn method {method!r}: {name} must be {expected}, got {value!r}")


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0): the bias that makes a softplus-squashed gate start at y."""
    return y + torch.log(-torch.expm1(-y))


def _check_eps(method: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or math.isinf(eps):
        raise ValueError(f"linattn method {method!r}: eps must be a finite float > 0, got {eps!r}")
