import contextlib

import pytest
import torch

import linattn
from linattn import ops

# Relative-norm tolerances against the float64 reference (docs/methods.md).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


# The implementations of linear attention: the CPU kernel, the device-generic ATen path (what
# CUDA tensors run by default) and the fused CUDA kernels' block program (on CPU tensors, an
# emulation of their thread blocks; linattn.set_cuda_backend("fused") on a GPU).
LINEAR_IMPLEMENTATIONS = ("cpu_kernel", "generic", "fused")


@contextlib.contextmanager
def use_implementation(name):
    with ops.generic_implementation(name == "generic"), ops.fused_implementation(name == "fused"):
        yield


@pytest.fixture(params=["cpu_kernel", "generic"])
def implementation(request):
    """Runs a test once through the fused CPU kernel and once through the device-generic
    ATen implementation that CUDA tensors execute."""
    with use_implementation(request.param):
        yield request.param


@pytest.fixture(params=LINEAR_IMPLEMENTATIONS)
def linear_implementation(request):
    """As `implementation`, plus the fused CUDA kernels' block program (linear attention)."""
    with use_implementation(request.param):
        yield request.param


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, where ‖expected‖ is at least 1e-2 per element in RMS.

    The floor matters where the exact result is ~0 through cancellation (the gradient of a
    normalized output with respect to q when there is a single key is O(eps), say): there any
    finite-precision result is all rounding, and only an absolute bound means anything."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    scale = max(expected.norm().item(), 1e-2 * expected.numel() ** 0.5)
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, tol, what=""):
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
