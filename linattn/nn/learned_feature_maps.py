"""Learnable feature maps for linear attention (docs/methods.md §10): modules mapping per-head
queries or keys (B, H, T, d) to positive features (B, H, T, m), trained to make φ(q)·φ(k) behave
like the softmax kernel exp(q·k/√d) they replace (linattn.linearize, linattn.attention_transfer).

- HedgehogFeatureMap (Zhang et al., ICLR 2024): per head, z = xW + b and
  φ(x) = [softmax(z), softmax(−z)] over the feature dim (m = 2f): positive, bounded, spiky
  once trained. The softmax-normalised form never overflows in any dtype.
- MLPFeatureMap (T2R, Kasai et al. 2021): per head, φ(x) = relu(xW + b) (m = f).

Both start with W = scale·I (f = d), so the features begin as a monotone function of x itself,
and are applied in PyTorch before the fused kernel (linear_attention(..., feature_map=None)):
autograd differentiates them, the kernel does the O(T·m·dv) part.
"""
from typing import Optional

import torch
from torch import nn


class _PerHeadLinear(nn.Module):
    """z = x W_h + b_h for every head h: x (B, H, T, d) -> (B, H, T, f)."""

    def __init__(self, heads: int, head_dim: int, features: int, init_scale: float):
        super().__init__()
        for name, value in (("heads", heads), ("head_dim", head_dim), ("features", features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be an int >= 1, got {value!r}")
        self.heads, self.head_dim, self.features = heads, head_dim, features
        weight = torch.zeros(heads, head_dim, features)
        diagonal = min(head_dim, features)
        weight[:, torch.arange(diagonal), torch.arange(diagonal)] = init_scale
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(heads, features))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.heads or x.shape[3] != self.head_dim:
            raise ValueError(f"{type(self).__name__}: expected (B, H={self.heads}, T, d={self.head_dim}), got "
                             f"{tuple(x.shape)}")
        weight = self.weight.to(x.dtype)
        return torch.matmul(x, weight.unsqueeze(0)) + self.bias.to(x.dtype)[None, :, None, :]

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, features={self.features}"


class HedgehogFeatureMap(_PerHeadLinear):
    """Hedgehog's feature map: φ(x) = [softmax(xW + b), softmax(−xW − b)] per head, m = 2·features.

    Args:
        heads, head_dim: the attention's H and d.
        features: f, the width of z (default d).
        init_scale: W starts as init_scale·I. The default d^(−1/4) splits softmax's 1/√d between
            q and k, so softmax(z_q)·softmax(z_k) starts as a sharpened function of q and k's
            coordinates (not yet exp(q·k/√d): attention transfer fits that).
    """

    def __init__(self, heads: int, head_dim: int, features: Optional[int] = None, init_scale: Optional[float] = None):
        features = head_dim if features is None else features
        super().__init__(heads, head_dim, features, head_dim ** -0.25 if init_scale is None else init_scale)

    @property
    def feature_dim(self) -> int:
        return 2 * self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


class MLPFeatureMap(_PerHeadLinear):
    """T2R's feature map: φ(x) = relu(xW + b) per head, m = features (default d), W = I at first."""

    def __init__(self, heads: int, head_dim: int, features: Optional[int] = None, init_scale: float = 1.0):
        features = head_dim if features is None else features
        super().__init__(heads, head_dim, features, init_scale)

    @property
    def feature_dim(self) -> int:
        return self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.project(x))


LEARNED_FEATURE_MAPS = {"hedgehog": HedgehogFeatureMap, "t2r": MLPFeatureMap}


def learned_feature_map(name: str, heads: int, head_dim: int) -> nn.Module:
    """A new learnable feature map by name ("hedgehog" or "t2r")."""
    if name not in LEARNED_FEATURE_MAPS:
        raise ValueError(f"linattn: learned feature_map must be one of {sorted(LEARNED_FEATURE_MAPS)}, got {name!r}")
    return LEARNED_FEATURE_MAPS[name](heads, head_dim)
