"""Linearizing pretrained models (docs/methods.md §10, docs/guide/linearize.md):
`linearize` replaces a model's softmax attention layers with linear (or linear + sliding-window)
attention with learnable feature maps, keeping every pretrained weight; `attention_transfer`
trains only those new parameters so each layer reproduces its own softmax attention.

    model = AutoModel.from_pretrained(path)
    linattn.linearize(model, method="hybrid", feature_map="hedgehog", window=64)
    linattn.attention_transfer(model, batches, steps=300)
    # model now runs linattn's kernels; fine-tune as usual (all weights, or LoRA through peft)
"""
import warnings
from typing import Optional

import torch

from .attention import LinearizedAttention
from .transfer import attention_transfer, end_to_end_transfer, linearized_layers, plot_transfer, set_mode

__all__ = ["linearize", "attention_transfer", "end_to_end_transfer", "plot_transfer", "linearized_layers", "set_mode",
           "LinearizedAttention"]

RECORD = "linattn_linearization"


def linearize(model, *, method: str = "hybrid", feature_map="hedgehog", window: int = 64,
              global_tokens: Optional[str] = "first_last", linear_scale: float = 1e-2, example_inputs=None):
    """Replaces every softmax attention layer of `model` with linearized attention, in place.

    The pretrained projections are kept; the new parameters are only each layer's feature maps
    φ_q, φ_k (and, for the hybrid, a per-head scale of the linear term; for the delta rule, the
    per-head projections of β and the gate). Each layer keeps its exact
    softmax as a teacher (linattn.conversion.set_mode(model, "teacher") runs the original model).

    Args:
        model: a Hugging Face transformers model whose attention runs through transformers'
            AttentionInterface (BERT, Llama-family, ViT and most current models), or a model with
            the attention modules linattn.swap_attention handles (torch.nn.MultiheadAttention,
            timm's Attention, torchvision's Swin), swapped for linattn's with the "linearized"
            method, their weights kept.
        method: "linear" (linear attention alone, constant-size state when causal), "hybrid"
            (exact softmax in a sliding window and on global tokens, linear attention for the rest,
            one normaliser; LoLCATs-style), or "deltanet" / "gated_deltanet" / "kda" (the delta rule
            on the learned features, β and the gate — per head, or per feature channel for kda —
            learned from each head's key: docs/methods.md §11; constant-size state), or "gla" (the linear student whose state fades channel by
            channel by gates learned from each head's key, GLA: docs/methods.md §1; causal layers,
            constant-size state).
        feature_map: "hedgehog" (per-head [softmax(xW + b), softmax(−xW − b)], Zhang et al. 2024) or
            "t2r" (per-head relu(xW + b), Kasai et al. 2021); separate maps for q and k, per layer.
        window: the hybrid's exact window ``|i − j| <= window`` (causal: the `window` previous keys).
        global_tokens: the hybrid's exact global tokens in bidirectional layers: "first_last"
            (the first token and each row's last real one, [CLS] and [SEP]), "first", or None; in
            causal layers either of the first two keeps the first real token exact as an attention
            sink every later row sees.
        linear_scale: the hybrid's initial weight γ of the linear term (learned per head).
        example_inputs: inputs the model runs once to find its attention layers (a dict of
            keyword arguments or a tensor); default model.dummy_inputs.

    Returns:
        the model, with `model.linattn_linearization` recording the options and the replaced
        layers' names.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"linattn.linearize: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(feature_map, str):
        raise TypeError(f"linattn.linearize: feature_map must be 'hedgehog' or 't2r' (each layer gets its own), got "
                        f"{feature_map!r}")
    options = dict(method=method, feature_map=feature_map, window=window, global_tokens=global_tokens,
                   linear_scale=linear_scale)
    LinearizedAttention(1, 1, **options)  # checks the options before the model is touched
    if _is_transformers_model(model):
        from .hf import linearize_hf

        replaced = linearize_hf(model, example_inputs, options)
    else:
        replaced = _linearize_swapped(model, options)
    setattr(model, RECORD, {**options, "layers": replaced})
    return model


def _is_transformers_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return isinstance(model, PreTrainedModel)


def _linearize_swapped(model, options) -> list:
    """torch / timm / torchvision models: their attention modules swapped (weights kept) for
    linattn's with the "linearized" method; returns the swapped modules' names."""
    from ..nn import MultiheadAttention
    from ..nn.methods import LinearizedMethod, build_method
    from ..nn.methods.softmax import SoftmaxMethod
    from ..swap import swap_attention

    def swapped():
        return [name.rsplit(".", 1)[0] for name, module in model.named_modules() if isinstance(module, LinearizedMethod)]

    if swapped():
        raise ValueError(f"linattn.linearize: the model is already linearized ({', '.join(swapped())})")
    method_options = dict(student=options["method"], feature_map=options["feature_map"], window=options["window"],
                          global_tokens=options["global_tokens"], linear_scale=options["linear_scale"])
    # linattn's own modules running exact softmax: the method changes, the module (and weights) stay.
    own = [module for module in model.modules()
           if isinstance(module, MultiheadAttention) and isinstance(module.core, SoftmaxMethod)]
    for module in own:
        parameter = module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight
        module.core = build_method("linearized", num_heads=module.num_heads, head_dim=module.head_dim,
                                   device=parameter.device, dtype=parameter.dtype, **method_options)
        module.method = module.core.name
    with warnings.catch_warnings():
        if own:  # what linattn's modules held was replaced above
            warnings.filterwarnings("ignore", message=".*nothing was replaced")
        swap_attention(model, "linearized", **method_options)
    replaced = swapped()
    if not replaced:
        raise ValueError("linattn.linearize: found no attention module to linearize (transformers models, and the "
                         "torch.nn.MultiheadAttention / timm / torchvision attention that linattn.swap_attention handles)")
    return replaced
