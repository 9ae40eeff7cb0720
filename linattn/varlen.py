"""Packed variable-length batches for linear attention (flash-attn's cu_seqlens convention).

q, k, v (1, H, total, D) hold N sequences back to back; cu_seqlens (N + 1,) int32 are their
offsets, sequence n in rows [cu_seqlens[n], cu_seqlens[n + 1]). Each sequence attends only to
itself, as if it were run alone, and has its own initial/final state (N, H, m, dv). No padding
is computed: graphs of different sizes or packed documents cost what their tokens cost.

CPU tensors run the varlen operators (each sequence through the chunked kernels on its own
rows of the packed buffers, every thread on each); other devices run one linear_attention
call per sequence, which reads the offsets on the host (a synchronisation on CUDA tensors).
"""
import torch

from . import _ops
from . import _validation as check


def check_cu_seqlens(where: str, cu_seqlens, q: torch.Tensor, k: torch.Tensor, key_padding_mask) -> int:
    """Checks the packing; returns the number of sequences N."""
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
    return cu_seqlens.numel() - 1


def sequence_ids(where: str, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the sequence each packed position belongs to, computed on the device (no
    host synchronisation); the offsets' values are checked for eager CPU tensors."""
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{where}: cu_seqlens must be non-decreasing offsets from 0 to the packed length "
                             f"{total}, got {offsets}")
    positions = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    return torch.bucketize(positions, cu_seqlens[1:], right=True).to(torch.int64)


def varlen_linear_attention(where, q, k, v, phi_q, phi_k, code, cu_seqlens, *, causal, normalize, eps,
                            log_decay, initial_state, per_sequence):
    """(out (1, H, total, dv), (S, z) per sequence (N, ...)). phi_q / phi_k / code: the operator's
    feature inputs and map code; per_sequence(start, end, n): linear_attention on one sequence
    with output_final_state=True (the path of devices without the varlen operator)."""
    acc = _ops.accumulate_dtype(q.dtype)
    sequences = cu_seqlens.numel() - 1
    initial = None
    if initial_state is not None:
        check.check_state(where, "initial_state", initial_state, phi_k.expand(sequences, *phi_k.shape[1:]), v)
    if q.device.type == "cpu" and not _ops.generic_in_use():
        if initial_state is not None:
            initial = torch.cat([initial_state[0].to(acc), initial_state[1].to(acc).unsqueeze(-1)], dim=-1)
        out, final_state, _ = torch.ops.linattn.linear_attn_varlen_fwd(
            phi_q, phi_k, v, cu_seqlens, log_decay, initial, code, causal, normalize, float(eps)
        )
        value_dim = v.shape[3]
        return out, (final_state[..., :value_dim], final_state[..., value_dim])
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != q.shape[2] or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{where}: cu_seqlens must be non-decreasing offsets from 0 to the packed length "
                         f"{q.shape[2]}, got {offsets}")
    outs, states = [], []
    for n in range(sequences):
        out, state = per_sequence(offsets[n], offsets[n + 1], n)
        outs.append(out)
        states.append(state)
    if not states:  # no sequences: nothing to attend, empty states
        m = phi_k.shape[3]
        empty = (v.new_zeros(0, q.shape[1], m, v.shape[3], dtype=acc), v.new_zeros(0, q.shape[1], m, dtype=acc))
        return v.new_zeros(1, q.shape[1], 0, v.shape[3]), empty
    return torch.cat(outs, dim=2), (torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states]))


def segment_reverse_cumsum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Σ_{i >= t, i in t's sequence} values[..., i] for values (..., total): a reverse cumulative
    sum that restarts at every sequence end (what the gates' gradient needs)."""
    total = values.shape[-1]
    suffix = values.flip(-1).cumsum(-1).flip(-1)
    suffix = torch.cat([suffix, suffix.new_zeros(*suffix.shape[:-1], 1)], dim=-1)
    positions = torch.arange(total, device=values.device, dtype=torch.int32)
    ends = cu_seqlens[1:].to(torch.int64)
    end_of = ends[torch.bucketize(positions, cu_seqlens[1:], right=True).clamp(max=ends.numel() - 1)]
    return suffix[..., :total] - suffix.index_select(-1, end_of)
