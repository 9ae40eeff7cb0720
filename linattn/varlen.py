"""Packed variable-length batches for linear attention (flash-attn's cu_seqlens convention).

q, k, v (1, H, total, D) hold N sequences back to back; cu_seqlens (N + 1,) int32 are their
offsets, sequence n in rows [cu_seqlens[n], cu_seqlens[n + 1]). Each sequence attends only to
itself, as if it were run alone, and has its own initial/final state (N, H, m, dv). No padding
is computed: graphs of different sizes or packed documents cost what their tokens cost.

The linear-attention operator takes cu_seqlens: CPU tensors run each sequence through the chunked
kernels on its own rows of the packed buffers; other devices run the device-generic formulation
over the whole packing (csrc/linear_attention/fading_generic.cpp: masked so that nothing crosses
a sequence start, states entering and leaving through extra rows, no host synchronisation).
"""
import torch

from . import ops
from . import _validation as check


def check_cu_seqlens(where: str, cu_seqlens, q: torch.Tensor, k: torch.Tensor, key_padding_mask) -> None:
    """Checks the packing's layout (its offsets' values: check_offsets)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{where}: cu_seqlens must be an int32 tensor of offsets (N + 1,), got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{where}: cu_seqlens must be a 1-D int32 tensor of offsets (N + 1,), got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{where}: cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"{where}: with cu_seqlens, q, k and v hold the packed sequences as (1, H, total, D), "
                         f"got q {tuple(q.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{where}: with cu_seqlens, queries and keys are the same packed positions, got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    if key_padding_mask is not None:
        raise ValueError(f"{where}: with cu_seqlens there is no padding to mask; pass key_padding_mask=None")


def check_offsets(where: str, cu_seqlens: torch.Tensor, total: int) -> None:
    """The offsets, read on the host, must be non-decreasing from 0 to the packed length."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{where}: cu_seqlens must be non-decreasing offsets from 0 to the packed length "
                         f"{total}, got {offsets}")


def _position_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the sequence of each packed position, on the device (no values checked)."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    return torch.bucketize(positions, cu_seqlens[1:], right=True).to(torch.int64)


def sequence_ids(where: str, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the sequence each packed position belongs to, computed on the device (no
    host synchronisation); the offsets' values are checked for eager CPU tensors."""
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        check_offsets(where, cu_seqlens, total)
    return _position_sequences(cu_seqlens, total)


def varlen_linear_attention(where, q, k, v, phi_q, phi_k, code, cu_seqlens, *, causal, normalize, eps,
                            log_decay, initial_state, need_state):
    """(out (1, H, total, dv), (S, z) per sequence (N, ...) or None when not need_state).
    phi_q / phi_k / code: the operator's feature inputs and map code."""
    sequences = cu_seqlens.numel() - 1
    if initial_state is not None:
        check.check_state(where, "initial_state", initial_state, phi_k.expand(sequences, *phi_k.shape[1:]), v)
    acc = ops.accumulate_dtype(q.dtype)
    initial = None if initial_state is None else ops.augmented_state(initial_state, acc)
    out, final_state, _ = ops.linear.forward_op(q.device.type, extended=True)(
        phi_q, phi_k, v, initial, None, code, causal, normalize, float(eps), log_decay, cu_seqlens
    )
    return out, ops.returned_state(final_state, causal) if need_state else None
