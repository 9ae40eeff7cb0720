"""The competitors of linattn.linear_attention in pure PyTorch, written as well as we can."""
import torch
import torch.nn.functional as F


def elu1(x):
    return F.elu(x) + 1


def linear_attention_einsum(q, k, v, eps=1e-6):
    """Non-causal: φ(Q) (φ(K)ᵀ V) / (φ(Q) Σφ(K) + eps), two einsums."""
    phi_q, phi_k = elu1(q), elu1(k)
    kv = torch.einsum("bhtm,bhtd->bhmd", phi_k, v)
    num = torch.einsum("bhtm,bhmd->bhtd", phi_q, kv)
    den = torch.einsum("bhtm,bhm->bht", phi_q, phi_k.sum(2)) + eps
    return num / den.unsqueeze(-1)


def linear_attention_chunked(q, k, v, eps=1e-6, chunk=64):
    """Causal: chunkwise form with batched matmuls and a cumulative sum of chunk states; the
    normalizer rides along as a ones column of V."""
    B, H, T, D = q.shape
    phi_q, phi_k = elu1(q), elu1(k)
    vp = torch.cat([v, v.new_ones(B, H, T, 1)], dim=-1)
    pad = (-T) % chunk
    if pad:
        phi_q, phi_k, vp = (F.pad(x, (0, 0, 0, pad)) for x in (phi_q, phi_k, vp))
    n = (T + pad) // chunk
    qc = phi_q.view(B, H, n, chunk, -1)
    kc = phi_k.view(B, H, n, chunk, -1)
    vc = vp.view(B, H, n, chunk, -1)
    intra = (qc @ kc.transpose(-1, -2)).tril() @ vc
    states = kc.transpose(-1, -2) @ vc
    before = torch.cumsum(states, dim=2) - states
    out = (intra + qc @ before).reshape(B, H, n * chunk, -1)[:, :, :T]
    return out[..., :D] / (out[..., D:] + eps)
