"""Context parallelism for linear attention and the delta rule over torch.distributed (LASP-style
state passing; the delta rule's is context_parallel_delta_rule's docstring).

Each rank holds a contiguous slice of one long sequence, in rank order. Linear attention needs
from the other ranks only their states, (S, z) of size m × dv per head, whatever their lengths:

  1. every rank sums its own keys into a local state (one GEMM; with decay/gates each key
     faded by what follows it in the slice), and the log of its slice's total fade;
  2. one all_gather of those (a few KiB per head); each rank combines the states of the ranks
     before it (causal: S_prev = Σ_{r' < r} (fade of ranks r'+1 .. r−1) · S_r'; non-causal: all
     other ranks), in rank order, so every rank computes the same numbers;
  3. the rank's slice runs through linattn.linear_attention with that as its initial state.

The gradient goes back through the same gather (its backward all-reduces the cotangents of
the gathered states and keeps this rank's part), so the backward is the matching reverse
pass. Works with any backend: gloo (CPU) is what the tests use; with NCCL, the tensors must be
on each rank's CUDA device (torch.cuda.set_device(local_rank) before the first call).
"""
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from . import ops
from .delta_rule import delta_rule_attention, l2_normalize
from .feature_maps import resolve_feature_map
from .functional import linear_attention, log_fade_factors

__all__ = ["context_parallel_linear_attention", "context_parallel_delta_rule"]


class _AllGather(torch.autograd.Function):
    """all_gather with a gradient: output (world, *x.shape); each rank's input receives the sum,
    over all ranks, of the cotangent of its slot."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def _check_initialized(where):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")


def context_parallel_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    causal: bool = True,
    feature_map: Union[str, Callable, None] = "elu",
    normalize: bool = True,
    eps: float = 1e-6,
    key_padding_mask: Optional[torch.Tensor] = None,
    decay: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Linear attention over a sequence split across the ranks of `group` (default: the world).

    Args:
        q, k, v: this rank's slice, (B, H, T_r, D), (B, H, T_r, D), (B, H, T_r, dv); the slices
            of ranks 0, 1, ... are consecutive pieces of one sequence (lengths may differ, and
            may be 0). B, H, D, dv, dtype and device must be the same on every rank.
        causal, feature_map, normalize, eps, key_padding_mask (B, T_r), decay (H,), gate
            (B, H, T_r) or per feature channel (B, H, T_r, m): as in linattn.linear_attention, for
            this rank's slice (decay and gate need causal=True).

    Returns:
        this rank's output slice (B, H, T_r, dv): what linattn.linear_attention gives for the
        whole sequence, cut to this rank's positions. Differentiable (q, k, v, decay, gate).
        Every rank must call it (a collective).
    """
    where = "linattn.distributed.context_parallel_linear_attention"
    _check_initialized(where)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k and v must be 4-D (B, H, T_r, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{where}: q and k must be the same slice of the sequence (same length), got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    acc = ops.accumulate_dtype(q.dtype)
    rank = dist.get_rank(group)

    # 1. This slice's own state, and the log of its total fade.
    phi = resolve_feature_map(feature_map, where)
    phi_k = k.to(acc) if phi is None else phi(k.to(acc))
    if key_padding_mask is not None:
        phi_k = phi_k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    weighted = phi_k
    # (B, H, w): one log factor for the whole state, or per feature channel (w = m) with per-channel gates.
    log_fade = torch.zeros(q.shape[0], q.shape[1], 1, dtype=acc, device=q.device)
    if decay is not None or gate is not None:
        factors = log_fade_factors(where, decay, gate, k, causal, acc, phi_k.shape[-1])
        cumulative = (factors if factors.dim() == 4 else factors.unsqueeze(-1)).cumsum(2)  # (B, H, T_r, w)
        log_fade = cumulative[:, :, -1] if q.shape[2] else cumulative.new_zeros(cumulative.shape[:2] + cumulative.shape[3:])
        # Key j reaches the slice's end faded by exp(c_T − c_j) <= 1 (no positive exponent).
        weighted = phi_k * torch.exp(log_fade.unsqueeze(2) - cumulative)
    S_local = weighted.transpose(-1, -2) @ v.to(acc)
    z_local = weighted.sum(-2)

    # 2. Everyone's states, in one collective: the backward then runs exactly one all-reduce on
    # every rank, in the same order (separate gathers could run theirs in different orders).
    batch, heads, m, dv = S_local.shape
    packed = torch.cat([S_local.flatten(2), z_local, log_fade], dim=-1)
    gathered = _AllGather.apply(packed, group)
    S_all = gathered[..., : m * dv].unflatten(-1, (m, dv))
    z_all, fade_all = gathered[..., m * dv: m * dv + m], gathered[..., m * dv + m:]
    # The states this slice continues from, combined in rank order. Every rank's slot enters the
    # sum (weight 0 when it does not count), so the gather's output is always part of the graph.
    S_init, z_init = torch.zeros_like(S_local), torch.zeros_like(z_local)
    for r in range(S_all.shape[0]):
        counts = r < rank if causal else r != rank
        if not counts:
            weight = torch.zeros_like(log_fade)
        elif causal:  # faded by every slice between r and this rank
            weight = torch.exp(fade_all[r + 1:rank].sum(0))
        else:
            weight = torch.ones_like(log_fade)
        S_init = S_init + S_all[r] * weight[..., None]  # (B, H, w, 1): the whole state or its rows
        z_init = z_init + z_all[r] * weight

    # 3. This slice from that state.
    return linear_attention(
        q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, eps=eps,
        key_padding_mask=key_padding_mask, decay=decay, gate=gate, initial_state=(S_init, z_init),
    )


def context_parallel_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    gate: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    normalize_qk: bool = True,
):
    """The delta rule (linattn.delta_rule_attention, docs/methods.md §11) over a sequence split
    across the ranks of `group` (default: the world).

    A slice acts on the state it receives as an affine map, S_end = M_r S_start + N_r, with
    M_r = Π_t (I − β_t k_t k_tᵀ) Diag(e^{g_t}) (dk × dk) and N_r the state the slice leaves from zero.
    One local call gives both: the slice's own keys, β and gates on the values [v | 0] from the
    state [0 | I] end in [N_r | M_r] (each state column evolves on its own). One all_gather of
    those (dk × (dv + dk) per head); every rank composes the maps of the ranks before it in rank
    order (causal; non-causal: all of them, for the final state every query reads), then runs
    its slice from that state. About twice a slice's single-process work (dv + dk state columns,
    then dv), and the exchange does not grow with the slices' lengths.

    Args:
        q, k: (B, H, T_r, dk); v: (B, H, T_r, dv); beta, gate: (B, H, T_r) (gate (B, H, T_r, dk)
            per key channel): this rank's slice;
            the slices of ranks 0, 1, ... are consecutive pieces of one sequence (lengths may
            differ, and may be 0). B, H, dk, dv, dtype and device must be the same on every rank.
        causal, scale, normalize_qk: as in linattn.delta_rule_attention.
        initial_state: (B, H, dk, dv), the same on every rank: the state before the sequence.
        output_final_state: also return the state after the whole sequence (the same on every rank).

    Returns:
        this rank's output slice (B, H, T_r, dv) — what delta_rule_attention gives for the whole
        sequence, cut to this rank's positions — or (out, final_state). Differentiable (q, k, v,
        beta, gate, initial_state). Every rank must call it (a collective).
    """
    where = "linattn.distributed.context_parallel_delta_rule"
    _check_initialized(where)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k and v must be 4-D (B, H, T_r, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    acc = ops.accumulate_dtype(q.dtype)
    rank = dist.get_rank(group)
    batch, heads, _, dk = k.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else float(scale)

    # 1. This slice's affine map [N_r | M_r], in one call.
    values = torch.cat([v, v.new_zeros(*v.shape[:-1], dk)], dim=-1)
    identity = torch.eye(dk, dtype=acc, device=q.device).expand(batch, heads, dk, dk)
    start = torch.cat([q.new_zeros(batch, heads, dk, dv, dtype=acc), identity], dim=-1)
    _, local_map = delta_rule_attention(q, k, values, beta, gate=gate, causal=True, scale=scale,
                                        initial_state=start, output_final_state=True, normalize_qk=normalize_qk)

    # 2. Everyone's maps in one collective, composed in rank order from the initial state.
    maps = _AllGather.apply(local_map, group)
    state = (initial_state.to(acc) if initial_state is not None
             else torch.zeros(batch, heads, dk, dv, dtype=acc, device=q.device))
    before = state
    for r in range(maps.shape[0]):
        if r == rank:
            before = state
        state = maps[r][..., dv:] @ state + maps[r][..., :dv]  # after rank r's slice
    final_state = state

    # 3. This slice from the state before it (causal), or every query reading the final state.
    if causal:
        # Every slot of the gather enters the output (times 0), so its backward, an all-reduce, runs
        # on every rank, rank 0 included.
        before = before + 0.0 * maps[..., :dv].sum(0)
        out = delta_rule_attention(q, k, v, beta, gate=gate, causal=True, scale=scale,
                                   initial_state=before, normalize_qk=normalize_qk)
    else:
        queries = l2_normalize(q.to(acc)) if normalize_qk else q.to(acc)  # as the kernels: in acc
        out = (scale * (queries @ final_state)).to(q.dtype)
    return (out, final_state) if output_final_state else out
