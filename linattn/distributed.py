"""Context parallelism for linear attention over torch.distributed (LASP-style state passing).

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
from .feature_maps import resolve_feature_map
from .functional import linear_attention, log_fade_factors

__all__ = ["context_parallel_linear_attention"]


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
            (B, H, T_r): as in linattn.linear_attention, for this rank's slice (decay and gate
            need causal=True).

    Returns:
        this rank's output slice (B, H, T_r, dv): what linattn.linear_attention gives for the
        whole sequence, cut to this rank's positions. Differentiable (q, k, v, decay, gate).
        Every rank must call it (a collective).
    """
    where = "linattn.distributed.context_parallel_linear_attention"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
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
    log_fade = torch.zeros(q.shape[0], q.shape[1], dtype=acc, device=q.device)
    if decay is not None or gate is not None:
        cumulative = log_fade_factors(where, decay, gate, k, causal, acc).cumsum(-1)
        log_fade = cumulative[..., -1] if q.shape[2] else log_fade
        # Key j reaches the slice's end faded by exp(c_T − c_j) <= 1 (no positive exponent).
        weighted = phi_k * torch.exp(log_fade.unsqueeze(-1) - cumulative).unsqueeze(-1)
    S_local = weighted.transpose(-1, -2) @ v.to(acc)
    z_local = weighted.sum(-2)

    # 2. Everyone's states, in one collective: the backward then runs exactly one all-reduce on
    # every rank, in the same order (separate gathers could run theirs in different orders).
    batch, heads, m, dv = S_local.shape
    packed = torch.cat([S_local.flatten(2), z_local, log_fade.unsqueeze(-1)], dim=-1)
    gathered = _AllGather.apply(packed, group)
    S_all = gathered[..., : m * dv].unflatten(-1, (m, dv))
    z_all, fade_all = gathered[..., m * dv: m * dv + m], gathered[..., -1]
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
        S_init = S_init + S_all[r] * weight[..., None, None]
        z_init = z_init + z_all[r] * weight[..., None]

    # 3. This slice from that state.
    return linear_attention(
        q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, eps=eps,
        key_padding_mask=key_padding_mask, decay=decay, gate=gate, initial_state=(S_init, z_init),
    )
