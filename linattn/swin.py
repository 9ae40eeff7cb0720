"""Swin-style window attention on image features (docs/methods.md §6): attention inside w×w windows
with a learned relative-position bias, optionally on a cyclically shifted grid whose wrapped-around
regions must not see each other. Exported from linattn.functional.

Both run on the block-sparse engine: a window is one block, the bias is an additive score term
and the shifted-window mask is a per-token region id (pairs of different regions are excluded),
so no (windows, N, N) mask and no attention-probability tensor is ever built.
"""
import math
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import ops
from . import _validation as check


def swin_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    regions: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Swin's window attention: softmax inside each window of already-partitioned tokens.

    Args:
        q, k, v: (G, H, N, D), G = batch · windows, N tokens per window; any strides.
        bias: (H or 1, N, N), added to the scaled scores (Swin's relative-position bias);
            differentiable.
        regions: (nW, N) int64, the region id of each token of each window (window g uses row
            g % nW): tokens of different regions do not see each other (the shifted-window mask).
        scale: default D ** -0.5.
        dropout_p, generator: attention dropout (torch's ``attn_drop``; pass 0 in evaluation),
            as sliding_window_attention's: each probability dropped in the operator after the
            softmax, pair (g, h, i, j) by the Philox bits of a seed drawn from `generator`.
    Returns (G, H, N, dv).
    """
    where = "linattn.swin_attention"
    check.check_qkv(where, q, k, v, causal=False)
    G, H, N = q.shape[0], q.shape[1], q.shape[2]
    if k.shape[2] != N:
        raise ValueError(f"{where}: q and k must hold the same windows, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    segments = None
    if regions is not None:
        check.check_tensor(where, "regions", regions, 2, "(windows, N)")
        if regions.dtype != torch.int64 or regions.shape[1] != N or regions.shape[0] == 0 or G % regions.shape[0]:
            raise ValueError(f"{where}: regions must be an int64 (nW, N={N}) tensor with nW dividing G={G}, got "
                             f"{regions.dtype} {tuple(regions.shape)}")
        segments = regions.repeat(G // regions.shape[0], 1).unsqueeze(1)  # (G, 1, N)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    # One block holding every pair: the pattern is the regions (segments), the bias a score term.
    dropout = check.dropout_of(where, dropout_p)
    pattern = ops.restricted.Pattern(layout=torch.ones(1, 1, 1, dtype=torch.bool, device=q.device),
                                     block_size=max(N, 1), q_segments=segments, k_segments=segments, bias=bias,
                                     dropout_p=dropout,
                                     dropout_seed=ops.restricted.dropout_seed_from(generator) if dropout else None)
    out, _ = ops.restricted.restricted_softmax(q, k, v, float(scale), pattern)
    return out


def shifted_window_regions(height: int, width: int, window_size: List[int], shift_size: List[int],
                           device=None) -> torch.Tensor:
    """(nW, N) region ids of Swin's shifted-window mask on a (height, width) grid (multiples of the
    window): the last window row/column of the cyclically shifted grid holds tokens from up to
    three source regions per axis, which must not attend to each other."""
    def axis_regions(length: int, window: int, shift: int) -> torch.Tensor:
        i = torch.arange(length, device=device)
        return (i >= length - window).long() + (i >= length - shift).long()

    rows = axis_regions(height, window_size[0], shift_size[0])
    cols = axis_regions(width, window_size[1], shift_size[1])
    grid = rows[:, None] * 3 + cols[None, :]
    grid = grid.view(height // window_size[0], window_size[0], width // window_size[1], window_size[1])
    return grid.permute(0, 2, 1, 3).reshape(-1, window_size[0] * window_size[1])


def shifted_window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: List[int],
    num_heads: int,
    shift_size: List[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Optional[torch.Tensor] = None,
    proj_bias: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
    training: bool = True,
) -> torch.Tensor:
    """torchvision.models.swin_transformer.shifted_window_attention, same signature and result,
    computed by the fused window kernels. input (B, H, W, C); relative_position_bias
    (1, heads, N, N); logit_scale (heads, 1, 1) selects Swin V2's cosine attention.
    attention_dropout drops probabilities in the operator in training (swin_attention's dropout_p;
    torchvision's own draws from torch's generator differently, so the masks differ)."""
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = [0 if window_size[0] >= pad_H else shift_size[0], 0 if window_size[1] >= pad_W else shift_size[1]]
    shifted = sum(shift_size) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    N = window_size[0] * window_size[1]
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * windows, N, C)

    if logit_scale is not None and qkv_bias is not None:  # Swin V2 has no key bias
        length = qkv_bias.numel() // 3
        qkv_bias = torch.cat([qkv_bias[:length], torch.zeros_like(qkv_bias[length:2 * length]), qkv_bias[2 * length:]])
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = None
    if logit_scale is not None:  # cosine attention with a learned per-head temperature
        temperature = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        q = F.normalize(q, dim=-1) * temperature
        k = F.normalize(k, dim=-1)
        scale = 1.0
    regions = shifted_window_regions(pad_H, pad_W, window_size, shift_size, device=x.device) if shifted else None
    x = swin_attention(q, k, v, bias=relative_position_bias.reshape(-1, N, N).to(q.dtype), regions=regions,
                       scale=scale, dropout_p=attention_dropout if training else 0.0)

    x = x.transpose(1, 2).reshape(x.size(0), N, C)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if shifted:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def window_attention(*args, **kwargs) -> torch.Tensor:
    """Deprecated name of swin_attention (in linattn, "window" means the sliding window of
    sliding_window_attention); same arguments and result."""
    warnings.warn("linattn.window_attention is now linattn.swin_attention (the old name will be removed)",
                  DeprecationWarning, stacklevel=2)
    return swin_attention(*args, **kwargs)
