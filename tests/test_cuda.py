"""CUDA tensors through both CUDA backends (the device-generic implementation, the default, and
the fused kernels, linattn.set_cuda_backend("fused")); checked against the reference on a GPU
machine, skipped elsewhere. tests/test_fused_kernels.py has the fused kernels' own tests."""
import pytest
import torch

import linattn
from linattn import reference
from conftest import TOLERANCE, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["generic", "fused"])
def cuda_backend(request):
    previous = linattn.cuda_backend()
    linattn.set_cuda_backend(request.param)
    yield request.param
    linattn.set_cuda_backend(previous)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 65, 1000])
def test_cuda_matches_reference(cuda_backend, causal, dtype, T):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 64, generator=g).to(dtype).cuda().requires_grad_() for _ in range(3))
    out = linattn.linear_attention(q, k, v, causal=causal)
    ref, _ = reference.linear_attention(q, k, v, causal=causal)
    assert out.device.type == "cuda"
    assert_close(out, ref, TOLERANCE[dtype], "out")
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, TOLERANCE[dtype], "grad")
