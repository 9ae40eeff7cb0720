"""Linearizing Hugging Face transformers models: every attention layer the model runs through
transformers' AttentionInterface gets a LinearizedAttention (attached to the layer's module as
`linattn_linearized`, so it is in the model's parameters and state_dict), and the model runs the
"linattn_linearized" implementation, which hands each layer's q, k, v to it.

The layers are found by running the model once on example inputs with a probing implementation
(the exact softmax, recording which modules call it and their q/k/v shapes): no list of
architectures, any model whose attention goes through the interface (BERT, Llama-family, ViT, ...).
"""
from collections.abc import Mapping
from typing import Dict, List, NamedTuple, Optional

import torch

from ..functional import linear_attention
from ..hf.attention import _kernelized, _prepare, _window_binds
from .attention import LINEAR_EPS, LinearizedAttention

IMPLEMENTATION = "linattn_linearized"
PROBE = "linattn_probe"
ATTRIBUTE = "linattn_linearized"


def _where(module) -> str:
    return f"linattn.linearize ({module.__class__.__name__})"


def _learned_linear(module, q, k, v, causal, padding, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The linear student with the layer's learned feature maps, in the form linattn.hf's kernelized
    attention takes (so it decodes from a LinearStateCache's constant-size state)."""
    layer = getattr(module, ATTRIBUTE)
    return linear_attention(layer.feature_map_q(q), layer.feature_map_k(k), v, causal=causal, feature_map=None,
                            eps=LINEAR_EPS, key_padding_mask=padding, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _reject_dropped_keys(where, seen) -> None:
    """A student attends every key of the sequence, also in a layer whose model attends in a sliding
    window (its teacher does); a transformers cache that dropped keys older than the window (a
    sliding layer's) cannot give it them."""
    if seen.key_offset > 0:
        raise ValueError(f"{where}: transformers' cache dropped this sliding-window layer's first {seen.key_offset} "
                         "keys, which the linearized student attends: generate with "
                         "past_key_values=linattn.hf.LinearStateCache() (constant size) or use_cache=False")


# Built once: the kernelized wrapper (caches, state cache, packed documents) around the learned maps; the
# model's own window is the teacher's (the student attends every key).
_learned_linear_attention = _kernelized(_learned_linear, window_rule=_reject_dropped_keys)


def linearized_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function for linearized layers: (output (B, T, H, dv), None). The
    linear student runs as linattn.hf's linear attention does (caches, LinearStateCache's
    recurrent state, packed documents); the hybrid, the delta-rule students and the teacher /
    transfer modes take whole sequences (and decode from a LinearStateCache's entry)."""
    layer = getattr(module, ATTRIBUTE, None)
    if layer is None:
        raise ValueError(f"{_where(module)}: this attention layer was not linearized (run linattn.linearize on the "
                         "model that owns it)")
    if kwargs.get("softcap") != layer.softcap:
        raise ValueError(f"{_where(module)}: the layer runs with softcap={kwargs.get('softcap')!r}, but was linearized "
                         f"with softcap={layer.softcap!r} (the teacher's logit soft-capping)")
    sinks = kwargs.get("s_aux")  # gpt-oss's attention-sink logits (H,), the model's own parameter
    if layer.mode == "student" and layer.plain_linear:
        return _learned_linear_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    key, value, seen, state_layer = _prepare(module, query, key, value, attention_mask, 0.0, kwargs)
    if seen.documents is not None:
        raise ValueError(f"{_where(module)}: linearized layers run plain causal or bidirectional attention with key "
                         "padding (not yet packed documents)")
    if layer.mode == "student":
        _reject_dropped_keys(_where(module), seen)
    # The teacher attends in the model's own window where it hides keys; the students learn to match it.
    window = tuple(seen.window) if _window_binds(seen) else (-1, -1)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if state_layer is not None:  # the hybrid or delta-rule student decoding from its constant-size state
        if seen.padding is not None:
            raise ValueError(f"{_where(module)}: the {layer.method} student's LinearStateCache takes unpadded "
                             "sequences (one prompt, or prompts of one length); with padded prompts use transformers' "
                             "own cache")
        out = state_layer.attend(lambda initial_state, output_final_state: layer.decode(
            query, key, value, scale, initial_state, sinks))
    elif seen.causal and query.shape[2] != key.shape[2]:
        # transformers' key/value cache: the new queries are the last rows of the whole sequence.
        past = query.new_zeros(*query.shape[:2], key.shape[2] - query.shape[2], query.shape[3])
        out = layer(torch.cat([past, query], dim=2), key, value, scale, seen.padding, True, window, sinks)
        out = out[:, :, -query.shape[2]:]
    else:
        out = layer(query, key, value, scale, seen.padding, seen.causal, window, sinks)
    return out.transpose(1, 2).contiguous(), None


class ProbedLayer(NamedTuple):
    """An attention layer as the probe saw it: its module, heads, head dims, and the score terms
    transformers passed (Gemma-2's logit soft-capping, gpt-oss's attention sinks)."""
    module: torch.nn.Module
    heads: int
    head_dim: int
    value_dim: int
    softcap: Optional[float]
    has_sinks: bool


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The exact softmax (transformers' sdpa function), recording who called it with what shapes
    and score terms."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _probe_attention.seen.setdefault(id(module), ProbedLayer(module, query.shape[1], query.shape[3], value.shape[3],
                                                             kwargs.get("softcap"), kwargs.get("s_aux") is not None))
    kwargs.pop("softcap", None)  # (sdpa refuses a cap; the probe's outputs only carry the model on to its layers)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


_probe_attention.seen = {}


def register() -> None:
    """Adds the linearized and probing implementations to transformers' interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from ..hf.masks import compact_mask

    AttentionInterface.register(IMPLEMENTATION, linearized_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, compact_mask)
    AttentionInterface.register(PROBE, _probe_attention)
    AttentionMaskInterface.register(PROBE, sdpa_mask)


def attention_layers(model, example_inputs) -> List[ProbedLayer]:
    """Every attention layer the model runs on example_inputs, as the probe saw it."""
    previous = model.config._attn_implementation
    _probe_attention.seen = {}
    model.set_attn_implementation(PROBE)
    try:
        with torch.no_grad():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            else:
                model(example_inputs)
        return list(_probe_attention.seen.values())
    finally:
        model.set_attn_implementation(previous)
        _probe_attention.seen = {}


def _dummy_inputs(model):
    """Inputs to find the attention layers with: a blank image for vision models, else the
    model's own dummy inputs (a few token ids)."""
    config = model.config
    if getattr(model, "main_input_name", None) == "pixel_values" and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else tuple(config.image_size)
        size = (size, size) if isinstance(size, int) else size
        parameter = next(model.parameters())
        return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), *size, dtype=parameter.dtype,
                                            device=parameter.device)}
    return model.dummy_inputs


def linearize_hf(model, example_inputs, options: Dict) -> List[str]:
    """Attaches a LinearizedAttention to every attention layer of a transformers model and switches
    the model to it; returns the layers' qualified names."""
    register()
    if example_inputs is None:
        example_inputs = _dummy_inputs(model)
    layers = attention_layers(model, example_inputs)
    if not layers:
        raise ValueError("linattn.linearize: the model ran no attention through transformers' AttentionInterface on "
                         "the example inputs; nothing to linearize")
    names = {id(module): name for name, module in model.named_modules()}
    replaced = []
    for probed in layers:
        module = probed.module
        if getattr(module, ATTRIBUTE, None) is not None:
            raise ValueError(f"linattn.linearize: {names[id(module)]} is already linearized")
        parameter = next(model.parameters())
        layer = LinearizedAttention(probed.heads, probed.head_dim, softcap=probed.softcap, sinks=probed.has_sinks,
                                    **options)
        layer = layer.to(device=parameter.device, dtype=parameter.dtype)
        module.add_module(ATTRIBUTE, layer)
        replaced.append(names[id(module)])
    model.set_attn_implementation(IMPLEMENTATION)
    return replaced
