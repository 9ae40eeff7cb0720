"""Linear attention as an RNN (docs/methods.md §1, recurrent form): one decoding step at a time.

A causal linear attention layer carries a state (S, z), S (B, H, m, dv) and z (B, H, m); each
new token updates it and reads it in O(m·dv), whatever its position, so generation costs the
same per token at any context length. With a per-head decay γ (RetNet, Lightning) or per-token
log-gates g ≤ 0 (Mamba-2, simple GLA) the state fades first: S_i = f_i S_{i−1} + φ(k_i) v_iᵀ,
z_i = f_i z_{i−1} + φ(k_i), f_i = γ·e^{g_i}; with per-channel log-gates (GLA) f_i is a vector and
row c of S and z fades by its entry c.

One operator on every device (torch.ops.linattn.linear_attn_step: a fused CPU kernel, ATen ops
elsewhere), under autograd (gradients for q, k, v, the state, decay and gate) and inside
torch.compile(fullgraph=True).
"""
from typing import Callable, Optional, Tuple, Union

import torch

from . import ops
from . import _validation as check
from .feature_maps import FUSED_FEATURE_MAPS, PLAIN_FEATURE_MAPS, resolve_feature_map

State = Tuple[torch.Tensor, torch.Tensor]


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Optional[State] = None,
    *,
    feature_map: Union[str, Callable, None] = "elu",
    normalize: bool = True,
    eps: float = 1e-6,
    decay: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, State]:
    """One step of causal linear attention: the token (q, k, v) joins the state, then q reads it.

    Args:
        q, k: (B, H, D); v: (B, H, dv).
        state: (S, z) with S (B, H, m, dv) and z (B, H, m), as returned by a previous step or by
            `linear_attention(..., causal=True, output_final_state=True)`; None = empty.
        feature_map, normalize, eps: as in `linear_attention`.
        decay: (H,) per-head γ in (0, 1]: the state is multiplied by γ before the token joins.
        gate: (B, H) log-gate g <= 0 of this token: the state is multiplied by e^g; or (B, H, m),
            one per feature channel (GLA): row c of S and z is multiplied by e^{g_c}.

    Returns:
        (out (B, H, dv) in the input dtype, new state (S, z) in float32, or float64 for float64
        inputs). Running every token of a sequence through it gives what `linear_attention`
        with causal=True gives for the whole sequence (and, with decay or gate, docs/methods.md §1's
        decayed sums).
    """
    if (type(state) in (tuple, list) and len(state) == 2 and decay is None and gate is None and type(feature_map) is str
            and feature_map in PLAIN_FEATURE_MAPS and type(eps) is float and not torch.compiler.is_compiling()
            and not ops.generic_in_use()):
        # The common decoding call goes straight to the operator, whose C++ checks match the
        # ones below: only a call it refuses runs them.
        try:
            out, S, z = torch.ops.linattn.linear_attn_step(
                q, k, v, state[0], state[1], None, PLAIN_FEATURE_MAPS[feature_map], normalize, eps)
            return out, (S, z)
        except Exception:
            pass
    where = "linattn.linear_attention_step"
    for name, t, layout in (("q", q, "(B, H, D)"), ("k", k, "(B, H, D)"), ("v", v, "(B, H, dv)")):
        check.check_tensor(where, name, t, 3, layout)
    check.check_float_dtype(where, "q", q)
    check.check_same_device_dtype(where, ("q", "k", "v"), (q, k, v))
    if q.shape != k.shape or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"{where}: q and k must have the same shape (B, H, D) and v share (B, H), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    check.check_eps(where, eps)
    if feature_map == "identity" and normalize:
        raise ValueError(
            f"{where}: feature_map='identity' can be negative and make the normalizer vanish; "
            "use it with normalize=False, got normalize=True"
        )
    phi = resolve_feature_map(feature_map, where)
    acc = ops.accumulate_dtype(q.dtype)
    # The built-in maps are fused into the CPU step; a callable runs here.
    code = FUSED_FEATURE_MAPS.get(feature_map, 0) if isinstance(feature_map, str) or phi is None else None
    if code is None:
        phi_q, phi_k = phi(q.to(acc)), phi(k.to(acc))
        if phi_q.shape != phi_k.shape or phi_q.shape[:2] != q.shape[:2]:
            raise ValueError(f"{where}: feature_map must map (B, H, D) to (B, H, m) for q and k alike, "
                             f"got {tuple(phi_q.shape)} and {tuple(phi_k.shape)}")
    else:
        phi_q, phi_k = q, k
    batch, heads, m = phi_k.shape
    dv = v.shape[2]
    if state is None:
        S = v.new_zeros(batch, heads, m, dv, dtype=acc)
        z = v.new_zeros(batch, heads, m, dtype=acc)
    else:
        check.check_state(where, "state", state, phi_k.unsqueeze(2), v.unsqueeze(2))
        S, z = state[0].to(acc), state[1].to(acc)
    factor = _state_factor(where, decay, gate, batch, heads, m, v.device, acc)
    # The operator runs the CPU kernel or, on other devices, its ATen formulation (the _generic
    # twin: that formulation on CPU tensors too, for the tests). A callable's features are in the
    # accumulation dtype, and so must the values be then.
    step = torch.ops.linattn.linear_attn_step_generic if ops.generic_in_use() else torch.ops.linattn.linear_attn_step
    values = v if code is not None else v.to(acc)
    out, S, z = step(phi_q, phi_k, values, S, z, factor, 0 if code is None else code, normalize, float(eps))
    return out.to(q.dtype), (S, z)


def _state_factor(where, decay, gate, batch, heads, feature_dim, device, acc) -> Optional[torch.Tensor]:
    """The state's multiplier γ·e^g: (B, H), or (B, H, m) for a per-channel gate; None when neither is given."""
    factor = None
    if decay is not None:
        check.check_fade(where, "decay", decay, (heads,), "(H,)", device)
        factor = decay.to(acc).unsqueeze(0).expand(batch, heads)
    if gate is not None:
        if gate.dim() == 3:
            check.check_fade(where, "gate", gate, (batch, heads, feature_dim), "(B, H, m), m the feature dim", device)
            if factor is not None:
                factor = factor.unsqueeze(-1)
        else:
            check.check_fade(where, "gate", gate, (batch, heads), "(B, H) or (B, H, m)", device)
        gate_factor = gate.to(acc).exp()
        factor = gate_factor if factor is None else factor * gate_factor
    return factor
