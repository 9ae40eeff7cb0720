"""Fake (meta) kernels and autograd for the C++ operators of linattn.

The schemas live in csrc/ops.cpp. Everything here is registered once, at import, for both
the main operators and their *_generic twins (the device-generic implementation that CUDA
tensors run today, exposed under its own name so tests can exercise it on CPU).
"""
import contextlib

import torch

_FORWARD_NAMES = {False: "linear_attn_fwd", True: "linear_attn_fwd_generic"}
_BACKWARD_NAMES = {False: "linear_attn_bwd", True: "linear_attn_bwd_generic"}
_use_generic = False


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


def linear_attn_fwd():
    return getattr(torch.ops.linattn, _FORWARD_NAMES[_use_generic]).default


def _register(generic: bool) -> None:
    forward_name = f"linattn::{_FORWARD_NAMES[generic]}"
    backward_op = getattr(torch.ops.linattn, _BACKWARD_NAMES[generic]).default

    @torch.library.register_fake(forward_name)
    def _forward_fake(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps):
        batch, heads, q_len, features = q.shape
        value_dim = v.shape[3]
        acc = accumulate_dtype(q.dtype)
        return (
            q.new_empty((batch, heads, q_len, value_dim)),
            q.new_empty((batch, heads, features, value_dim + 1), dtype=acc),
            q.new_empty((batch, heads, q_len), dtype=acc),
        )

    @torch.library.register_fake(f"linattn::{_BACKWARD_NAMES[generic]}")
    def _backward_fake(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state, key_padding_mask,
                       feature_map, causal, normalize):
        batch, heads, _, features = q.shape
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, features, v.shape[3] + 1), dtype=accumulate_dtype(q.dtype)),
        )

    def setup_context(ctx, inputs, output):
        q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, _eps = inputs
        out, _final_state, normalizer = output
        ctx.save_for_backward(q, k, v, out, normalizer, initial_state, key_padding_mask)
        ctx.feature_map = feature_map
        ctx.causal = causal
        ctx.normalize = normalize
        ctx.mark_non_differentiable(normalizer)

    def backward(ctx, grad_out, grad_final_state, _grad_normalizer):
        q, k, v, out, normalizer, initial_state, key_padding_mask = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_initial = backward_op(
            grad_out, grad_final_state, q, k, v, out, normalizer, initial_state, key_padding_mask,
            ctx.feature_map, ctx.causal, ctx.normalize,
        )
        grad_initial = grad_initial if initial_state is not None else None
        return grad_q, grad_k, grad_v, grad_initial, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


_register(generic=False)
_register(generic=True)
