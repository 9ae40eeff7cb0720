"""The additive-attention operators (docs/methods.md §9), linattn::additive_attn_fwd / _bwd:
custom operators written with ATen ops (torch.library.custom_op), so the same code runs on every
device and torch.compile sees one opaque node with a fake kernel. The forward walks query blocks
sized so that one block's (rows, keys, D) tanh slab stays under a fixed number of elements; the
backward recomputes each slab from the saved per-row logsumexp: never the (T, S, D) tensor."""
from typing import Optional, Tuple

import torch

from .linear import accumulate_dtype

# Elements of one block's tanh slab (B·H·rows·keys·D): 2^24 floats = 64 MiB in float32.
_SLAB_ELEMENTS = 1 << 24


def _blocks(q: torch.Tensor, k: torch.Tensor, left: int, right: int):
    """(i0, i1, j0, j1): query blocks and the key range each one's window reaches, with
    rows chosen so that rows · keys · B·H·D stays near _SLAB_ELEMENTS."""
    B, H, T, D = q.shape
    S = k.shape[2]
    offset = S - T  # bottom-right alignment
    reach = min(S, left + right + 1) if left >= 0 and right >= 0 else S  # keys one row can see
    rows = max(1, _SLAB_ELEMENTS // max(1, B * H * D * max(reach, 1)))
    if left >= 0 and right >= 0:
        rows = min(rows, max(reach, 16))  # a block then reaches rows + reach keys
    for i0 in range(0, T, rows):
        i1 = min(T, i0 + rows)
        j0 = min(S, max(0, i0 + offset - left)) if left >= 0 else 0
        j1 = max(0, min(S, i1 + offset + right)) if right >= 0 else S
        yield i0, i1, j0, max(j0, j1)


def _visible(i0, i1, j0, j1, T, S, left, right, key_padding_mask, device):
    """(B or 1, 1, L, n) bool visibility of rows [i0, i1) against keys [j0, j1)."""
    a = torch.arange(i0, i1, device=device)[:, None] + (S - T)
    j = torch.arange(j0, j1, device=device)[None, :]
    visible = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if left >= 0:
        visible = visible & (j >= a - left)
    if right >= 0:
        visible = visible & (j <= a + right)
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, j0:j1]
    return visible


def _slab(q, k, i0, i1, j0, j1):
    """tanh(q_i + k_j) for the block, (B, H, L, n, D), in the accumulation dtype."""
    return torch.tanh(q[:, :, i0:i1, None, :] + k[:, :, None, j0:j1, :])


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulate_dtype(x.dtype))


@torch.library.custom_op("linattn::additive_attn_fwd", mutates_args=())
def additive_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, left: int, right: int,
                      key_padding_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    B, H, T, _ = q.shape
    S, dv = k.shape[2], v.shape[3]
    Q, K, V, W = _acc(q), _acc(k), _acc(v), _acc(w)
    out = torch.zeros(B, H, T, dv, dtype=Q.dtype, device=q.device)
    lse = torch.full((B, H, T), float("-inf"), dtype=Q.dtype, device=q.device)
    for i0, i1, j0, j1 in _blocks(q, k, left, right):
        if j1 <= j0:
            continue
        visible = _visible(i0, i1, j0, j1, T, S, left, right, key_padding_mask, q.device)
        scores = torch.einsum("bhlnd,hd->bhln", _slab(Q, K, i0, i1, j0, j1), W).masked_fill(~visible, float("-inf"))
        block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        seen = torch.isfinite(block_lse)
        probs = torch.where(seen, torch.exp(scores - torch.where(seen, block_lse, 0)), 0)
        out[:, :, i0:i1] = probs @ V[:, :, j0:j1]
        lse[:, :, i0:i1] = block_lse.squeeze(-1)
    return out.to(q.dtype), lse


@additive_attn_fwd.register_fake
def _(q, k, v, w, left, right, key_padding_mask):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, v.shape[3]), q.new_empty(B, H, T, dtype=accumulate_dtype(q.dtype))


@torch.library.custom_op("linattn::additive_attn_bwd", mutates_args=())
def additive_attn_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, left: int, right: int,
                      key_padding_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    T, S = q.shape[2], k.shape[2]
    Q, K, V, W, G = _acc(q), _acc(k), _acc(v), _acc(w), _acc(grad_out)
    delta = (G * _acc(out)).sum(-1, keepdim=True)  # δ_i = dO_i · O_i
    dQ, dK, dV, dW = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V), torch.zeros_like(W)
    for i0, i1, j0, j1 in _blocks(q, k, left, right):
        if j1 <= j0:
            continue
        visible = _visible(i0, i1, j0, j1, T, S, left, right, key_padding_mask, q.device)
        slab = _slab(Q, K, i0, i1, j0, j1)
        row_lse = lse[:, :, i0:i1, None]
        seen = visible & torch.isfinite(row_lse)
        scores = torch.einsum("bhlnd,hd->bhln", slab, W)
        probs = torch.where(seen, torch.exp(scores - torch.where(torch.isfinite(row_lse), row_lse, 0)), 0)
        g = G[:, :, i0:i1]
        dV[:, :, j0:j1] += probs.transpose(-1, -2) @ g
        dS = torch.where(seen, probs * (g @ V[:, :, j0:j1].transpose(-1, -2) - delta[:, :, i0:i1]), 0)
        dW += torch.einsum("bhln,bhlnd->hd", dS, slab)
        d_arg = dS.unsqueeze(-1) * W[None, :, None, None, :] * (1 - slab * slab)  # d/d(q_i + k_j)
        dQ[:, :, i0:i1] += d_arg.sum(3)
        dK[:, :, j0:j1] += d_arg.sum(2)
    return dQ.to(q.dtype), dK.to(k.dtype), dV.to(v.dtype), dW.to(w.dtype)


@additive_attn_bwd.register_fake
def _(grad_out, q, k, v, w, out, lse, left, right, key_padding_mask):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    q, k, v, w, left, right, key_padding_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, w, out, lse, key_padding_mask)
    ctx.bounds = (left, right)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, w, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv, dw = additive_attn_bwd(grad_out.contiguous(), q, k, v, w, out, lse, *ctx.bounds, key_padding_mask)
    return dq, dk, dv, dw, None, None, None


additive_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
