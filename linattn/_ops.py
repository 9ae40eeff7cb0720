"""Which C++ operator a call runs, and the operators' state layout.

The schemas live in csrc/ops.cpp; the Meta kernels that fake tensors run are C++ too
(csrc/*/meta.cpp), so they apply the same argument checks as the real kernels, and so is
autograd (csrc/*/autograd.cpp, registered for the Autograd key: no call passes through Python).
The *_generic twins are the device-generic implementation that CUDA tensors run today, exposed
under their own names so tests can exercise it on CPU.
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


def linear_attn_fwd(device_type: str = "cpu"):
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
    if _use_fused or (device_type == "cuda" and _cuda_backend == "fused" and not _use_generic):
        return getattr(torch.ops.linattn, _FUSED_FORWARD).default
    return getattr(torch.ops.linattn, _FORWARD_NAMES[_use_generic]).default


def window_attn_fwd():
    return getattr(torch.ops.linattn, _WINDOW_FORWARD_NAMES[_use_generic]).default


def block_sparse_attn_fwd():
    return torch.ops.linattn.block_sparse_attn_fwd_generic.default if _use_generic else \
        torch.ops.linattn.block_sparse_attn_fwd.default
