"""Additive (Bahdanau) attention (docs/methods.md §9): score_ij = w_h · tanh(q_i + k_j), softmax over the
visible keys, optionally in a window. Exported from linattn.functional.

The (T, S, D) tensor of tanh arguments is what a plain PyTorch version builds; the operator
(linattn/ops/additive.py) never holds it.
"""
from typing import Optional, Tuple

import torch

from . import _validation as check
from .ops.additive import additive_attn_fwd
from .window import Window, window_bounds

def additive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    *,
    window: Optional[Window] = None,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bahdanau attention: out_i = Σ_j softmax_j(w_h · tanh(q_i + k_j)) v_j (docs/methods.md §9).

    Args:
        q (B, H, T_q, D), k (B, H, T_k, D), v (B, H, T_k, dv): the per-head projected queries,
            keys and values (W_q q and W_k k of the formula).
        w: (H, D), the per-head score vector.
        window: None (every key), an int w or a (left, right) pair as in sliding_window_attention.
        causal: keys after the query (bottom-right aligned) are hidden.
        key_padding_mask: (B, T_k) bool, True = padded.
    Memory: one block's (B·H·rows·keys·D) slab of at most 2^24 elements, never (T_q, T_k, D);
    time O(T_q·keys·D). A row that sees no key returns 0.
    """
    where = "linattn.additive_attention"
    check.check_qkv(where, q, k, v, causal=False)
    check.check_key_padding_mask(where, key_padding_mask, k)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (q.shape[1], q.shape[3]):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{where}: w must be a (H, D) = ({q.shape[1]}, {q.shape[3]}) tensor, got {got}")
    check.check_same_device_dtype(where, ("q", "w"), (q, w))
    left, right = window_bounds(where, window, causal) if window is not None else (-1, 0 if causal else -1)
    out, _ = additive_attn_fwd(q, k, v, w, left, right, key_padding_mask)
    return out
