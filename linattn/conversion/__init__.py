"""Linearizing pretrained models (docs/methods.md §10, docs/guide/linearize.md):
`linearize` replaces a model's softmax attention layers with linear (or linear + sliding-window)
attention with learnable feature maps, keeping every pretrained weight; `attention_transfer`
trains only those new parameters so each layer reproduces its own softmax attention.

    model = AutoModel.from_pretrained(path)
    linattn.linearize(model, method="hybrid", feature_map="hedgehog", window=64)
    linattn.attention_transfer(model, batches, steps=300)
    # model now runs linattn's kernels; fine-tune as usual (all weights, or LoRA through peft)
"""
from typing import Optional

from .attention import LinearizedAttention
from .transfer import attention_transfer, end_to_end_transfer, linearized_layers, plot_transfer, set_mode

__all__ = ["linearize", "attention_transfer", "end_to_end_transfer", "plot_transfer", "linearized_layers", "set_mode",
           "LinearizedAttention"]

RECORD = "linattn_linearization"


def linearize(model, *, method: str = "hybrid", feature_map="hedgehog", window: int = 64,
              global_tokens: Optional[str] = "first_last", linear_scale: float = 1e-2, example_inputs=None):
    """Replaces every softmax attention layer of `model` with linearized attention, in place.

    The pretrained projections are kept; the new parameters are only each layer's feature maps
    φ_q, φ_k (and, for the hybrid, a per-head scale of the linear term). Each layer keeps its exact
    softmax as a teacher (linattn.conversion.set_mode(model, "teacher") runs the original model).

    Args:
        model: a Hugging Face transformers model whose attention runs through transformers'
            AttentionInterface (BERT, Llama-family, ViT and most current models).
        method: "linear" (linear attention alone, constant-size state when causal) or "hybrid"
            (exact softmax in a sliding window and on global tokens, linear attention for the rest,
            one normaliser; LoLCATs-style).
        feature_map: "hedgehog" (per-head [softmax(xW + b), softmax(−xW − b)], Zhang et al. 2024) or
            "t2r" (per-head relu(xW + b), Kasai et al. 2021); separate maps for q and k, per layer.
        window: the hybrid's exact window |i − j| <= window (causal: the window previous keys).
        global_tokens: the hybrid's exact global tokens in bidirectional layers: "first_last"
            (the first token and each row's last real one, [CLS] and [SEP]), "first", or None.
        linear_scale: the hybrid's initial weight γ of the linear term (learned per head).
        example_inputs: inputs the model runs once to find its attention layers (a dict of
            keyword arguments or a tensor); default model.dummy_inputs.

    Returns:
        the model, with `model.linattn_linearization` recording the options and the replaced
        layers' names.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - depends on the environment
        PreTrainedModel = None
    if PreTrainedModel is None or not isinstance(model, PreTrainedModel):
        raise TypeError("linattn.linearize: converts Hugging Face transformers models (PreTrainedModel) for now; "
                        f"got {type(model).__name__}")
    if not isinstance(feature_map, str):
        raise TypeError(f"linattn.linearize: feature_map must be 'hedgehog' or 't2r' (each layer gets its own), got "
                        f"{feature_map!r}")
    options = dict(method=method, feature_map=feature_map, window=window, global_tokens=global_tokens,
                   linear_scale=linear_scale)
    LinearizedAttention(1, 1, **options)  # checks the options before the model is touched
    from .hf import linearize_hf

    replaced = linearize_hf(model, example_inputs, options)
    setattr(model, RECORD, {**options, "layers": replaced})
    return model
