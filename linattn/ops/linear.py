"""The Python side of the linear-attention operators (csrc/linear_attention/, docs/methods.md §1):
the state layout they take and return, and which forward operator a call runs. Their schemas
are in csrc/ops.cpp; checks, kernels, fake kernels and autograd are C++."""
import torch

from . import routing


def augmented_state(state, dtype: torch.dtype) -> torch.Tensor:
    """(S (…, m, dv), z (…, m)) -> [S | z] (…, m, dv + 1) in dtype: the operators' state layout."""
    return torch.cat([state[0].to(dtype), state[1].to(dtype).unsqueeze(-1)], dim=-1)


def split_state(augmented: torch.Tensor):
    """[S | z] (…, m, dv + 1) -> (S, z), as views."""
    return augmented[..., :-1], augmented[..., -1]


def returned_state(final_state: torch.Tensor, causal: bool):
    """The (S, z) a call hands back from the operator's final [S | z]. Without causality autograd
    saved that state for the backward (every query saw it): the caller gets a copy, so that
    changing it in place (fading a state between calls) cannot invalidate that backward
    (m·(dv + 1) numbers per head)."""
    return split_state(final_state if causal else final_state.clone())


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and normalizers are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _onnx_export_flags():
    """A function telling whether an ONNX export is running: torch.onnx.is_in_onnx_export reads
    two module flags but imports two modules on every call (a microsecond per operator call)."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # another torch's layout: its public function
        return torch.onnx.is_in_onnx_export
    # Under torch.compile the public function stays: dynamo folds it to a constant.
    return lambda: (torch.onnx.is_in_onnx_export() if torch.compiler.is_compiling()
                    else GLOBALS.in_onnx_export or _flags._is_onnx_exporting)


_in_onnx_export = _onnx_export_flags()


def forward_op(device_type: str = "cpu", extended: bool = False):
    """The forward operator a call on `device_type` runs (routing.py; ONNX export: the decomposed twin).
    extended: the call has a fading state or packed sequences, which the decomposed twin does not
    run; the fused operator runs them on tensor cores where it can and hands the rest to
    linear_attn_fwd."""
    if extended:
        if routing.fused_in_use(device_type) and not routing.generic_in_use():
            return torch.ops.linattn.linear_attn_fwd_fused.default
        return (torch.ops.linattn.linear_attn_fwd_generic if routing.generic_in_use()
                else torch.ops.linattn.linear_attn_fwd).default
    if _in_onnx_export():
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
    if routing.fused_in_use(device_type):
        return torch.ops.linattn.linear_attn_fwd_fused.default
    if routing.generic_in_use():
        return torch.ops.linattn.linear_attn_fwd_generic.default
    return torch.ops.linattn.linear_attn_fwd.default
