"""The Python side of the restricted-softmax operator (csrc/restricted_softmax/, docs/methods.md
§5–§7): `Pattern`, which keys each query sees, as the operator's arguments (`op_args`) and as the
dense mask of its definition (`dense_mask`, for the references, need_weights and mask checks), and
`restricted_softmax`, which runs it. The schema, checks, kernels, fake kernels and autograd are C++.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import routing


@dataclass(frozen=True)
class Pattern:
    """Which keys each query sees in a restricted-softmax call. Query i sees key j when

    - its region holds the pair: a block ``layout`` (H or 1, ⌈T_q/b⌉, ⌈T_k/b⌉) bool of
      ``block_size`` × ``block_size`` blocks, or else the sliding ``window`` (left, right) around
      the aligned position a = i + T_k − T_q (−1 = unbounded; both −1: every key), with
      ``dilation`` and Longformer ``global_mask`` (B, T) (a global row sees every key, every row the
      global keys);
    - ``causal``: j <= a (compares ``positions`` when given);
    - ``q_segments[i] == k_segments[j]`` (B, 1 or H, T_q / T_k) int64, and j is not padded
      (``key_padding_mask`` (B, T_k), True = padded).

    With a layout, two score terms: ``bias`` (1 or H, T_q, T_k) added to the scaled scores
    (differentiable), and ``positions`` (B, 1 or H, T) of a permuted sequence (a token's own key
    scores −1e5, Reformer's shared-QK rule). With any region, ``softcap`` c > 0 caps the scaled
    scores s to c·tanh(s / c) before the bias (Gemma-2's logit soft-capping; 0 = off), and
    ``alibi_slopes`` (H,) or (B, H) float32 add ``−slope·|a − j|`` after the cap (flash-attn's ALiBi;
    no gradient). ``dropout_p`` > 0 drops each probability after the softmax (the kept ones scaled
    by 1 / (1 − p)), pair by pair from the Philox bits of ``dropout_seed`` (a CPU int64 (1,) tensor;
    ``dropout_seed_from``); not part of the dense mask. ``forget_cumsum`` (B, H, T_k) in the
    accumulation dtype, T_q <= T_k: the Forgetting Transformer's cumulative log forget gates c, adding
    c_a − c_j to the scores of keys j <= a (c_j − c_a past a) after the cap and ALiBi (differentiable;
    linattn.forgetting builds it).
    """

    window: Tuple[int, int] = (-1, -1)
    dilation: int = 1
    causal: bool = False
    layout: Optional[torch.Tensor] = None
    block_size: int = 1
    global_mask: Optional[torch.Tensor] = None
    key_padding_mask: Optional[torch.Tensor] = None
    q_segments: Optional[torch.Tensor] = None
    k_segments: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    dropout_seed: Optional[torch.Tensor] = None
    forget_cumsum: Optional[torch.Tensor] = None

    def op_args(self) -> tuple:
        """The operator's pattern arguments, in schema order (after q, k, v and scale)."""
        return (self.window[0], self.window[1], self.dilation, self.causal, self.layout, self.block_size,
                self.global_mask, self.key_padding_mask, self.q_segments, self.k_segments, self.positions, self.bias,
                float(self.softcap), self.alibi_slopes, float(self.dropout_p), self.dropout_seed, self.forget_cumsum)

    def dense_mask(self, length_q: int, length_k: int, device=None) -> torch.Tensor:
        """The (B or 1, H or 1, T_q, T_k) bool mask, True = the query sees the key, straight from the
        definition above. The operator never builds it."""
        i = torch.arange(length_q, device=device)[:, None] + (length_k - length_q)  # aligned positions
        j = torch.arange(length_k, device=device)[None, :]
        if self.layout is not None:
            rows = torch.arange(length_q, device=device) // self.block_size
            cols = torch.arange(length_k, device=device) // self.block_size
            visible = self.layout.to(device)[:, rows][:, :, cols].unsqueeze(0)
        else:
            left, right = self.window
            d = i - j
            visible = torch.ones(length_q, length_k, dtype=torch.bool, device=device)
            if left >= 0:
                visible = visible & (d <= left)
            if right >= 0 and not self.causal:
                visible = visible & (-d <= right)
            visible = (visible & (d % self.dilation == 0))[None, None]
            if self.global_mask is not None:
                g = self.global_mask.to(device)
                visible = visible | g[:, None, :, None] | g[:, None, None, :]
        if self.causal:
            if self.positions is not None:
                p = self.positions.to(device)
                visible = visible & (p[:, :, None, :] <= p[:, :, :, None])
            else:
                visible = visible & (j <= i)
        if self.q_segments is not None:
            visible = visible & (self.q_segments.to(device)[:, :, :, None] == self.k_segments.to(device)[:, :, None, :])
        if self.key_padding_mask is not None:
            visible = visible & ~self.key_padding_mask.to(device)[:, None, None, :]
        return visible


def dropout_seed_from(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh dropout seed, a CPU int64 (1,) tensor drawn from `generator` (default: torch's CPU
    generator, so torch.manual_seed makes the masks reproducible); inside torch.compile a graph op."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, generator=generator)


_WORD = 0xFFFFFFFF


def _mul_hi_lo(x: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of x·m for 32-bit words x (int64) and a multiplier m < 2^32, the
    word split into 16-bit halves so that no product leaves int64 (generic_dropout.cpp's way)."""
    low = (x & 0xFFFF) * m
    mid = (x >> 16) * m + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int, dropout_p: float,
                      device=None) -> torch.Tensor:
    """(B, H, T_q, T_k) bool: the pairs the operator's attention dropout keeps under `seed` (a
    Pattern's dropout_seed): pair (b, h, i, j) when word j mod 4 of Philox4x32-10 at the counter
    (j / 4, i, b·H + h, 0) reaches ⌊p·2^32⌋ (csrc/common/philox.h). Dense, for the weights
    need_weights returns; every engine draws the same bits where it scores."""
    key = int(seed.reshape(-1)[0]) & 0xFFFFFFFFFFFFFFFF
    index = dict(dtype=torch.int64, device=device)
    j = torch.arange(k_len, **index)
    c0, c1 = (j >> 2).view(1, 1, 1, -1), torch.arange(q_len, **index).view(1, 1, -1, 1)
    c2, c3 = torch.arange(batch * heads, **index).view(batch, heads, 1, 1), torch.zeros((), **index)
    k0, k1 = key & _WORD, key >> 32
    for _ in range(10):
        (high0, low0), (high1, low1) = _mul_hi_lo(c0, 0xD2511F53), _mul_hi_lo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        k0, k1 = (k0 + 0x9E3779B9) & _WORD, (k1 + 0xBB67AE85) & _WORD
    shape = (batch, heads, q_len, k_len)
    words = torch.stack([c.expand(shape) for c in (c0, c1, c2, c3)], -1)
    bits = words.gather(-1, (j & 3).view(1, 1, 1, -1, 1).expand(*shape, 1)).squeeze(-1)
    return bits >= min(int(dropout_p * 4294967296.0), _WORD)


def soft_capped(scores: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """Scaled scores capped to c·tanh(s / c) as the operator caps them (Gemma-2's logit
    soft-capping), or as they are for no cap (None or 0): for the Python paths that form scores
    themselves (need_weights, decoding, the linearization teacher)."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def restricted_softmax_op(device_type: str = "cpu"):
    """The forward operator a call on `device_type` runs: the flash engine's under the fused CUDA
    backend (routing.py; on CPU tensors its emulation, under the tests' switch), the device-generic
    twin under the tests' generic switch, else the operator itself."""
    if routing.fused_in_use(device_type):
        return torch.ops.linattn.restricted_softmax_fwd_fused.default
    if routing.generic_in_use():
        return torch.ops.linattn.restricted_softmax_fwd_generic.default
    return torch.ops.linattn.restricted_softmax_fwd.default


def restricted_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       pattern: Pattern) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, T_q, dv), lse (B, H, T_q)): softmax attention under `pattern`."""
    return restricted_softmax_op(q.device.type)(q, k, v, float(scale), *pattern.op_args())
