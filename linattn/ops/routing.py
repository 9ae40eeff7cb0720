"""Which implementation an operator call runs: the CUDA backend users choose, and the switches the
tests use to run every engine's device-generic or fused path on CPU tensors."""
import contextlib
import os

_CUDA_BACKENDS = ("generic", "fused")
_use_generic = False
_use_fused = False  # tests: every device through the fused operators


def _checked_backend(name: str, where: str) -> str:
    if name not in _CUDA_BACKENDS:
        raise ValueError(f"{where} must be one of {_CUDA_BACKENDS}, got {name!r}")
    return name


_cuda_backend = _checked_backend(os.environ.get("LINATTN_CUDA_BACKEND", "generic"), "linattn: LINATTN_CUDA_BACKEND")


def set_cuda_backend(name: str) -> None:
    """Choose how CUDA tensors run linear attention (no decay, no packed sequences), restricted
    softmax (windows, layouts, Swin) and the delta rule's forward (bf16/fp16, key dims up to 128):
    "generic" (the default: batched ATen ops) or "fused" (linattn's fused CUDA kernels: linear
    attention's scans and tensor-core forward and backward, the flash engine, the delta rule's
    tensor-core forward; opt-in until they have run on hardware and beat the generic path).
    docs/guide/cuda.md says which path has been run on which GPU. Also set by the environment
    variable LINATTN_CUDA_BACKEND."""
    global _cuda_backend
    _cuda_backend = _checked_backend(name, "linattn.set_cuda_backend: name")


def cuda_backend() -> str:
    """The CUDA backend in use: "generic" or "fused" (see set_cuda_backend)."""
    return _cuda_backend


@contextlib.contextmanager
def generic_implementation(enabled: bool = True):
    """Route every engine's calls to its device-generic implementation (tests only)."""
    global _use_generic
    previous, _use_generic = _use_generic, enabled
    try:
        yield
    finally:
        _use_generic = previous


@contextlib.contextmanager
def fused_implementation(enabled: bool = True):
    """Route linear attention and restricted softmax to the fused operators on every device (tests
    only: on CPU tensors they emulate the CUDA kernels' thread blocks)."""
    global _use_fused
    previous, _use_fused = _use_fused, enabled
    try:
        yield
    finally:
        _use_fused = previous


def generic_in_use() -> bool:
    """Whether generic_implementation() routes calls to the device-generic path (tests)."""
    return _use_generic


def fused_in_use(device_type: str) -> bool:
    """Whether a linear-attention, restricted-softmax or delta-rule call on `device_type` runs the fused operators."""
    return _use_fused or (device_type == "cuda" and _cuda_backend == "fused" and not _use_generic)
