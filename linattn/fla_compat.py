"""flash-linear-attention's functional interface for the delta-rule family and the linear-attention
family (``linattn/fla_linear.py``: GLA, simple GLA, linear_attn, retention, lightning attention;
``linattn/fla_rwkv6.py``: RWKV-6; ``linattn/fla_based.py``: Based; ``linattn/fla_attn.py``: softmax
attention and the Forgetting Transformer's) on
linattn's operators, so that code written against ``fla.ops`` runs unchanged on CPUs and on any GPU,
with ``torch.compile(fullgraph=True)`` and packed sequences in any batch:

    from linattn.fla_compat import chunk_gated_delta_rule, chunk_kda, chunk_retention

DeltaNet (``chunk_delta_rule``), Gated DeltaNet (``chunk_gated_delta_rule``) and Kimi Delta
Attention (``chunk_kda``), each with its ``fused_recurrent_*`` form, and Gated DeltaProduct
(``chunk_gated_delta_product``: several delta steps a token). Same layouts: q and k
(B, T, H, K), v (B, T, HV, V), β (B, T, HV), g (B, T, HV) or for KDA (B, T, HV, K); grouped value
attention (GVA) where HV is a multiple of H, q/k head h serving value heads h·HV/H … (h+1)·HV/H − 1
(repeated for the operator: a copy of q and k); packed sequences as (1, total, ·) with
``cu_seqlens``; states (N, HV, K, V) in float32; scale K^−½ by default; ``use_qk_l2norm_in_kernel``;
KDA's gate activation (``use_gate_in_kernel`` with ``A_log`` and ``dt_bias``, or ``lower_bound``),
``use_beta_sigmoid_in_kernel`` and ``allow_neg_eigval``. The ``fused_recurrent_*`` forms compute
the same recurrence (the chunked operator is exact, not an approximation of it); one token without
packing runs ``delta_rule_step``. Outputs are contiguous (B, T, HV, V) in q's dtype. Options that
change nothing here (``chunk_size``, ``cu_seqlens_cpu``, ``disable_recompute``, ``safe_gate`` with
gates already computed) are accepted; ones linattn does not implement raise, naming the option
(``return_intermediate_states``, ``state_v_first`` for the delta rule, ``cp_context``,
``use_graph``, ``head_first``, ``gv``).

docs/guide/functional.md says more; ``linattn.hf.use_fla_compat`` routes transformers' Qwen3-Next
and Kimi Linear layers here."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .delta_rule import delta_rule_attention, delta_rule_step
from .fla_linear import (  # noqa: F401 (re-exported: the linear-attention family)
    chunk_gla, chunk_lightning_attn, chunk_linear_attn, chunk_retention, chunk_simple_gla, fused_chunk_linear_attn,
    fused_chunk_retention, fused_recurrent_gla, fused_recurrent_lightning_attn, fused_recurrent_linear_attn,
    fused_recurrent_retention, fused_recurrent_simple_gla, int32_offsets, parallel_retention, refuse_others)
from .fla_based import fused_chunk_based, parallel_based  # noqa: F401 (re-exported)
from .fla_rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6  # noqa: F401 (re-exported)
from .fla_attn import parallel_attn, parallel_forgetting_attn  # noqa: F401 (re-exported)

def _delta_rule(where: str, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                cu_seqlens, per_channel: bool, recurrent: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{where}: q and k must be (B, T, H, K) and v (B, T, HV, V) with the same B and T, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    HV = v.shape[2]
    if HV % H != 0:
        raise ValueError(f"{where}: v's heads must be a multiple of q and k's (grouped value attention), got {HV} "
                         f"and {H}")
    if beta.shape != (B, T, HV):
        raise ValueError(f"{where}: beta must be (B, T, HV) = {(B, T, HV)}, got {tuple(beta.shape)}")
    if g is not None:
        wanted = (B, T, HV, K) if per_channel else (B, T, HV)
        if g.shape != wanted:
            raise ValueError(f"{where}: g must be {'(B, T, HV, K)' if per_channel else '(B, T, HV)'} = {wanted}, "
                             f"got {tuple(g.shape)}")
    if HV != H:
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))
    heads_first = [x.transpose(1, 2) for x in (q, k, v, beta)]  # (B, HV, T, ·) views
    gate = None if g is None else g.transpose(1, 2)
    if recurrent and T == 1 and cu_seqlens is None:
        one = [x.select(2, 0) for x in heads_first]
        out, state = delta_rule_step(*one, initial_state, gate=None if gate is None else gate.select(2, 0),
                                     scale=scale, normalize_qk=use_qk_l2norm_in_kernel)
        out = out.unsqueeze(1)
    else:
        out, state = delta_rule_attention(*heads_first, gate=gate, scale=scale, initial_state=initial_state,
                                          output_final_state=True, cu_seqlens=int32_offsets(where, B, cu_seqlens),
                                          normalize_qk=use_qk_l2norm_in_kernel)
        out = out.transpose(1, 2)
    return out.contiguous(), state if output_final_state else None


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, **options):
    """DeltaNet: S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t."""
    refuse_others("chunk_delta_rule", options)
    return _delta_rule("chunk_delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state,
                       use_qk_l2norm_in_kernel, cu_seqlens, per_channel=False, recurrent=False)


def fused_recurrent_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, **options):
    refuse_others("fused_recurrent_delta_rule", options)
    return _delta_rule("fused_recurrent_delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state,
                       use_qk_l2norm_in_kernel, cu_seqlens, per_channel=False, recurrent=True)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, **options):
    """Gated DeltaNet: the state faded by e^{g_t} (g <= 0, one per token and value head) before
    each delta update."""
    refuse_others("chunk_gated_delta_rule", options)
    return _delta_rule("chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state,
                       use_qk_l2norm_in_kernel, cu_seqlens, per_channel=False, recurrent=False)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, **options):
    refuse_others("fused_recurrent_gated_delta_rule", options)
    return _delta_rule("fused_recurrent_gated_delta_rule", q, k, v, g, beta, scale, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, per_channel=False, recurrent=True)


def chunk_gated_delta_product(q, k, v, g, beta, num_householder, scale=None, initial_state=None,
                              output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None, **options):
    """Gated DeltaProduct (Siems et al. 2025): n = num_householder delta steps a token, k, v and β
    (B, T·n, ·) with token t's steps at rows t·n … t·n + n − 1, q and g (B, T, ·): the state fades
    by e^{g_t} once before token t's steps and is read (scale · S_tᵀ q_t) after its last. Run as the
    delta rule over the T·n steps, q zero but at each token's last step and g zero but at its first
    (l2-normalising a zero row keeps it zero), the outputs taken at the last steps; g may be None."""
    where = "chunk_gated_delta_product"
    refuse_others(where, options)
    n = num_householder
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{where}: num_householder must be a positive int, got {n!r}")
    if q.dim() != 4:
        raise ValueError(f"{where}: q must be (B, T, H, K), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != (B, T * n, H, K):
        raise ValueError(f"{where}: k must be (B, T·num_householder, H, K) = {(B, T * n, H, K)}, got {tuple(k.shape)}")
    if g is not None and g.shape != (B, T, H):
        raise ValueError(f"{where}: g must be (B, T, H) = {(B, T, H)}, got {tuple(g.shape)}")
    steps = torch.cat([q.new_zeros(B, T, n - 1, H, K), q.unsqueeze(2)], 2).reshape(B, T * n, H, K)
    gates = None if g is None else torch.cat([g.unsqueeze(2), g.new_zeros(B, T, n - 1, H)], 2).reshape(B, T * n, H)
    out, state = _delta_rule(where, steps, k, v, gates, beta, scale, initial_state, output_final_state,
                             use_qk_l2norm_in_kernel, None if cu_seqlens is None else cu_seqlens * n,
                             per_channel=False, recurrent=False)
    return out[:, n - 1::n].contiguous(), state


def kda_gate(g, A_log=None, dt_bias=None, lower_bound=None):
    """KDA's gate activation on raw gates g (…, HV, K), in float32: −e^{A_log} · softplus(g + dt_bias),
    or with a lower bound b, b · sigmoid(e^{A_log} (g + dt_bias)) (b · sigmoid(g + dt_bias) without
    A_log) — flash-linear-attention's use_gate_in_kernel forms."""
    HV = g.shape[-2]
    x = g.float()
    if dt_bias is not None:
        x = x + dt_bias.float().view(HV, -1)
    if lower_bound is None:
        if A_log is None:
            raise ValueError("chunk_kda: use_gate_in_kernel without lower_bound needs A_log (HV,)")
        return -A_log.float().view(HV, 1).exp() * F.softplus(x)
    if A_log is not None:
        x = A_log.float().view(HV, 1).exp() * x
    return lower_bound * torch.sigmoid(x)


def _kda(where, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
         use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, safe_gate, lower_bound, cu_seqlens,
         options, recurrent):
    A_log, dt_bias = options.pop("A_log", None), options.pop("dt_bias", None)
    refuse_others(where, options)
    if use_gate_in_kernel:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    elif A_log is not None or dt_bias is not None:
        raise ValueError(f"{where}: A_log and dt_bias are used with use_gate_in_kernel=True only")
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta.float()) * (2.0 if allow_neg_eigval else 1.0)
    del safe_gate  # (a speed hint for gates already bounded: the operator takes any gate <= 0)
    return _delta_rule(where, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                       cu_seqlens, per_channel=True, recurrent=recurrent)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
              allow_neg_eigval=False, safe_gate=False, lower_bound=None, cu_seqlens=None, **options):
    """Kimi Delta Attention: Gated DeltaNet with a log-gate per key channel, g (B, T, HV, K):
    row c of the state fades by e^{g_tc} before each delta update."""
    return _kda("chunk_kda", q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, safe_gate, lower_bound, cu_seqlens,
                options, recurrent=False)


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                        allow_neg_eigval=False, safe_gate=False, lower_bound=None, cu_seqlens=None, **options):
    return _kda("fused_recurrent_kda", q, k, v, g, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, safe_gate,
                lower_bound, cu_seqlens, options, recurrent=True)
