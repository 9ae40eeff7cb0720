"""Swin window-attention blocks of torchvision and timm, computed by linattn's fused window kernels.

swap_attention replaces torchvision's ShiftedWindowAttention / ShiftedWindowAttentionV2 and
timm's (V1) Swin WindowAttention with an instance of a subclass of the block's own class that
shares its parameters and buffers: state_dict keys, the relative-position tables and every
helper method stay those of the library; only forward changes. Neither library is imported
here: the classes are taken from the modules being replaced.
"""
from typing import Optional

import torch
from torch import nn

from ..swin import shifted_window_attention, swin_attention

_SUBCLASSES = {}


def _subclass(source_class: type, forward, kind: str) -> type:
    key = (source_class, kind)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(
            f"Linattn{source_class.__name__}", (source_class,),
            {"forward": forward, "__module__": __name__, "__doc__": f"{source_class.__qualname__} with its attention "
             "computed by linattn's fused window kernels (same parameters, buffers and results)."},
        )
    return _SUBCLASSES[key]


def _adopt(source: nn.Module, cls: type) -> nn.Module:
    """A cls instance sharing source's parameters, buffers, submodules and settings."""
    swapped = cls.__new__(cls)
    swapped.__dict__ = dict(source.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        setattr(swapped, name, dict(getattr(source, name)))
    return swapped


def _torchvision_forward(self, x: torch.Tensor) -> torch.Tensor:
    return shifted_window_attention(
        x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(), self.window_size, self.num_heads,
        shift_size=self.shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
        qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, logit_scale=getattr(self, "logit_scale", None),
        training=self.training,
    )


def _timm_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    G, N, C = x.shape
    qkv = self.qkv(x).reshape(G, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    # timm passes the shifted-window mask as (nW, N, N) with 0 for pairs of one region and a
    # large negative value otherwise; a token's region is named by the first key it sees.
    regions = None if mask is None else (mask == 0).to(torch.uint8).argmax(-1)
    out = swin_attention(q, k, v, bias=self._get_rel_pos_bias()[0].to(q.dtype), regions=regions, scale=self.scale,
                         dropout_p=self.attn_drop.p if self.training else 0.0)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(G, N, -1)))


def is_torchvision_window_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == "torchvision.models.swin_transformer" and cls.__name__ in (
        "ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def is_timm_window_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == "timm.models.swin_transformer" and cls.__name__ == "WindowAttention"


def swap_window_attention(module: nn.Module) -> nn.Module:
    """The linattn twin of a torchvision or timm Swin window-attention block (see the module doc)."""
    if is_torchvision_window_attention(module):
        return _adopt(module, _subclass(type(module), _torchvision_forward, "torchvision"))
    if is_timm_window_attention(module):
        return _adopt(module, _subclass(type(module), _timm_forward, "timm"))
    raise TypeError(f"linattn: {type(module).__qualname__} is not a Swin window-attention block linattn can swap")
