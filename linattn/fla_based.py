"""flash-linear-attention's Based (``parallel_based``, ``fused_chunk_based``; Arora et al. 2024) on
linattn's linear attention, re-exported by ``linattn.fla_compat``. Based is causal linear
attention with the second-order Taylor expansion of exp as its kernel, a = scale · q_t · k_s:

    o_t = Σ_{s <= t} (1 + a + a²/2) v_s  /  (Σ_{s <= t} (1 + a + a²/2) + 1e-6)   (use_norm=True).

1 + a + a²/2 is φ(scale · q) · φ(k) with φ(x) = [1, x, (x_i x_j c_ij)_{i <= j}], c_ii = 1/√2 and
c_ij = 1 off the diagonal — the upper triangle of x xᵀ / √2 with each off-diagonal pair summed, so
1 + d + d(d + 1)/2 features (153 for Based's d = 16, within the tensor-core kernels' 256) instead
of 1 + d + d². The features are computed in float32 and handed to the operator in the inputs'
dtype (feature_map=None, its normalizer with eps 1e-6)."""
import torch

from .functional import linear_attention


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """φ(x) (…, d) -> (…, 1 + d + d(d + 1)/2) in float32 at least: φ(x) · φ(y) = 1 + x·y + (x·y)²/2."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    d = x.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=x.device)
    weight = torch.where(rows == cols, x.new_tensor(0.5 ** 0.5), x.new_tensor(1.0))
    second = x[..., rows] * x[..., cols] * weight
    return torch.cat([torch.ones_like(x[..., :1]), x, second], -1)


def based(where, q, k, v, scale, use_norm):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{where}: q and k must be (B, T, H, K) and v (B, T, H, V), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    phi_q, phi_k = (taylor_features(x).to(q.dtype).transpose(1, 2) for x in (q * scale, k))
    out = linear_attention(phi_q, phi_k, v.transpose(1, 2), causal=True, feature_map=None, normalize=use_norm,
                           eps=1e-6)
    return out.transpose(1, 2).contiguous()


def parallel_based(q, k, v, scale=None, use_norm=True):
    """Based's causal attention, (B, T, H, K) inputs (any K; fla's kernels take up to 128)."""
    return based("parallel_based", q, k, v, scale, use_norm)


def fused_chunk_based(q, k, v, scale=None, use_norm=True):
    """parallel_based's result (fla's chunked kernel for K <= 16)."""
    return based("fused_chunk_based", q, k, v, scale, use_norm)
