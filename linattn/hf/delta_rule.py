"""The delta rule in Hugging Face transformers models (docs/methods.md §11): "linattn_deltanet",
"linattn_gated_deltanet" and "linattn_kda". The learned β (and gate) projections of linattn.nn's
methods need a home in the model: use_delta_rule(model) finds the attention layers (by running the
model once, as linattn.linearize does), attaches a DeltaNetMethod / GatedDeltaNetMethod / KimiDeltaMethod to each as
`linattn_delta_rule` (so they are in model.parameters() and its state_dict) and switches the
model to the implementation; the attention function hands each layer's q, k, v to it."""
from typing import List, Optional

from ..delta_rule import delta_rule_attention
from ..nn.methods.delta import DeltaNetMethod, GatedDeltaNetMethod, KimiDeltaMethod
from .attention import _kernelized

ATTRIBUTE = "linattn_delta_rule"
_CORES = {"linattn_deltanet": DeltaNetMethod, "linattn_gated_deltanet": GatedDeltaNetMethod,
          "linattn_kda": KimiDeltaMethod}


def _use_arguments(core) -> str:
    """The use_delta_rule arguments that attach `core` (a DeltaNetMethod class)."""
    if not core.gated:
        return ", gated=False"
    return ", per_channel=True" if core.per_channel else ""


def _delta_rule(name):
    def attend(module, q, k, v, causal, padding, initial_state=None, output_final_state=False, cu_seqlens=None):
        core = getattr(module, ATTRIBUTE, None)
        if not isinstance(core, _CORES[name]):
            raise ValueError(f"linattn.hf ({module.__class__.__name__}): attn_implementation={name!r} needs the layer's "
                             f"learned β{' and gate' if _CORES[name].gated else ''}: call "
                             f"linattn.hf.use_delta_rule(model{_use_arguments(_CORES[name])}) (before building the "
                             "optimizer)")
        beta, gate = core.beta_and_gate(k, padding)  # a padded key neither writes nor fades the state
        return delta_rule_attention(q, k, v, beta, gate=gate, causal=causal, scale=core.scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    return _kernelized(attend)


IMPLEMENTATIONS = {name: _delta_rule(name) for name in _CORES}


def use_delta_rule(model, *, gated: bool = True, per_channel: bool = False, example_inputs=None) -> List[str]:
    """Gives every attention layer of a transformers model the delta rule's learned projections
    (newly initialised, docs/methods.md §11) and switches the model to "linattn_gated_deltanet"
    (gated=True), "linattn_kda" (gated=True, per_channel=True: a gate per key channel) or
    "linattn_deltanet"; the pretrained q, k, v and output projections are kept.
    example_inputs: what to run the model on to find its attention layers (default: its dummy
    inputs). Returns the layers' qualified names. Generation: past_key_values=LinearStateCache()
    keeps the (B, H, dk, dv) state per layer."""
    from ..conversion.hf import _dummy_inputs, attention_layers
    from ..conversion.hf import register as register_probe
    from . import register

    register()
    register_probe()  # the probing implementation that finds the layers
    if per_channel and not gated:
        raise ValueError("linattn.hf.use_delta_rule: per_channel=True gates per key channel; it needs gated=True")
    name = ("linattn_kda" if per_channel else "linattn_gated_deltanet") if gated else "linattn_deltanet"
    layers = attention_layers(model, _dummy_inputs(model) if example_inputs is None else example_inputs)
    if not layers:
        raise ValueError("linattn.hf.use_delta_rule: the model ran no attention through transformers' "
                         "AttentionInterface on the example inputs")
    names = {id(module): qualified for qualified, module in model.named_modules()}
    parameter = next(model.parameters())
    for layer in layers:
        core = _CORES[name](layer.heads, layer.head_dim, device=parameter.device, dtype=parameter.dtype)
        layer.module.add_module(ATTRIBUTE, core)
    model.set_attn_implementation(name)
    return [names[id(layer.module)] for layer in layers]


def delta_rule_layers(model) -> List[Optional[object]]:
    """The delta-rule cores use_delta_rule attached, in module order."""
    return [m for m in model.modules() if isinstance(m, DeltaNetMethod)]
