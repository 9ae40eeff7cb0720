"""linattn.swap_attention: put linattn's attention into an existing model, in place."""
import collections
import logging
import re
import warnings

from torch import nn

from .nn.methods import build_method, method_class
from .nn.multihead_attention import MultiheadAttention
from .nn.timm_attention import TimmAttention
from .nn.swin_attention import is_timm_window_attention, is_torchvision_window_attention, swap_window_attention


def _timm_attention_class():
    try:
        from timm.layers import Attention
    except Exception:  # timm is optional; any import failure means there is nothing to swap
        return None
    return Attention


logger = logging.getLogger("linattn")

# Class names that mark a module as some attention block (torchvision's ShiftedWindowAttention,
# timm's EvaAttention / WindowAttention, Hugging Face's BertSelfAttention, LlamaAttention ...).
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)


def _unhandled_attention_kinds(model: nn.Module, handled: list) -> collections.Counter:
    """Class names of attention-like modules that swap_attention does not replace, outside the
    modules it does replace (and outside linattn's own)."""
    inside_handled = {id(m) for module in handled for m in module.modules()}
    kinds = collections.Counter()
    for module in model.modules():
        cls = type(module)
        if id(module) in inside_handled or cls.__module__.startswith("linattn."):
            continue
        if _ATTENTION_NAME.search(cls.__name__) and not isinstance(module, nn.Dropout):
            kinds[f"{cls.__module__}.{cls.__qualname__}"] += 1
    return kinds


def _describe(counts: collections.Counter) -> str:
    return ", ".join(f"{n} × {kind}" for kind, n in sorted(counts.items()))


def swap_attention(model: nn.Module, method: str = "linear", *, strict: bool = False, **method_options) -> nn.Module:
    """Replaces every torch.nn.MultiheadAttention in `model` (and every timm `Attention` block,
    when timm is installed) by linattn's equivalent using `method`, keeping the weights,
    training mode, device and dtype; returns `model` (changed in place).

    Works for nn.Transformer / nn.TransformerEncoder(Layer) / nn.TransformerDecoder(Layer),
    torchvision's VisionTransformer and timm's ViTs. Swin window-attention blocks (torchvision's
    ShiftedWindowAttention / V2, timm's Swin WindowAttention) are replaced by linattn's fused
    window attention whatever the method: it is exact (same outputs and weights), and the
    windows already make it linear in the image size. nn.TransformerEncoder's nested-tensor fast
    path is switched off on encoders that hold a swapped layer, since it would bypass the new
    attention. With method="linformer" and sharing="layerwise", one projection is shared by all
    swapped modules. Unknown methods or options raise a ValueError listing the valid ones before
    anything is changed.

    It never does nothing silently: what it replaced is logged (logger "linattn", INFO), and
    attention modules of kinds it does not handle (MaxViT/EVA blocks, timm's Swin V2, Hugging Face
    attention classes, ...) are named in a UserWarning, as is a model in which nothing was
    replaced; with strict=True those cases raise a ValueError instead, before anything changes.
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
        or _is_window_block(child)
    ]
    unhandled = _unhandled_attention_kinds(model, [child for _, _, child in targets])
    problem = None
    if unhandled:
        problem = (
            f"linattn.swap_attention: left {_describe(unhandled)} unchanged: swap_attention handles "
            "torch.nn.MultiheadAttention, timm's Attention and torchvision's / timm's Swin window-attention blocks only"
        )
    elif not targets:
        problem = ("linattn.swap_attention: the model holds no torch.nn.MultiheadAttention, timm Attention or Swin "
                   "window-attention module")
    if problem and strict:
        raise ValueError(problem + " (strict=True)")
    if not targets:
        # Still validate, so a typo is not silently accepted on a model without attention.
        build_method(method, num_heads=1, head_dim=8, **method_class(method).probe_options(method_options))
        warnings.warn(problem + "; nothing was replaced", UserWarning, stacklevel=2)
        return model
    options = method_class(method).swap_options(dict(method_options), targets[0][2])
    if any(_is_window_block(child) for _, _, child in targets):  # the other replacements check it themselves
        build_method(method, num_heads=1, head_dim=8, **method_class(method).probe_options(options))
    replacements = [(parent, name, child, _replacement(child, method, options)) for parent, name, child in targets]
    # all built (and their options checked) before the model changes
    for parent, name, _, replacement in replacements:
        setattr(parent, name, replacement)
    replaced = collections.Counter(
        f"{type(child).__module__}.{type(child).__qualname__}" for _, _, child in targets if not _is_window_block(child))
    windowed = collections.Counter(
        f"{type(child).__module__}.{type(child).__qualname__}" for _, _, child in targets if _is_window_block(child))
    if replaced:
        logger.info("linattn.swap_attention: replaced %s with method=%r", _describe(replaced), method)
    if windowed:
        logger.info("linattn.swap_attention: replaced %s with linattn's fused window attention (exact; method does "
                    "not apply to Swin window blocks)", _describe(windowed))
    if problem:
        warnings.warn(problem, UserWarning, stacklevel=2)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(m, MultiheadAttention) for m in module.modules()
        ):
            module.use_nested_tensor = False
    return model


def _is_window_block(module: nn.Module) -> bool:
    return is_torchvision_window_attention(module) or is_timm_window_attention(module)


def _replacement(child: nn.Module, method: str, options: dict) -> nn.Module:
    if _is_window_block(child):
        return swap_window_attention(child)
    if isinstance(child, nn.MultiheadAttention):
        return MultiheadAttention.from_torch(child, method=method, **options)
    return TimmAttention(child, method=method, **options)
