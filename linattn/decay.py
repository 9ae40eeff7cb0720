"""Causal linear attention with a fading state (docs/methods.md §1, decay and gates) in ATen ops: the
device-generic path that CUDA (and every non-CPU) tensors take, as csrc/linear_attention/
generic.cpp is for the plain operator. CPU tensors run the fused kernel
(torch.ops.linattn.linear_attn_fwd with log_decay) instead.

The sequence is cut into chunks of C rows, all evaluated at once in batched products (no Python
loop, so torch.compile sees one graph for any length):
- inside a chunk, b = the cumulative log factors from its first row; key s reaches query r with
  weight e^{b_r − b_s} (masked to −inf above the diagonal before exp, so only exponents <= 0);
- a chunk's own state U_c = Σ_s e^{b_last − b_s} φ(k_s) v_sᵀ;
- the state entering chunk c is Σ_{c' < c} e^{A_{c−1} − A_{c'}} U_{c'} + e^{A_{c−1}} S_0, with A
  the cumulative chunk totals: one (chunks × chunks) lower-triangular product, again with only
  exponents <= 0. Its cost, chunks²·m·dv, is why long sequences take longer chunks.
Autograd differentiates it (q, k, v, the state, and the log factors, hence decay and gate).

With `segments` (packed variable-length sequences, per-token sequence ids) nothing crosses a
sequence start: pairs, a chunk's own state and the carried states are masked to the rows of one
sequence (the masks are where the −inf / 0 go), so each sequence is computed as if alone with
no host synchronisation and no large reset factor that would cost the log factors precision.
"""
from typing import Optional, Tuple

import torch


def normalized_rows(numerator: torch.Tensor, denominator: torch.Tensor, eps: float) -> torch.Tensor:
    """numerator / (denominator + eps), denominator (…, 1). A vanished (0 or subnormal)
    normalizer defines the row as 0 (numerator·0: still NaN where it saw a NaN), as the kernels do."""
    denominator = denominator + eps
    vanished = denominator.abs() < torch.finfo(denominator.dtype).tiny
    return torch.where(vanished, numerator * 0, numerator / torch.where(vanished, 1, denominator))


def chunk_length(T: int) -> int:
    return 64 if T <= 16384 else 128


def decayed_linear_attention_generic(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]],
    key_padding_mask: Optional[torch.Tensor],
    normalize: bool,
    eps: float,
    segments: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """phi_q, phi_k (B, H, T, m) features and v (B, H, T, dv), all in the accumulation dtype;
    log_decay (B, H, T). Returns (out (B, H, T, dv), S (B, H, m, dv), z (B, H, m)).
    segments: (T,) sequence ids, equal within a sequence and different across a sequence start
    (then no initial state, and the returned S, z are None)."""
    B, H, T, m = phi_k.shape
    dv = v.shape[-1]
    if key_padding_mask is not None:  # a padded key contributes nothing (its value is not read)
        padded = key_padding_mask[:, None, :, None]
        phi_k = phi_k.masked_fill(padded, 0.0)
        v = v.masked_fill(padded, 0.0)
    C = chunk_length(T)
    n = -(-T // C)
    pad = n * C - T  # padded rows: no key, no fading, outputs dropped
    if pad:
        phi_q, phi_k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
        log_decay = torch.nn.functional.pad(log_decay, (0, pad))
        if segments is not None:  # padded rows join the last sequence: no key, outputs dropped
            segments = torch.cat([segments, segments[-1:].expand(pad)])
    q_c, k_c, v_c = (t.reshape(B, H, n, C, t.shape[-1]) for t in (phi_q, phi_k, v))
    b = log_decay.reshape(B, H, n, C).cumsum(-1)                       # (B, H, n, C), <= 0
    hidden = torch.ones(C, C, dtype=torch.bool, device=v.device).triu(1)
    if segments is not None:
        seg = segments.reshape(n, C)
        hidden = hidden | (seg.unsqueeze(-1) != seg.unsqueeze(-2))  # (n, C, C): other sequences too
    pair_decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(hidden, float("-inf")).exp()
    scores = (q_c @ k_c.transpose(-1, -2)) * pair_decay                # (B, H, n, C, C)
    numerator = scores @ v_c
    denominator = scores.sum(-1)

    # Chunk states and the state entering each chunk.
    to_end = (b[..., -1:] - b).exp().unsqueeze(-1)                     # e^{b_last − b_s}
    if segments is not None:  # a chunk's state holds only its last row's sequence
        to_end = to_end * (seg == seg[:, -1:]).unsqueeze(-1)
    U = (k_c * to_end).transpose(-1, -2) @ v_c                         # (B, H, n, m, dv)
    u = (k_c * to_end).sum(-2)                                         # (B, H, n, m)
    A = b[..., -1].cumsum(-1)                                          # (B, H, n), <= 0
    A_before = torch.nn.functional.pad(A[..., :-1], (1, 0))            # A_{c−1}, A_{−1} = 0
    earlier = torch.ones(n, n, dtype=torch.bool, device=v.device).tril(-1)
    if segments is not None:  # chunk c' reaches chunk c only within one sequence
        earlier = earlier & (seg[:, :1] == seg[:, -1].unsqueeze(0))
    carry = (A_before.unsqueeze(-1) - A.unsqueeze(-2)).masked_fill(~earlier, float("-inf")).exp()
    S_in = torch.einsum("bhcd,bhdmv->bhcmv", carry, U)                 # (B, H, n, m, dv)
    z_in = torch.einsum("bhcd,bhdm->bhcm", carry, u)
    if initial_state is not None:
        S0, z0 = initial_state
        fade_in = A_before.exp()
        S_in = S_in + fade_in[..., None, None] * S0.unsqueeze(2)
        z_in = z_in + fade_in[..., None] * z0.unsqueeze(2)
    row_fade = b.exp().unsqueeze(-1)                                   # e^{b_r}
    if segments is not None:  # only rows of the sequence the chunk starts in take the carried state
        row_fade = row_fade * (seg == seg[:, :1]).unsqueeze(-1)
    numerator = numerator + row_fade * (q_c @ S_in)
    denominator = denominator + row_fade.squeeze(-1) * (q_c @ z_in.unsqueeze(-1)).squeeze(-1)

    S = z = None
    if segments is None:
        # The final state: every chunk's state faded to the end, plus the initial one.
        to_last = (A[..., -1:] - A).exp()                              # (B, H, n)
        S = torch.einsum("bhc,bhcmv->bhmv", to_last, U)
        z = torch.einsum("bhc,bhcm->bhm", to_last, u)
        if initial_state is not None:
            # Faded by the whole sequence (not at all when it is empty).
            fade_all = A[..., -1].exp() if n else A.new_ones(B, H)
            S = S + fade_all[..., None, None] * initial_state[0]
            z = z + fade_all[..., None] * initial_state[1]

    numerator = numerator.reshape(B, H, n * C, dv)[:, :, :T]
    if not normalize:
        return numerator, S, z
    denominator = denominator.reshape(B, H, n * C)[:, :, :T].unsqueeze(-1)
    return normalized_rows(numerator, denominator, eps), S, z
