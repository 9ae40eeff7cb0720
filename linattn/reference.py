"""Float64 quadratic formulas of docs/methods.md: the oracle every kernel is tested against.

Deliberately naive: the full (T_q × T_k) score matrix, no chunking, no reuse of the kernels'
algebra, so that a shared mistake is unlikely.
"""
from typing import Optional, Tuple

import torch

from .feature_maps import resolve_feature_map
from .sparse import layout_mask
from .window import window_mask


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    feature_map="elu",
    normalize: bool = True,
    eps: float = 1e-6,
    key_padding_mask: Optional[torch.Tensor] = None,
    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
):
    """docs/methods.md §1 in float64. Returns (out, (S_final, z_final)).

    Masked pairs (a later key when causal, a padded key) are excluded from every sum, not
    multiplied by 0, so an Inf or NaN there never reaches a query; a row whose normalizer is 0
    (or subnormal) is 0."""
    phi = resolve_feature_map(feature_map, "linattn.reference.linear_attention")
    q, k, v = q.double(), k.double(), v.double()
    phi_q, phi_k = (q, k) if phi is None else (phi(q), phi(k))
    batch, heads, length_q, length_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    visible = torch.ones(batch, 1, length_q, length_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    scores = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~visible, 0.0)  # (B, H, T_q, T_k)
    numerator = _visible_sum(scores, visible, v)
    normalizer = scores.sum(-1)
    # The final state sums every unpadded key.
    key_visible = torch.ones(batch, 1, 1, length_k, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        key_visible = key_visible & ~key_padding_mask[:, None, None, :]
    phi_k_visible = phi_k.transpose(-1, -2).masked_fill(~key_visible, 0.0)  # (B, H, m, T_k)
    S = _visible_sum(phi_k_visible, key_visible, v)
    z = phi_k_visible.sum(-1)
    # o_i = φ(q_i)ᵀ S_i: a query multiplies its state even when no key is visible (an empty
    # state is 0, and a NaN or Inf query then gives NaN, as in the kernels).
    m, dv = phi_q.shape[-1], v.shape[-1]
    numerator = numerator + phi_q @ phi_q.new_zeros(m, dv)
    normalizer = normalizer + phi_q @ phi_q.new_zeros(m)
    if initial_state is not None:
        S0, z0 = initial_state[0].double(), initial_state[1].double()
        numerator = numerator + phi_q @ S0
        normalizer = normalizer + (phi_q * z0.unsqueeze(-2)).sum(-1)
        S, z = S + S0, z + z0
    if not normalize:
        return numerator, (S, z)
    denominator = (normalizer + eps).unsqueeze(-1)
    # As the kernels: a vanished normalizer gives 0 (NaN where the row sees a NaN or Inf), not 0/0.
    vanished = denominator.abs() < torch.finfo(torch.float64).tiny
    out = torch.where(vanished, numerator * 0.0, numerator / denominator)
    return out, (S, z)


def decayed_linear_attention(q, k, v, log_factors, *, feature_map="elu", normalize=True, eps=1e-6,
                             initial_state=None, key_padding_mask=None):
    """Causal linear attention with a fading state (docs/methods.md §1, decay and gates) in float64:
    S_i = f_i S_{i−1} + φ(k_i) v_iᵀ with log f = log_factors (B, H, T) (log γ of a per-head decay,
    or the log-gates g), or (B, H, T, m) one per feature channel (GLA: row c of S fades by f_ic).
    Dense: o_i sums w_ij φ(q_i)·φ(k_j) v_j over j <= i with w_ij = exp(c_i − c_j) — per channel
    inside the dot product, Σ_c φ(q_i)_c φ(k_j)_c exp(c_ic − c_jc) —, c the cumulative sum of log f
    (only c_i − c_j <= 0 is exponentiated), plus (e^{c_i} ⊙ φ(q_i))ᵀ S_0. A padded key has φ(k) = 0
    (its position still fades the state). Returns (out, (S_T, z_T))."""
    phi = resolve_feature_map(feature_map, "linattn.reference.decayed_linear_attention")
    q, k, v = q.double(), k.double(), v.double()
    phi_q, phi_k = (q, k) if phi is None else (phi(q), phi(k))
    if key_padding_mask is not None:
        phi_k = phi_k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        v = v.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    per_channel = log_factors.dim() == 4
    c = log_factors.double().cumsum(2)                                    # (B, H, T[, m])
    c4 = c if per_channel else c.unsqueeze(-1)                            # (B, H, T, w)
    T = q.shape[2]
    later = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    exponent = (c4.unsqueeze(3) - c4.unsqueeze(2)).masked_fill(later[..., None], float("-inf"))  # (B, H, T, T, w)
    if per_channel:
        weights = torch.einsum("bhic,bhjc,bhijc->bhij", phi_q, phi_k, exponent.exp())
    else:
        weights = exponent.squeeze(-1).exp() * (phi_q @ phi_k.transpose(-1, -2))  # (B, H, T, T)
    numerator = weights @ v
    denominator = weights.sum(-1)
    whole = c4[:, :, -1:] if T else c4.new_zeros(c4.shape[0], c4.shape[1], 1, c4.shape[3])  # an empty sequence
    to_end = phi_k * (whole - c4).exp()                                   # φ(k_j) ⊙ e^{c_T − c_j}
    S_T = to_end.transpose(-1, -2) @ v
    z_T = to_end.sum(-2)
    if initial_state is not None:
        S0, z0 = initial_state[0].double(), initial_state[1].double()
        faded_q = phi_q * c4.exp()                                        # e^{c_i} <= 1
        numerator = numerator + faded_q @ S0
        denominator = denominator + (faded_q @ z0.unsqueeze(-1)).squeeze(-1)
        S_T = S_T + whole.exp().transpose(-1, -2) * S0                   # (B, H, w, 1): rows of S0
        z_T = z_T + whole.exp().squeeze(2) * z0
    if not normalize:
        return numerator, (S_T, z_T)
    denominator = denominator + eps
    vanished = denominator.abs() < torch.finfo(torch.float64).tiny
    out = torch.where(vanished.unsqueeze(-1), numerator * 0, numerator / denominator.unsqueeze(-1))
    return out, (S_T, z_T)


def _visible_sum(weights: torch.Tensor, visible: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_j weights_ij values_j over the visible j only. With finite values a matrix product
    (the masked weights are 0 and 0·finite = 0); otherwise term by term, masked terms dropped."""
    if bool(torch.isfinite(values).all()):
        return weights @ values
    terms = weights.unsqueeze(-1) * values.unsqueeze(-3)  # (..., i, j, c)
    return terms.masked_fill(~visible.unsqueeze(-1), 0.0).sum(-2)


def softmax_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None):
    """docs/methods.md §0 in float64: softmax(s·QKᵀ + B) V."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def favor_features(x, projection, *, kernel="softmax"):
    """docs/methods.md §2 features in float64, without any stabilizer: exp(W x' − ‖x'‖²/2) / √m with
    x' = x·d^(−1/4), or relu(W x') + 1e-3."""
    x, w = x.double(), projection.double()
    x = x * x.shape[-1] ** -0.25
    projected = x @ w.T
    if kernel == "relu":
        return torch.relu(projected) + 1e-3
    return torch.exp(projected - 0.5 * (x * x).sum(-1, keepdim=True)) / w.shape[0] ** 0.5


def performer_attention(q, k, v, projection, *, causal=False, kernel="softmax", eps=0.0, key_padding_mask=None):
    """FAVOR+ (§2) as quadratic attention with the same random features, in float64."""
    phi_q = favor_features(q, projection, kernel=kernel)
    phi_k = favor_features(k, projection, kernel=kernel)
    out, _ = linear_attention(
        phi_q, phi_k, v, causal=causal, feature_map=None, eps=eps, key_padding_mask=key_padding_mask
    )
    return out


def efficient_attention(q, k, v, *, key_padding_mask=None):
    """Efficient Attention (§3) in float64: ρ_q(Q) ρ_k(K)ᵀ V as a (T_q × T_k) matrix."""
    q, k, v = q.double(), k.double(), v.double()
    rho_q = torch.softmax(q, dim=-1)
    if key_padding_mask is not None:
        k = k.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
    rho_k = torch.nan_to_num(torch.softmax(k, dim=-2), nan=0.0)
    return (rho_q @ rho_k.transpose(-1, -2)) @ v


def linformer_attention(q, k, v, E, F, *, key_padding_mask=None):
    """Linformer (§4) in float64: softmax(s·Q (E K)ᵀ) (F V), E, F (…, k, N_max) cut to T_k."""
    q, k, v = q.double(), k.double(), v.double()
    length = k.shape[-2]
    E, F = E[..., :length].double(), F[..., :length].double()
    if key_padding_mask is not None:
        keep = (~key_padding_mask)[:, None, :, None].double()
        k, v = k * keep, v * keep
    k_proj, v_proj = E @ k, F @ v
    scores = (q @ k_proj.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ v_proj


def sliding_window_attention(q, k, v, window, *, causal=False, dilation=1, global_mask=None,
                             key_padding_mask=None, scale=None):
    """docs/methods.md §5 in float64: softmax over exactly the visible keys, masked terms excluded
    (an Inf or NaN at a key a row cannot see never reaches it); a row with no visible key is 0."""
    q, k, v = q.double(), k.double(), v.double()
    scale = (q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0) if scale is None else scale
    visible = window_mask(q.shape[2], k.shape[2], window, causal=causal, dilation=dilation,
                                global_mask=global_mask, key_padding_mask=key_padding_mask,
                                batch=q.shape[0], device=q.device)
    return masked_softmax_attention(q, k, v, visible, scale)


def masked_softmax_attention(q, k, v, visible, scale, *, bias=None, fixed=None, softcap=0.0, alibi_slopes=None,
                             keep=None, dropout_p=0.0, return_lse=False):
    """Softmax over exactly the visible keys (a dense bool mask), in float64, masked terms
    excluded; a row with no visible key is 0 (lse −inf). softcap > 0 caps the scaled scores s to
    softcap·tanh(s / softcap); ALiBi's ``−slope·|i + T_k − T_q − j|`` (alibi_slopes (H,) or (B, H)) and
    bias are added after; `fixed` pairs score kSelfScore (−1e5) whatever q and k are. k and v may
    have fewer heads than q (grouped-query attention: each serves H / H_kv query heads). keep
    (B, H, T_q, T_k) bool applies attention dropout: probabilities where it is False dropped after
    the softmax, the others scaled by 1 / (1 − dropout_p); the lse is the undropped softmax's."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        T_q, T_k = q.shape[2], k.shape[2]
        rows, keys = torch.arange(T_q, device=q.device)[:, None] + (T_k - T_q), torch.arange(T_k, device=q.device)
        distance = (rows - keys).abs()
        slopes = alibi_slopes.double().reshape(-1 if alibi_slopes.dim() == 2 else 1, q.shape[1], 1, 1)
        scores = scores - slopes * distance.double()
    if bias is not None:
        scores = scores + bias.double()
    if fixed is not None:
        scores = torch.where(fixed, torch.full_like(scores, SELF_SCORE), scores)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, torch.zeros_like(probs))  # no key: 0, not NaN
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    out = _visible_sum(probs, visible, v)
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


def forget_decay(log_forget, T_q, T_k):
    """(B, H, T_q, T_k) float64: D_ij = Σ_{l=j+1}^{a} log f_l for key j <= a, Σ_{l=a+1}^{j} log f_l past
    it (a = i + T_k − T_q), from log_forget (B, H or 1, T_k), as running sums in float64."""
    lf = log_forget.double()
    prefix = torch.nn.functional.pad(lf.cumsum(-1), (1, 0))  # prefix[m] = Σ_{l<m} log f_l
    a = torch.arange(T_q, device=lf.device) + (T_k - T_q)
    j = torch.arange(T_k, device=lf.device)
    at_a, at_j = prefix[..., a + 1].unsqueeze(-1), prefix[..., j + 1].unsqueeze(-2)
    return torch.where(j[None, :] <= a[:, None], at_a - at_j, at_j - at_a)


def forgetting_attention(q, k, v, log_forget, *, causal=True, window=-1, scale=None, key_padding_mask=None,
                         return_lse=False):
    """The Forgetting Transformer's attention (docs/methods.md §5.1) in float64: the scaled scores plus
    forget_decay's D, softmax over exactly the window's visible keys."""
    scale = (q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0) if scale is None else scale
    visible = window_mask(q.shape[2], k.shape[2], window, causal=causal, key_padding_mask=key_padding_mask,
                          batch=q.shape[0], device=q.device)
    bias = forget_decay(log_forget, q.shape[2], k.shape[2])
    return masked_softmax_attention(q, k, v, visible, scale, bias=bias, return_lse=return_lse)


# Reformer's score for a token attending to itself under shared QK (docs/methods.md §7).
SELF_SCORE = -1e5


def swin_attention(q, k, v, *, bias=None, regions=None, scale=None, keep=None, dropout_p=0.0):
    """Swin window attention (docs/methods.md §6) in float64 on partitioned windows (G, H, N, D):
    scaled scores plus bias (H or 1, N, N), tokens of different regions (nW, N) (window g uses
    row g % nW) not seeing each other; with attention dropout's keep mask (G, H, N, N) as
    masked_softmax_attention takes it."""
    G, N = q.shape[0], q.shape[2]
    scale = (q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0) if scale is None else scale
    visible = torch.ones(G, 1, N, N, dtype=torch.bool, device=q.device)
    if regions is not None:
        r = regions.repeat(G // regions.shape[0], 1)
        visible = (r[:, :, None] == r[:, None, :]).unsqueeze(1)
    return masked_softmax_attention(q, k, v, visible, scale, bias=bias, keep=keep, dropout_p=dropout_p)


def lsh_attention_weights(qk, buckets, bucket_size, *, causal=False, key_padding_mask=None, scale=None, keep=None,
                          dropout_p=0.0):
    """The (B, H, T, T) attention weights of Reformer LSH attention (docs/methods.md §7) in float64
    from given buckets (B, H, rounds, T), written as dense masks without sorting any tensor: in
    round r, token i sees token j when both share a bucket, j's chunk (of its rank in the
    (bucket, position) order) is i's or the one before, j <= i when causal, and j is not padded;
    i's own score is −1e5; rounds are weighted by the softmax of their logsumexps. keep (B, H,
    rounds, T, T) bool: attention dropout's kept pairs per round (lsh.lsh_dropout_keep), the kept
    probabilities scaled by 1 / (1 − dropout_p)."""
    B, H, T, D = qk.shape
    scale = (D ** -0.5 if D > 0 else 1.0) if scale is None else scale
    q = qk.double()
    k = torch.nn.functional.normalize(q, dim=-1)
    probs, lses = [], []
    positions = torch.arange(T, device=qk.device)
    for r in range(buckets.shape[2]):
        b = buckets[:, :, r]  # (B, H, T)
        rank = (b * T + positions).argsort(-1).argsort(-1)
        chunk = rank // bucket_size
        d = chunk[..., :, None] - chunk[..., None, :]
        visible = (b[..., :, None] == b[..., None, :]) & ((d == 0) | (d == 1))
        if causal:
            visible = visible & (positions[None, :] <= positions[:, None])
        if key_padding_mask is not None:
            visible = visible & ~key_padding_mask[:, None, None, :]
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = torch.where(torch.eye(T, dtype=torch.bool, device=qk.device), torch.full_like(scores, SELF_SCORE),
                             scores).masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        round_probs = torch.where(visible.any(-1, keepdim=True), torch.softmax(scores, -1), torch.zeros_like(scores))
        if keep is not None:
            round_probs = round_probs * keep[:, :, r] / (1.0 - dropout_p)
        probs.append(round_probs)
        lses.append(lse)
    lse = torch.stack(lses)  # (rounds, B, H, T)
    finite_max = torch.where(torch.isfinite(lse.amax(0)), lse.amax(0), torch.zeros_like(lse[0]))
    e = torch.exp(lse - finite_max)
    total = e.sum(0)
    weights = e / torch.where(total == 0, torch.ones_like(total), total)
    return (weights.unsqueeze(-1) * torch.stack(probs)).sum(0)


def lsh_attention(qk, v, buckets, bucket_size, *, causal=False, key_padding_mask=None, scale=None):
    """Reformer LSH attention in float64: lsh_attention_weights @ v."""
    return lsh_attention_weights(qk, buckets, bucket_size, causal=causal, key_padding_mask=key_padding_mask,
                                 scale=scale) @ v.double()


def block_sparse_attention(q, k, v, layout, block_size, *, causal=False, key_padding_mask=None, scale=None):
    """docs/methods.md §6 in float64: softmax under the layout expanded to a dense mask."""
    scale = (q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0) if scale is None else scale
    visible = layout_mask(layout, block_size, q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask)
    return masked_softmax_attention(q, k, v, visible, scale)


def additive_attention(q, k, v, w, *, window=None, causal=False, key_padding_mask=None):
    """Bahdanau attention (docs/methods.md §9) in float64 from the full (T_q, T_k, D) tanh tensor:
    scores w_h · tanh(q_i + k_j) over the visible keys (window / causal with
    sliding_window_attention's meaning, bottom-right aligned; padding)."""
    q, k, v, w = q.double(), k.double(), v.double(), w.double()
    scores = torch.einsum("bhtsd,hd->bhts", torch.tanh(q[:, :, :, None] + k[:, :, None]), w)
    T, S = q.shape[2], k.shape[2]
    visible = window_mask(T, S, (-1, -1) if window is None else window, causal=causal, batch=q.shape[0],
                          key_padding_mask=key_padding_mask, device=q.device)
    # The scores enter as the bias of a masked softmax whose q·k term is zero.
    return masked_softmax_attention(q.new_zeros(q.shape[:-1] + (1,)), k.new_zeros(k.shape[:-1] + (1,)), v, visible,
                                    1.0, bias=scores)


def delta_rule(q, k, v, beta, *, gate=None, scale=None, initial_state=None, causal=True):
    """The delta rule (docs/methods.md §11) token by token in float64, written from the formula:
    S_t = (I − β_t k_t k_tᵀ) Diag(e^{g_t}) S_{t−1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t (causal), or
    scale · S_Tᵀ q_t for every t (non-causal); gate (B, H, T) one per token or (B, H, T, dk) one per
    key channel (KDA). q and k are used as given (no normalisation).
    (I − β k kᵀ) S is applied as S − β k (kᵀ S): the same product in O(dk · dv) per token instead of
    O(dk² · dv), which kept a GPU test's T=3000, dk=128 recurrence over a minute.
    Returns (out, S_T)."""
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    B, H, T, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    S = (initial_state.double().clone() if initial_state is not None
         else q.new_zeros(B, H, dk, v.shape[-1]))
    outs = []
    for t in range(T):
        kt = k[:, :, t, :, None]  # (B, H, dk, 1)
        bt = beta[:, :, t, None, None]
        if gate is not None:  # (B, H, 1, 1) per token, (B, H, dk, 1) per key channel
            fade = gate[:, :, t].double().exp()[..., None]
            S = (fade if gate.dim() == 4 else fade[..., None]) * S
        S = S - bt * kt * (kt.transpose(-1, -2) @ S) + bt * kt * v[:, :, t, None, :]
        outs.append(scale * (q[:, :, t, None, :] @ S).squeeze(-2))
    out = torch.stack(outs, 2) if T else v.new_zeros(B, H, 0, v.shape[-1]).double()
    if not causal:
        out = scale * q @ S
    return out, S
