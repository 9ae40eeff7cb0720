"""linattn.swap_attention: put linattn's attention into an existing model, in place."""
from torch import nn

from .nn.methods import build_method, LinformerMethod
from .nn.multihead_attention import MultiheadAttention
from .nn.timm_attention import TimmAttention


def _timm_attention_class():
    try:
        from timm.layers import Attention
    except Exception:  # timm is optional; any import failure means there is nothing to swap
        return None
    return Attention


def swap_attention(model: nn.Module, method: str = "linear", **method_options) -> nn.Module:
    """Replaces every torch.nn.MultiheadAttention in `model` (and every timm `Attention` block,
    when timm is installed) by linattn's equivalent using `method`, keeping the weights,
    training mode, device and dtype; returns `model` (changed in place).

    Works for nn.Transformer / nn.TransformerEncoder(Layer) / nn.TransformerDecoder(Layer),
    torchvision's VisionTransformer and timm's ViTs. nn.TransformerEncoder's nested-tensor fast
    path is switched off on encoders that hold a swapped layer, since it would bypass the new
    attention. With method="linformer" and sharing="layerwise", one projection is shared by all
    swapped modules. Unknown methods or options raise a ValueError listing the valid ones before
    anything is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"linattn.swap_attention: model must be a torch.nn.Module, got {type(model).__name__}")
    timm_attention = _timm_attention_class()
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if (isinstance(child, nn.MultiheadAttention) and not isinstance(child, MultiheadAttention))
        or (timm_attention is not None and type(child) is timm_attention)
    ]
    if not targets:
        # Still validate, so a typo is not silently accepted on a model without attention.
        build_method(method, num_heads=1, head_dim=8, **_without_linformer_requirements(method, method_options))
        return model
    options = dict(method_options)
    if method == "linformer" and options.get("sharing") == "layerwise" and options.get("shared_projection") is None:
        first = targets[0][2]
        k = options.get("k", 256)
        max_seq_len = options.get("max_seq_len")
        if max_seq_len is not None:
            weight = next(first.parameters())
            options["shared_projection"] = nn.Parameter(
                LinformerMethod.initial_projection((k, max_seq_len), device=weight.device, dtype=weight.dtype)
            )
    for parent, name, child in targets:
        if isinstance(child, nn.MultiheadAttention):
            replacement = MultiheadAttention.from_torch(child, method=method, **options)
        else:
            replacement = TimmAttention(child, method=method, **options)
        setattr(parent, name, replacement)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(m, MultiheadAttention) for m in module.modules()
        ):
            module.use_nested_tensor = False
    return model


def _without_linformer_requirements(method, options):
    if method == "linformer" and "max_seq_len" not in options:
        return {**options, "max_seq_len": 1}
    return options
