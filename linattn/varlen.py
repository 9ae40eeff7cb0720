"""Packed variable-length batches for linear attention (flash-attn's cu_seqlens convention).

q, k, v (1, H, total, D) hold N sequences back to back; cu_seqlens (N + 1,) int32 are their
offsets, sequence n in rows [cu_seqlens[n], cu_seqlens[n + 1]). Each sequence attends only to
itself, as if it were run alone, and has its own initial/final state (N, H, m, dv). No padding
is computed: graphs of different sizes or packed documents cost what their tokens cost.

CPU tensors run the linear-attention operator with cu_seqlens (each sequence through the chunked kernels on its own
rows of the packed buffers). Other devices run the device-generic fading-state formulation
(linattn/decay.py) over the whole packing, decay and gates included, masked so that nothing
crosses a sequence start (non-causal: a forward and a reversed causal pass over [v, 1], minus
the diagonal); per-sequence states enter and leave through 2m extra rows per sequence
(_with_state_rows). All on the device, with no host synchronisation.
"""
import torch

from . import ops
from . import _validation as check
from .decay import decayed_linear_attention_generic, normalized_rows


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


def varlen_linear_attention(where, q, k, v, phi_q, phi_k, code, phi, cu_seqlens, *, causal, normalize, eps,
                            log_decay, initial_state, need_state):
    """(out (1, H, total, dv), (S, z) per sequence (N, ...) or None when not need_state).
    phi_q / phi_k / code: the operator's feature inputs and map code, phi the map itself."""
    sequences = cu_seqlens.numel() - 1
    if initial_state is not None:
        check.check_state(where, "initial_state", initial_state, phi_k.expand(sequences, *phi_k.shape[1:]), v)
    if q.device.type == "cpu" and not ops.generic_in_use():
        acc = ops.accumulate_dtype(q.dtype)
        initial = None if initial_state is None else ops.augmented_state(initial_state, acc)
        out, final_state, _ = torch.ops.linattn.linear_attn_fwd(
            phi_q, phi_k, v, initial, None, code, causal, normalize, float(eps), log_decay, cu_seqlens
        )
        return out, ops.returned_state(final_state, causal) if need_state else None
    fused = phi if code else None  # a built-in map the CPU operator would have applied
    out, state = _packed_generic(where, phi_q, phi_k, fused, v, cu_seqlens, causal, normalize, eps, log_decay,
                                 initial_state, need_state)
    return out.to(q.dtype), state


def _packed_generic(where, phi_q, phi_k, feature_map, v, cu_seqlens, causal, normalize, eps, log_decay=None,
                    initial_state=None, need_state=False):
    """Every sequence of the packing at once in ATen ops, nothing crossing a sequence start;
    feature_map: applied here to phi_q, phi_k first (in the accumulation dtype), or None;
    log_decay (1, H, total) or None (causal only). Returns (out, (S, z) per sequence or None)."""
    acc = ops.accumulate_dtype(phi_q.dtype)
    if feature_map is not None:
        phi_q, phi_k = feature_map(phi_q.to(acc)), feature_map(phi_k.to(acc))
    phi_q, phi_k, v = phi_q.to(acc), phi_k.to(acc), v.to(acc)
    heads, total, dv = phi_q.shape[1], phi_q.shape[2], v.shape[3]
    ids = sequence_ids(where, cu_seqlens, total)
    # Values carry a ones column: the normalizer comes out of the same sums.
    values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    fading = phi_q.new_zeros(1, heads, total) if log_decay is None else log_decay.to(acc).expand(1, heads, total)
    rows = None
    if initial_state is not None or need_state:
        phi_q, phi_k, values, fading, ids, rows = _with_state_rows(phi_q, phi_k, values, fading, ids, cu_seqlens,
                                                                   initial_state)
    sums, _, _ = decayed_linear_attention_generic(phi_q, phi_k, values, fading, None, None, False, eps, ids)
    if not causal:
        # Each query's sum over its whole sequence = the causal sum (keys up to it) + the reversed
        # causal sum (keys from it on) − its own key.
        flip = lambda t: t.flip(-2)  # noqa: E731  (the sequence dim of (1, H, T, ·))
        backward, _, _ = decayed_linear_attention_generic(
            flip(phi_q), flip(phi_k), flip(values), fading.flip(-1), None, None, False, eps, ids.flip(0))
        sums = sums + flip(backward) - (phi_q * phi_k).sum(-1, keepdim=True) * values
    state = None
    if rows is not None:
        real, state_rows = rows
        sequences, m = state_rows.shape
        # The state rows' sums are the rows of [S | z] at each sequence's end.
        final = sums.index_select(2, state_rows.flatten()).reshape(heads, sequences, m, dv + 1).transpose(0, 1)
        state = ops.split_state(final)
        sums = sums.index_select(2, real)
    numerator, denominator = sums[..., :-1], sums[..., -1:]
    return (normalized_rows(numerator, denominator, eps) if normalize else numerator), state


def _with_state_rows(phi_q, phi_k, values, fading, ids, cu_seqlens, initial_state):
    """The packing with 2m extra rows per sequence, so that states need no per-sequence loop:
    m key rows before it (φ(k) = e_i, value = row i of [S0 | z0], no fading) put its initial
    state into the sums as if it were keys, and m query rows after it (φ(q) = e_i, no key) read
    row i of [S | z] at its end. Row positions come from the offsets on the device: sequence n's
    block starts at cu_seqlens[n] + 2mn. Returns the expanded tensors, their sequence ids, and
    (the real rows' positions (total,), the state rows' positions (N, m))."""
    heads, total, m = phi_q.shape[1], phi_q.shape[2], phi_q.shape[3]
    width = values.shape[3]
    sequences = cu_seqlens.numel() - 1
    device = phi_q.device
    n = torch.arange(sequences, device=device)
    i = torch.arange(m, device=device)
    offsets = cu_seqlens.to(device=device, dtype=torch.int64)
    key_rows = (offsets[:-1] + 2 * m * n)[:, None] + i                     # (N, m)
    state_rows = (offsets[1:] + 2 * m * n + m)[:, None] + i                # (N, m)
    real = torch.arange(total, device=device) + 2 * m * ids + m
    expanded = total + 2 * m * sequences
    one_hot = torch.eye(m, dtype=phi_q.dtype, device=device).repeat(sequences, 1).expand(1, heads, sequences * m, m)
    if initial_state is None:
        start_values = values.new_zeros(1, heads, sequences * m, width)
    else:  # (N, H, m, dv + 1) -> (1, H, N·m, dv + 1), rows in key_rows' order
        start_values = ops.augmented_state(initial_state, values.dtype).transpose(0, 1).reshape(
            1, heads, sequences * m, width)

    def place(shape, dim, *parts):
        out = phi_q.new_zeros(shape) if len(shape) > 1 else ids.new_zeros(shape)
        for rows, part in parts:
            out = out.index_copy(dim, rows, part)
        return out

    keys, states = key_rows.flatten(), state_rows.flatten()
    phi_q = place((1, heads, expanded, m), 2, (real, phi_q), (states, one_hot))
    phi_k = place((1, heads, expanded, m), 2, (real, phi_k), (keys, one_hot))
    values = place((1, heads, expanded, width), 2, (real, values), (keys, start_values))
    fading = place((1, heads, expanded), 2, (real, fading))
    row_ids = n.repeat_interleave(m)
    ids = place((expanded,), 0, (real, ids), (keys, row_ids), (states, row_ids))
    return phi_q, phi_k, values, fading, ids, (real, state_rows)
