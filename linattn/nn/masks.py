"""The masks of torch.nn.MultiheadAttention, put in the forms linattn's methods take.

nn.MultiheadAttention accepts key_padding_mask (N, S) and attn_mask (L, S) or (N·H, L, S), each
either bool (True = not allowed) or float (added to the scores). Softmax attention can add any
such mask; the kernelized methods can only drop keys (key padding) or be causal, so their masks
are checked and turned into a bool key mask plus a causal flag, or rejected with a ValueError.
"""
from typing import Optional

import torch


def additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A bool mask (True = masked) as 0 / −inf in `dtype`; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def merged_bias(
    attn_mask: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    batch: int,
    heads: int,
    dtype: torch.dtype,
) -> Optional[torch.Tensor]:
    """attn_mask and key_padding_mask added into one (N or 1, H or 1, L, S) additive mask, as
    nn.MultiheadAttention merges them."""
    bias = additive(attn_mask, dtype)
    if bias is not None and bias.dim() == 3:
        bias = bias.view(batch, heads, *bias.shape[1:])
    padding = additive(key_padding_mask, dtype)
    if padding is not None:
        padding = padding[:, None, None, :]
        bias = padding if bias is None else bias + padding
    return bias


def key_padding_as_bool(
    key_padding_mask: Optional[torch.Tensor], method: str
) -> Optional[torch.Tensor]:
    """key_padding_mask as bool (True = padded). A float mask must hold only 0 (kept) and −inf
    (padded): other values would reweight keys, which a kernelized method cannot do."""
    if key_padding_mask is None or key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    padded = torch.isneginf(key_padding_mask)
    if not torch.compiler.is_compiling() and bool(((key_padding_mask != 0) & ~padded).any()):
        raise ValueError(
            f"linattn.nn.MultiheadAttention(method={method!r}): a float key_padding_mask may only hold "
            "0 (keep) and -inf (padded) with this method, which cannot reweight keys; got other values"
        )
    return padded


def causal_pattern(length: int, source_length: int, device) -> torch.Tensor:
    """True above the diagonal: the keys a causal query must not see."""
    return torch.ones(length, source_length, dtype=torch.bool, device=device).triu(1)


def is_causal_mask(
    attn_mask: Optional[torch.Tensor], is_causal: bool, length: int, source_length: int, method: str
) -> bool:
    """Whether attn_mask / is_causal ask for causal attention, for a method that supports only
    "no mask" and "causal". Any other attn_mask raises a ValueError naming the method.

    As in torch, is_causal=True is a hint that attn_mask is the causal mask and is trusted.
    Without the hint the mask is inspected, which torch.compile cannot trace: there the hint is
    required."""
    where = f"linattn.nn.MultiheadAttention(method={method!r})"
    if attn_mask is None or is_causal:
        return is_causal
    if torch.compiler.is_compiling():
        raise ValueError(
            f"{where}: under torch.compile an attn_mask cannot be inspected; pass is_causal=True together "
            "with a causal attn_mask, or attn_mask=None"
        )
    if attn_mask.is_floating_point():
        masked = torch.isneginf(attn_mask)
        if bool(((attn_mask != 0) & ~masked).any()):
            raise ValueError(
                f"{where}: supports only a causal attn_mask or none; a float attn_mask with values other than "
                "0 and -inf would reweight scores, which this method cannot do"
            )
    else:
        masked = attn_mask
    if not bool(masked.any()):
        return False
    if length == source_length and bool((masked == causal_pattern(length, source_length, masked.device)).all()):
        return True
    raise ValueError(
        f"{where}: supports attn_mask=None or the causal mask (True / -inf above the diagonal, "
        f"or is_causal=True), got an attn_mask of shape {tuple(attn_mask.shape)} that is neither; "
        "use method='softmax' for arbitrary masks"
    )
