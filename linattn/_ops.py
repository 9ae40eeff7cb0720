"""Autograd for the C++ operators of linattn.

The schemas live in csrc/ops.cpp; the Meta kernels that fake tensors run are C++ too
(csrc/linear_attention/meta.cpp), so they apply the same argument checks as the real kernels.
Everything here is registered once, at import, for both the main operators and their
*_generic twins (the device-generic implementation that CUDA tensors run today, exposed under
its own name so tests can exercise it on CPU).
"""
import contextlib
import os

import torch

_FORWARD_NAMES = {False: "linear_attn_fwd", True: "linear_attn_fwd_generic"}
_BACKWARD_NAMES = {False: "linear_attn_bwd", True: "linear_attn_bwd_generic"}
# The fused kernels of the CUDA backend (csrc/linear_attention/fused_scan.h); on CPU tensors the
# same operators run an emulation of their thread blocks.
_FUSED_FORWARD, _FUSED_BACKWARD = "linear_attn_fwd_fused", "linear_attn_bwd_fused"
_CUDA_BACKENDS = ("generic", "fused")
_WINDOW_FORWARD_NAMES = {False: "sliding_window_attn_fwd", True: "sliding_window_attn_fwd_generic"}
_WINDOW_BACKWARD_NAMES = {False: "sliding_window_attn_bwd", True: "sliding_window_attn_bwd_generic"}
_use_generic = False
_use_fused = False  # tests: every device through the fused operators


def _checked_backend(name: str, where: str) -> str:
    if name not in _CUDA_BACKENDS:
        raise ValueError(f"{where} must be one of {_CUDA_BACKENDS}, got {name!r}")
    return name


_cuda_backend = _checked_backend(os.environ.get("LINATTN_CUDA_BACKEND", "generic"), "linattn: LINATTN_CUDA_BACKEND")


def set_cuda_backend(name: str) -> None:
    """Choose how CUDA tensors run linear attention (no decay, no packed sequences):
    "generic" (the default: batched ATen ops) or "fused" (linattn's fused CUDA kernels; opt-in
    until they have passed the test suite on real hardware). The README says which path has been
    run on which GPU. Also set by the environment variable LINATTN_CUDA_BACKEND."""
    global _cuda_backend
    _cuda_backend = _checked_backend(name, "linattn.set_cuda_backend: name")


def cuda_backend() -> str:
    """The CUDA backend in use: "generic" or "fused" (see set_cuda_backend)."""
    return _cuda_backend


def augmented_state(state, dtype: torch.dtype) -> torch.Tensor:
    """(S (…, m, dv), z (…, m)) -> [S | z] (…, m, dv + 1) in dtype: the operators' state layout."""
    return torch.cat([state[0].to(dtype), state[1].to(dtype).unsqueeze(-1)], dim=-1)


def split_state(augmented: torch.Tensor):
    """[S | z] (…, m, dv + 1) -> (S, z), as views."""
    return augmented[..., :-1], augmented[..., -1]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and normalizers are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def generic_implementation(enabled: bool = True):
    """Route linattn.linear_attention to the device-generic implementation (tests only)."""
    global _use_generic
    previous, _use_generic = _use_generic, enabled
    try:
        yield
    finally:
        _use_generic = previous


@contextlib.contextmanager
def fused_implementation(enabled: bool = True):
    """Route linattn.linear_attention to the fused operators on every device (tests only: on
    CPU tensors they emulate the CUDA kernels' thread blocks)."""
    global _use_fused
    previous, _use_fused = _use_fused, enabled
    try:
        yield
    finally:
        _use_fused = previous


def generic_in_use() -> bool:
    """Whether generic_implementation() routes calls to the device-generic path (tests)."""
    return _use_generic


def linear_attn_fwd(device_type: str = "cpu"):
    if torch.onnx.is_in_onnx_export():
        if not torch.compiler.is_exporting():
            # The legacy exporter traces with TorchScript, which records the op itself rather than
            # the ATen ops it decomposes into, and has no ONNX translation for it.
            raise RuntimeError(
                "linattn: the legacy TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) cannot "
                "translate linattn's operators; export with torch.onnx.export(..., dynamo=True), the default "
                "since torch 2.9"
            )
        # The dynamo exporter translates standard ATen ops: this twin decomposes into them.
        return torch.ops.linattn.linear_attn_fwd_decomposed.default
    if _use_fused or (device_type == "cuda" and _cuda_backend == "fused" and not _use_generic):
        return getattr(torch.ops.linattn, _FUSED_FORWARD).default
    return getattr(torch.ops.linattn, _FORWARD_NAMES[_use_generic]).default


def window_attn_fwd():
    return getattr(torch.ops.linattn, _WINDOW_FORWARD_NAMES[_use_generic]).default


def block_sparse_attn_fwd():
    return torch.ops.linattn.block_sparse_attn_fwd_generic.default if _use_generic else \
        torch.ops.linattn.block_sparse_attn_fwd.default


def _register(forward: str, backward_name: str) -> None:
    forward_name = f"linattn::{forward}"
    backward_op = getattr(torch.ops.linattn, backward_name).default

    def setup_context(ctx, inputs, output):
        q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, _eps = inputs
        out, final_state, normalizer = output
        # Without causality every query saw the final state: the backward reuses it instead of
        # recomputing it from the keys (one GEMM pass and one feature-map pass fewer).
        seen_state = None if causal else final_state
        ctx.save_for_backward(q, k, v, out, normalizer, initial_state, key_padding_mask, seen_state)
        ctx.feature_map = feature_map
        ctx.causal = causal
        ctx.normalize = normalize
        ctx.mark_non_differentiable(normalizer)

    def backward(ctx, grad_out, grad_final_state, _grad_normalizer):
        q, k, v, out, normalizer, initial_state, key_padding_mask, seen_state = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_initial = backward_op(
            grad_out, grad_final_state, q, k, v, out, normalizer, initial_state, key_padding_mask,
            ctx.feature_map, ctx.causal, ctx.normalize, seen_state,
        )
        grad_initial = grad_initial if initial_state is not None else None
        return grad_q, grad_k, grad_v, grad_initial, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
    # The backward operator has no derivative of its own: a second derivative through it
    # (create_graph=True, then differentiating the gradients) raises instead of returning zeros.
    torch.library.register_autograd(
        f"linattn::{backward_name}", _no_double_backward, setup_context=_no_context
    )


def _no_context(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "linattn: second derivatives (double backward) are not implemented; the "
        "first-order gradient is exact. Differentiate it once (create_graph=False), or use "
        "method='softmax' / torch's attention where higher-order gradients are needed"
    )


def _register_window(generic: bool) -> None:
    forward_name = f"linattn::{_WINDOW_FORWARD_NAMES[generic]}"
    backward_name = f"linattn::{_WINDOW_BACKWARD_NAMES[generic]}"
    backward_op = getattr(torch.ops.linattn, _WINDOW_BACKWARD_NAMES[generic]).default

    def setup_context(ctx, inputs, output):
        q, k, v, left, right, dilation, global_mask, key_padding_mask, scale, segment_ids = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, global_mask, key_padding_mask, segment_ids)
        ctx.options = (left, right, dilation, scale)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, global_mask, key_padding_mask, segment_ids = ctx.saved_tensors
        left, right, dilation, scale = ctx.options
        grad_q, grad_k, grad_v = backward_op(
            grad_out.contiguous(), q, k, v, out, lse, left, right, dilation, global_mask, key_padding_mask, scale,
            segment_ids,
        )
        return grad_q, grad_k, grad_v, None, None, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_name, _no_double_backward, setup_context=_no_context)


def _register_block_sparse(generic: bool) -> None:
    suffix = "_generic" if generic else ""
    backward_op = getattr(torch.ops.linattn, f"block_sparse_attn_bwd{suffix}").default

    def setup_context(ctx, inputs, output):
        q, k, v, layout, block_size, causal, key_padding_mask, scale, bias, q_segments, k_segments, positions = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, layout, key_padding_mask, bias, q_segments, k_segments, positions)
        ctx.options = (block_size, causal, scale)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, layout, key_padding_mask, bias, q_segments, k_segments, positions = ctx.saved_tensors
        block_size, causal, scale = ctx.options
        if grad_out is None:  # only lse was used
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v, grad_bias = backward_op(
            grad_out.contiguous(), None if grad_lse is None else grad_lse.contiguous(), q, k, v, out, lse, layout,
            block_size, causal, key_padding_mask, scale, bias, q_segments, k_segments, positions,
        )
        return (grad_q, grad_k, grad_v, None, None, None, None, None,
                grad_bias if bias is not None else None, None, None, None)

    torch.library.register_autograd(f"linattn::block_sparse_attn_fwd{suffix}", backward, setup_context=setup_context)
    torch.library.register_autograd(f"linattn::block_sparse_attn_bwd{suffix}", _no_double_backward,
                                    setup_context=_no_context)


def _register_decayed() -> None:
    backward_op = torch.ops.linattn.decayed_linear_attn_bwd.default

    def setup_context(ctx, inputs, output):
        q, k, v, log_decay, initial_state, key_padding_mask, feature_map, normalize, _eps = inputs
        out, _final_state, normalizer = output
        ctx.save_for_backward(q, k, v, log_decay, out, normalizer, initial_state, key_padding_mask)
        ctx.options = (feature_map, normalize)
        ctx.mark_non_differentiable(normalizer)

    def backward(ctx, grad_out, grad_final_state, _grad_normalizer):
        q, k, v, log_decay, out, normalizer, initial_state, key_padding_mask = ctx.saved_tensors
        feature_map, normalize = ctx.options
        if grad_out is None:  # only the final state was used
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v, grad_initial, grad_cumulative = backward_op(
            grad_out, grad_final_state, q, k, v, log_decay, out, normalizer, initial_state, key_padding_mask,
            feature_map, normalize,
        )
        # c = cumsum(log_decay): dL/dlog_decay_t = Σ_{i >= t} dL/dc_i
        grad_log_decay = grad_cumulative.flip(-1).cumsum(-1).flip(-1)
        grad_initial = grad_initial if initial_state is not None else None
        return grad_q, grad_k, grad_v, grad_log_decay, grad_initial, None, None, None, None

    torch.library.register_autograd("linattn::decayed_linear_attn_fwd", backward, setup_context=setup_context)
    torch.library.register_autograd("linattn::decayed_linear_attn_bwd", _no_double_backward, setup_context=_no_context)


def _feature_and_slope(x: torch.Tensor, code: int):
    """φ(x) and φ'(x) of a fused feature map (0 identity, 1 elu+1, 2 relu)."""
    if code == 1:
        negative = torch.exp(torch.clamp(x, max=0.0))
        return torch.where(x > 0, x + 1, negative), torch.where(x > 0, torch.ones_like(x), negative)
    if code == 2:
        positive = x > 0
        return x * positive, positive.to(x.dtype)
    return x, torch.ones_like(x)


def _register_step() -> None:
    """linear_attn_step's backward, in ATen ops (the step is O(m·dv), and so is its gradient):
    out = num/den with num = φ(q)ᵀS', den = φ(q)·z' + eps, S' = f·S + φ(k)vᵀ, z' = f·z + φ(k)."""

    def setup_context(ctx, inputs, output):
        q, k, v, S, z, factor, feature_map, normalize, eps = inputs
        _out, S_new, z_new = output
        ctx.save_for_backward(q, k, v, S, z, factor, S_new, z_new)
        ctx.options = (feature_map, normalize, eps)

    def backward(ctx, grad_out, grad_S_new, grad_z_new):
        q, k, v, S, z, factor, S_new, z_new = ctx.saved_tensors
        feature_map, normalize, eps = ctx.options
        acc = S.dtype
        phi_q, slope_q = _feature_and_slope(q.to(acc), feature_map)
        phi_k, slope_k = _feature_and_slope(k.to(acc), feature_map)
        values = v.to(acc)
        grad_S = torch.zeros_like(S_new) if grad_S_new is None else grad_S_new
        grad_z = torch.zeros_like(z_new) if grad_z_new is None else grad_z_new
        grad_phi_q = torch.zeros_like(phi_q)
        if grad_out is not None:
            grad_num, grad_den = grad_out.to(acc), None
            if normalize:
                numerator = torch.einsum("bhm,bhmd->bhd", phi_q, S_new)
                den = (phi_q * z_new).sum(-1, keepdim=True) + eps
                vanished = den.abs() < torch.finfo(acc).tiny  # such rows are 0: no gradient
                safe = torch.where(vanished, 1, den)
                grad_den = torch.where(vanished, 0, -(grad_num * numerator).sum(-1, keepdim=True) / safe**2)
                grad_num = torch.where(vanished, 0, grad_num / safe)
            grad_S = grad_S + phi_q.unsqueeze(-1) * grad_num.unsqueeze(-2)
            grad_phi_q = torch.einsum("bhmd,bhd->bhm", S_new, grad_num)
            if grad_den is not None:
                grad_z = grad_z + phi_q * grad_den
                grad_phi_q = grad_phi_q + z_new * grad_den
        grad_phi_k = torch.einsum("bhmd,bhd->bhm", grad_S, values) + grad_z
        grad_v = torch.einsum("bhmd,bhm->bhd", grad_S, phi_k)
        grad_factor = None
        if factor is not None:
            grad_factor = (grad_S * S).sum((-1, -2)) + (grad_z * z).sum(-1)
            grad_S, grad_z = grad_S * factor[..., None, None], grad_z * factor[..., None]
        return ((grad_phi_q * slope_q).to(q.dtype), (grad_phi_k * slope_k).to(k.dtype), grad_v.to(v.dtype),
                grad_S, grad_z, grad_factor, None, None, None)

    torch.library.register_autograd("linattn::linear_attn_step", backward, setup_context=setup_context)


def _register_varlen() -> None:
    backward_op = torch.ops.linattn.linear_attn_varlen_bwd.default

    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, log_decay, initial_state, feature_map, causal, normalize, _eps = inputs
        out, final_state, normalizer = output
        seen_state = None if causal else final_state  # as in _register: the backward reuses it
        ctx.save_for_backward(q, k, v, cu_seqlens, log_decay, out, normalizer, initial_state, seen_state)
        ctx.options = (feature_map, causal, normalize)
        ctx.mark_non_differentiable(normalizer)

    def backward(ctx, grad_out, grad_final_state, _grad_normalizer):
        from .varlen import segment_reverse_cumsum

        q, k, v, cu_seqlens, log_decay, out, normalizer, initial_state, seen_state = ctx.saved_tensors
        feature_map, causal, normalize = ctx.options
        if grad_out is None:  # only the final states were used
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v, grad_initial, grad_cumulative = backward_op(
            grad_out, grad_final_state, q, k, v, cu_seqlens, log_decay, out, normalizer, initial_state,
            feature_map, causal, normalize, seen_state,
        )
        # c restarts with every sequence: dL/dlog_decay_t = Σ_{i >= t in t's sequence} dL/dc_i
        grad_log_decay = None if log_decay is None else segment_reverse_cumsum(grad_cumulative, cu_seqlens)
        grad_initial = grad_initial if initial_state is not None else None
        return grad_q, grad_k, grad_v, None, grad_log_decay, grad_initial, None, None, None, None

    torch.library.register_autograd("linattn::linear_attn_varlen_fwd", backward, setup_context=setup_context)
    torch.library.register_autograd("linattn::linear_attn_varlen_bwd", _no_double_backward,
                                    setup_context=_no_context)


for _generic in (False, True):
    _register(_FORWARD_NAMES[_generic], _BACKWARD_NAMES[_generic])
_register(_FUSED_FORWARD, _FUSED_BACKWARD)
_register_decayed()
_register_step()
_register_varlen()
_register_window(generic=False)
_register_window(generic=True)
_register_block_sparse(generic=False)
_register_block_sparse(generic=True)
