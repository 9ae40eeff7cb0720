"""TimmAttention: timm's ViT `Attention` block with its attention computed by a linattn method.

It takes over the timm module's own submodules (qkv, q_norm, k_norm, norm, gate, proj and the
dropouts), so parameter names and state_dict keys stay those of timm (plus `core.` tensors of
methods that have some). timm is not imported here: the block is read by attribute.
"""
from typing import Optional

import torch
from torch import nn

from .masks import additive
from .methods import build_method


class TimmAttention(nn.Module):
    def __init__(self, source: nn.Module, method: str = "linear", **method_options):
        super().__init__()
        self.num_heads = source.num_heads
        self.head_dim = source.head_dim
        self.attn_dim = getattr(source, "attn_dim", self.num_heads * self.head_dim)
        self.qkv = source.qkv
        self.q_norm = source.q_norm
        self.k_norm = source.k_norm
        self.attn_drop = source.attn_drop
        self.norm = getattr(source, "norm", nn.Identity())
        self.gate = getattr(source, "gate", None)
        self.proj = source.proj
        self.proj_drop = source.proj_drop
        self.method = method
        weight = self.qkv.weight
        self.core = build_method(
            method, num_heads=self.num_heads, head_dim=self.head_dim, device=weight.device, dtype=weight.dtype,
            **method_options,
        )
        self.train(source.training)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"linattn.nn.TimmAttention(method={self.method!r}) cannot be compiled with torch.jit.script; use "
            "torch.compile(model) or torch.export.export(model, ...) instead"
        )

    def extra_repr(self) -> str:
        return f"method={self.method!r}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        batch, length, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if attn_mask is not None:
            if not self.core.takes_any_mask:
                raise ValueError(
                    f"linattn.nn.TimmAttention(method={self.method!r}): supports attn_mask=None only "
                    f"(and is_causal where the method is causal), got an attn_mask of shape {tuple(attn_mask.shape)}"
                )
            # timm passes scaled_dot_product_attention's convention (bool True = attend): make it additive.
            if attn_mask.dtype == torch.bool:
                attn_mask = additive(~attn_mask, q.dtype)
        if is_causal and not self.core.supports_causal:
            raise ValueError(f"linattn.nn.TimmAttention(method={self.method!r}): this method is non-causal only")
        out, _ = self.core(
            q, k, v, causal=is_causal, key_padding_mask=None, attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0, need_weights=False,
        )
        out = out.transpose(1, 2).reshape(batch, length, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))
