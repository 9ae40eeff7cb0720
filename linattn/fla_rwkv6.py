"""flash-linear-attention's RWKV-6 (``chunk_rwkv6``, ``fused_recurrent_rwkv6``) on linattn's gated
linear attention, re-exported by ``linattn.fla_compat``. fla's recurrence, per head, with r the
receptance (the query), w a log-decay per key channel and u a per-head bonus (H, K):

    o_t = scale · r_tᵀ (h_{t−1} + Diag(u) k_t v_tᵀ),    h_t = Diag(e^{w_t}) h_{t−1} + k_t v_tᵀ.

The output reads the state before token t joins it and before t's decay, where linattn's gates
(S_t = Diag(e^{g_t}) S_{t−1} + k_t v_tᵀ, o_t = q_tᵀ S_t) read it after both. So the operator runs
on keys, values and gates moved one row later within each sequence (the first row zero, no gate):
its S_t is h_{t−1}, exactly; the bonus term is a row-wise product added after, and the final
state takes the last token's step on top (h_T = Diag(e^{w_T}) S_T + k_T v_Tᵀ). Costs a copy of k,
v and w; no exponential of −w (which would overflow for the strong decays RWKV-6 learns)."""
import torch

from .fla_linear import int32_offsets, refuse_others, reversal_index, reversed_rows
from .functional import linear_attention
from .varlen import sequence_ids


def sequence_starts(where: str, cu_seqlens, total: int, device) -> torch.Tensor:
    """(total,) bool: the rows that start a sequence (row 0, or each packed sequence's first row:
    int32 offsets on `device`, values checked for eager CPU tensors). On the device (no sync)."""
    rows = torch.arange(total, device=device)
    if cu_seqlens is None:
        return rows == 0
    return cu_seqlens.long()[sequence_ids(where, cu_seqlens, total)] == rows


def shifted_rows(x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) moved one row later within each sequence, the rows in `starts` (sequence_starts)
    zero."""
    T = x.shape[1]
    moved = x.index_select(1, (torch.arange(T, device=x.device) - 1).clamp_min(0))
    return moved.masked_fill(starts.view(1, T, *([1] * (x.dim() - 2))), 0)


def _last_rows(x: torch.Tensor, offsets) -> torch.Tensor:
    """Each sequence's last row of x (B, T, ...): (B, ...) or, packed, (N, ...) (row 0 of an empty
    sequence's neighbour: the caller keeps such a sequence's state)."""
    if offsets is None:
        return x[:, -1]
    return x[0].index_select(0, (offsets[1:].long() - 1).clamp_min(0))


def rwkv6(where, r, k, v, w, u, scale, initial_state, output_final_state, reverse, cu_seqlens, options):
    refuse_others(where, options)
    if r.dim() != 4 or k.shape != r.shape or w.shape != r.shape or v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"{where}: r, k and w must be (B, T, H, K) and v (B, T, H, V), got r {tuple(r.shape)}, "
                         f"k {tuple(k.shape)}, w {tuple(w.shape)}, v {tuple(v.shape)}")
    B, T, H, K = r.shape
    if u.shape != (H, K):
        raise ValueError(f"{where}: u must be (H, K) = {(H, K)}, got {tuple(u.shape)}")
    scale = K ** -0.5 if scale is None else scale
    offsets = int32_offsets(where, B, cu_seqlens, r.device)
    state = None if initial_state is None else (initial_state, initial_state.new_zeros(initial_state.shape[:3]))
    # (In the order the recurrence runs: reverse reads each sequence from its last token.)
    order = reversal_index(where, offsets, T, r.device) if reverse else None
    rr, kk, vv, ww = (reversed_rows(x, order) for x in (r, k, v, w)) if reverse else (r, k, v, w)
    starts = sequence_starts(where, offsets, T, r.device)
    moved = [shifted_rows(x, starts).transpose(1, 2) for x in (kk, vv, ww)]
    out, (S, _) = linear_attention((rr * scale).transpose(1, 2), moved[0], moved[1], causal=True,
                                   feature_map="identity", normalize=False, gate=moved[2], initial_state=state,
                                   output_final_state=True, cu_seqlens=offsets)
    out = out.transpose(1, 2)
    if reverse:
        out = reversed_rows(out, order)
    acc = torch.promote_types(r.dtype, torch.float32)
    bonus = scale * (r.to(acc) * u.to(acc) * k.to(acc)).sum(-1, keepdim=True) * v.to(acc)
    out = (out.to(acc) + bonus).to(r.dtype).contiguous()
    if not output_final_state:
        return out, None
    if T > 0:
        k_last, v_last, w_last = (_last_rows(x, offsets).to(S.dtype) for x in (kk, vv, ww))
        stepped = w_last.exp()[..., None] * S + k_last[..., None] * v_last[..., None, :]
        if offsets is not None:  # an empty sequence keeps its state
            filled = (offsets[1:] > offsets[:-1]).view(-1, 1, 1, 1)
            stepped = torch.where(filled, stepped, S)
        S = stepped
    return out, S


def chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                **options):
    """RWKV-6 (Finch): o_t = scale · r_tᵀ (h_{t−1} + Diag(u) k_t v_tᵀ), h_t = Diag(e^{w_t}) h_{t−1}
    + k_t v_tᵀ; r, k, w (B, T, H, K) (w the log-decay, <= 0), v (B, T, H, V), u (H, K)."""
    return rwkv6("chunk_rwkv6", r, k, v, w, u, scale, initial_state, output_final_state, False, cu_seqlens,
                 options)


def fused_recurrent_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, reverse=False,
                          cu_seqlens=None, **options):
    return rwkv6("fused_recurrent_rwkv6", r, k, v, w, u, scale, initial_state, output_final_state, reverse,
                 cu_seqlens, options)
