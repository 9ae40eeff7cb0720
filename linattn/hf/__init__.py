"""Hugging Face transformers integration: linattn's attention behind `attn_implementation=`.

    import linattn
    linattn.hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="linattn_linear")
    model.generate(ids, past_key_values=linattn.hf.LinearStateCache(), max_new_tokens=...)

register() adds to transformers' AttentionInterface, with a mask interface of its own
(masks.compact_mask: the (B, T) visible keys for the plain patterns, never a T×T mask):
  - "linattn_linear": elu+1 linear attention (docs/methods.md §1), causal where the model's layer is
    (decoders such as Llama), bidirectional otherwise (BERT, ViT);
  - "linattn_linear_relu": the same with the relu feature map;
  - "linattn_performer": Performer FAVOR+ (docs/methods.md §2) with a fixed projection per layer
    (⌈D·ln D⌉ orthogonal random features seeded by the layer index, a non-persistent buffer);
  - "linattn_deltanet", "linattn_gated_deltanet", "linattn_kda": the delta rule (docs/methods.md
    §11) with learned β (and gate: per head, or per key channel for KDA) per layer, which
    use_delta_rule(model) attaches and switches to;
  - "linattn_local": exact softmax attention in the layer's own pattern, through the fused
    sliding-window kernel: the model's sliding window where it has one (Mistral, Qwen2, Gemma),
    full causal or bidirectional attention elsewhere; memory linear in the sequence.
Grouped-query heads are repeated to the query heads. Masks: key padding, causality, (for
linattn_local) the layer's sliding window, and packed documents (position_ids restarting inside
a row: linattn's varlen operators, linattn_linear and linattn_local); any other pattern (chunked
or custom masks, sliding windows for the linear methods) raises a ValueError. Dropout in training
drops whole keys, as linattn.nn.MultiheadAttention's methods do. No attention weights:
`output_attentions` returns None.

Generation: with transformers' caches the keys and values grow as usual (for the linear methods
every step runs the cached keys into a state: correct, O(context) per token). Pass
`past_key_values=linattn.hf.LinearStateCache()` with the linear methods (and the delta rule) and
each layer keeps only its recurrent state ((S, z), or the delta rule's S): constant memory and O(1) work per generated token.

Pretrained hybrids whose layers are already Gated DeltaNet or KDA (Qwen3-Next, Qwen3.5,
OLMo-hybrid, Kimi Linear, …): use_fla_compat(model) runs those layers' own kernel calls on linattn's
delta-rule operator (linattn.fla_compat; restore_fla_compat() undoes it).

transformers is an optional extra (`pip install transformers`), imported only when used.
"""
from ..nn.methods import METHODS
from .state_cache import LinearStateCache

__all__ = ["register", "LinearStateCache", "IMPLEMENTATIONS", "use_delta_rule", "use_fla_compat",
           "restore_fla_compat"]

# Each method names the implementations it registers (its class's hf_implementations).
IMPLEMENTATIONS = tuple(name for cls in METHODS.values() for name in cls.hf_implementations)
_registered = False


def use_delta_rule(model, *, gated: bool = True, per_channel: bool = False, example_inputs=None):
    """linattn.hf.delta_rule.use_delta_rule: DeltaNet / Gated DeltaNet / KDA in a transformers model."""
    from .delta_rule import use_delta_rule as attach

    return attach(model, gated=gated, per_channel=per_channel, example_inputs=example_inputs)


def use_fla_compat(model) -> int:
    """linattn.hf.delta_rule_layers.use_fla_compat: a pretrained hybrid's own Gated DeltaNet / KDA
    layers (Qwen3-Next, Qwen3.5, OLMo-hybrid, Kimi Linear, …) on linattn's delta-rule operator."""
    from .delta_rule_layers import use_fla_compat as route

    return route(model)


def restore_fla_compat() -> int:
    """Undoes use_fla_compat (every modeling module it changed)."""
    from .delta_rule_layers import restore_fla_compat as restore

    return restore()


def register() -> None:
    """Registers linattn's attention functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("linattn.hf.register needs transformers (pip install transformers)") from error
    from .attention import IMPLEMENTATIONS as kernelized
    from .delta_rule import IMPLEMENTATIONS as delta_rule
    from .masks import compact_mask

    functions = {**kernelized, **delta_rule}

    for name in IMPLEMENTATIONS:
        AttentionInterface.register(name, functions[name])
        AttentionMaskInterface.register(name, compact_mask)
    _registered = True
