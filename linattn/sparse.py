"""Block-sparse softmax attention (docs/methods.md §5–§6) and the layouts that describe it:
the seeds' block-local windows and BigBird. Exported from linattn.functional."""
import math
import numbers
from typing import Optional

import torch

from . import ops
from . import _validation as check


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_positive(where: str, name: str, value, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Softmax attention in which query i sees key j when layout[h, i // b, j // b] is True.

    Args:
        q, k, v: (B, H, T_q, D), (B, H_kv, T_k, D), (B, H_kv, T_k, dv), H_kv dividing H
            (grouped-query attention, as sliding_window_attention).
        layout: (H or 1, ⌈T_q/b⌉, ⌈T_k/b⌉) bool (a last partial block is fine); see
            block_local_layout and bigbird_layout.
        block_size: b.
        causal: also hide keys after the query (j > i + T_k − T_q), inside blocks too.
        key_padding_mask: (B, T_k) bool, True = padded key. scale: default D ** -0.5.
        softcap: c > 0 caps every scaled score s to c·tanh(s / c) (Gemma-2's logit soft-capping);
            None = no capping. alibi_slopes: (H,) or (B, H) float32, ALiBi's ``−slope·|i + T_k − T_q − j|``.
        dropout_p, generator: attention dropout, as sliding_window_attention's.

    The kernel visits only the present blocks (never a T×T matrix); a row that sees no key
    returns 0 with zero gradients. Same engine, guarantees and dtypes as
    sliding_window_attention.
    """
    where = "linattn.block_sparse_attention"
    check.check_qkv(where, q, k, v, causal=False, grouped=True)
    _check_positive(where, "block_size", block_size)
    check.check_key_padding_mask(where, key_padding_mask, k)
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() != 3:
        got = f"{layout.dtype} {tuple(layout.shape)}" if isinstance(layout, torch.Tensor) else type(layout).__name__
        raise TypeError(f"{where}: layout must be a 3-D bool tensor (H or 1, ceil(T_q/b), ceil(T_k/b)), got {got}")
    expected = (math.ceil(q.shape[2] / block_size), math.ceil(k.shape[2] / block_size))
    if layout.shape[0] not in (1, q.shape[1]) or tuple(layout.shape[1:]) != expected:
        raise ValueError(f"{where}: layout must have shape (1 or {q.shape[1]}, {expected[0]}, {expected[1]}) for "
                         f"T_q={q.shape[2]}, T_k={k.shape[2]}, block_size={block_size}, got {tuple(layout.shape)}")
    if layout.device != q.device:
        raise ValueError(f"{where}: layout must be on {q.device}, got {layout.device}")
    check.check_alibi_slopes(where, alibi_slopes, q)
    scale = check.scale_of(where, scale, q)
    dropout = check.dropout_of(where, dropout_p)
    pattern = ops.restricted.Pattern(layout=layout, block_size=int(block_size), causal=bool(causal),
                                     key_padding_mask=key_padding_mask, softcap=check.softcap_of(where, softcap),
                                     alibi_slopes=alibi_slopes, dropout_p=dropout,
                                     dropout_seed=ops.restricted.dropout_seed_from(generator) if dropout else None)
    out, _ = ops.restricted.restricted_softmax(q, k, v, float(scale), pattern)
    return out


def block_local_layout(T: int, block_size: int, *, previous: bool = False, causal: bool = False,
                       device=None) -> torch.Tensor:
    """(1, ⌈T/b⌉, ⌈T/b⌉) layout of the seeds' split-into-windows attention: each block attends to
    itself; with previous=True also to the previous block, and, when not causal, to the next
    one (a symmetric neighbourhood). Use causal=True together with block_sparse_attention's
    causal=True."""
    where = "linattn.block_local_layout"
    _check_positive(where, "T", T, minimum=0)
    _check_positive(where, "block_size", block_size)
    n = math.ceil(T / block_size)
    blocks = torch.arange(n, device=device)
    d = blocks[:, None] - blocks[None, :]  # query block − key block
    layout = d == 0
    if previous:
        layout |= d == 1
        if not causal:
            layout |= d == -1
    return layout.unsqueeze(0)


def bigbird_layout(T: int, block_size: int, *, num_random: int = 3, num_global: int = 2, heads: int = 1,
                   generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """(heads, ⌈T/b⌉, ⌈T/b⌉) BigBird layout (Zaheer et al. 2020, ITC): a window of 3 blocks,
    num_global global blocks (the first ⌈g/2⌉ and the last ⌊g/2⌋: they attend to and are attended
    by every block) and num_random random blocks per block row and head, drawn from `generator`
    among the blocks not already in the row (fewer when not enough remain). Any T: no minimum
    length, no fallback to full attention."""
    where = "linattn.bigbird_layout"
    _check_positive(where, "T", T, minimum=0)
    _check_positive(where, "block_size", block_size)
    _check_positive(where, "num_random", num_random, minimum=0)
    _check_positive(where, "num_global", num_global, minimum=0)
    _check_positive(where, "heads", heads)
    n = math.ceil(T / block_size)
    blocks = torch.arange(n)
    layout = ((blocks[:, None] - blocks[None, :]).abs() <= 1).expand(heads, n, n).clone()
    first, last = (num_global + 1) // 2, num_global // 2
    global_blocks = torch.cat([blocks[:first], blocks[n - last:] if last else blocks[:0]]).unique()
    layout[:, global_blocks, :] = True
    layout[:, :, global_blocks] = True
    if num_random > 0:
        for h in range(heads):
            for row in range(n):
                candidates = (~layout[h, row]).nonzero().flatten()
                if candidates.numel() == 0:
                    continue
                pick = torch.randperm(candidates.numel(), generator=generator)[:num_random]
                layout[h, row, candidates[pick]] = True
    return layout.to(device)


def layout_mask(layout: torch.Tensor, block_size: int, length_q: int, length_k: int, *, causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense (B or 1, H or 1, T_q, T_k) bool mask of block_sparse_attention (True = the query
    sees the key), expanded from the layout by definition (ops.restricted.Pattern.dense_mask): for
    the float64 reference and need_weights. The operators never build it."""
    pattern = ops.restricted.Pattern(layout=layout, block_size=block_size, causal=causal,
                                     key_padding_mask=key_padding_mask)
    return pattern.dense_mask(length_q, length_k, device=layout.device)
