"""Packed variable-length batches for linear attention (flash-attn's cu_seqlens convention).

q, k, v (1, H, total, D) hold N sequences back to back; cu_seqlens (N + 1,) int32 are their
offsets, sequence n in rows [cu_seqlens[n], cu_seqlens[n + 1]). Each sequence attends only to
itself, as if it were run alone, and has its own initial/final state (N, H, m, dv). No padding
is computed: graphs of different sizes or packed documents cost what their tokens cost.

CPU tensors run the varlen operators (each sequence through the chunked kernels on its own
rows of the packed buffers). Other devices, without per-sequence states, run the device-generic
fading-state formulation (linattn/decay.py) over the whole packing, with decay and gates,
masked so that nothing crosses a sequence start (non-causal: a forward and a reversed causal pass
over [v, 1], minus the diagonal), all on the device with no host synchronisation; with
per-sequence initial or final states they run one linear_attention call per sequence, which
reads the offsets on the host.
"""
import torch

from . import _ops
from . import _validation as check
from .decay import decayed_linear_attention_generic


def check_cu_seqlens(where: str, cu_seqlens, q: torch.Tensor, k: torch.Tensor, key_padding_mask) -> None:
    """Checks the packing's layout (its offsets' values: checked_offsets)."""
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


def checked_offsets(where: str, cu_seqlens: torch.Tensor, total: int) -> list:
    """The offsets on the host (a synchronisation on accelerators), checked: non-decreasing from 0
    to the packed length."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{where}: cu_seqlens must be non-decreasing offsets from 0 to the packed length "
                         f"{total}, got {offsets}")
    return offsets


def _position_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the sequence of each packed position, on the device (no values checked)."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    return torch.bucketize(positions, cu_seqlens[1:], right=True).to(torch.int64)


def sequence_ids(where: str, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the sequence each packed position belongs to, computed on the device (no
    host synchronisation); the offsets' values are checked for eager CPU tensors."""
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        checked_offsets(where, cu_seqlens, total)
    return _position_sequences(cu_seqlens, total)


def varlen_linear_attention(where, q, k, v, phi_q, phi_k, code, phi, cu_seqlens, *, causal, normalize, eps,
                            log_decay, initial_state, need_state, per_sequence):
    """(out (1, H, total, dv), (S, z) per sequence (N, ...), or None when not need_state on the
    device-generic path). phi_q / phi_k / code: the operator's feature inputs and map code, phi
    the map itself; per_sequence(start, end, n): linear_attention on one sequence with
    output_final_state=True."""
    acc = _ops.accumulate_dtype(q.dtype)
    sequences = cu_seqlens.numel() - 1
    if initial_state is not None:
        check.check_state(where, "initial_state", initial_state, phi_k.expand(sequences, *phi_k.shape[1:]), v)
    if q.device.type == "cpu" and not _ops.generic_in_use():
        initial = None
        if initial_state is not None:
            initial = torch.cat([initial_state[0].to(acc), initial_state[1].to(acc).unsqueeze(-1)], dim=-1)
        out, final_state, _ = torch.ops.linattn.linear_attn_varlen_fwd(
            phi_q, phi_k, v, cu_seqlens, log_decay, initial, code, causal, normalize, float(eps)
        )
        value_dim = v.shape[3]
        return out, (final_state[..., :value_dim], final_state[..., value_dim])
    if initial_state is None and not need_state:
        fused = phi if code else None  # a built-in map the CPU operator would have applied
        out = _packed_generic(where, phi_q, phi_k, fused, v, cu_seqlens, causal, normalize, eps, log_decay)
        return out.to(q.dtype), None
    offsets = checked_offsets(where, cu_seqlens, q.shape[2])
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


def _packed_generic(where, phi_q, phi_k, feature_map, v, cu_seqlens, causal, normalize, eps, log_decay=None):
    """Every sequence of the packing at once in ATen ops, nothing crossing a sequence start;
    feature_map: applied here to phi_q, phi_k first (in the accumulation dtype), or None;
    log_decay (1, H, total) or None (causal only)."""
    acc = _ops.accumulate_dtype(phi_q.dtype)
    if feature_map is not None:
        phi_q, phi_k = feature_map(phi_q.to(acc)), feature_map(phi_k.to(acc))
    phi_q, phi_k, v = phi_q.to(acc), phi_k.to(acc), v.to(acc)
    heads, total = phi_q.shape[1], phi_q.shape[2]
    ids = sequence_ids(where, cu_seqlens, total)
    no_fading = phi_q.new_zeros(1, heads, total)
    if causal:
        fading = no_fading if log_decay is None else log_decay.to(acc).expand(1, heads, total)
        out, _, _ = decayed_linear_attention_generic(phi_q, phi_k, v, fading, None, None, normalize, eps, ids)
        return out
    # Non-causal: each query's sum over its whole sequence = the causal sum (keys up to it) +
    # the reversed causal sum (keys from it on) − its own key; values carry a ones column, which
    # gives the normalizer too.
    values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    forward, _, _ = decayed_linear_attention_generic(phi_q, phi_k, values, no_fading, None, None, False, eps, ids)
    flip = lambda t: t.flip(-2)  # noqa: E731  (the sequence dim of (1, H, T, ·))
    backward, _, _ = decayed_linear_attention_generic(
        flip(phi_q), flip(phi_k), flip(values), no_fading, None, None, False, eps, ids.flip(0))
    both = forward + flip(backward) - (phi_q * phi_k).sum(-1, keepdim=True) * values
    numerator, denominator = both[..., :-1], both[..., -1:]
    if not normalize:
        return numerator
    denominator = denominator + eps
    vanished = denominator.abs() < torch.finfo(acc).tiny  # as the kernels: such rows are 0
    return torch.where(vanished, numerator * 0, numerator / torch.where(vanished, 1, denominator))


def segment_reverse_cumsum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Σ_{i >= t, i in t's sequence} values[..., i] for values (..., total): a reverse cumulative
    sum that restarts at every sequence end (what the gates' gradient needs)."""
    total = values.shape[-1]
    suffix = values.flip(-1).cumsum(-1).flip(-1)
    suffix = torch.cat([suffix, suffix.new_zeros(*suffix.shape[:-1], 1)], dim=-1)
    ends = cu_seqlens[1:].to(torch.int64)
    end_of = ends[_position_sequences(cu_seqlens, total).clamp(max=ends.numel() - 1)]
    return suffix[..., :total] - suffix.index_select(-1, end_of)
