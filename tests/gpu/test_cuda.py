"""CUDA tensors through both CUDA backends (the device-generic implementation, the default, and
the fused kernels, linattn.set_cuda_backend("fused")); checked against the reference on a GPU
machine, skipped elsewhere. tests/test_fused_kernels.py has the fused kernels' own tests."""
import copy

import pytest
import torch
from torch import nn

import linattn
from linattn import reference
from conftest import CAUSAL, METHOD_OPTIONS, TOLERANCE, assert_close, build_module as _build

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
        # (the loss squares the output: its gradients carry the output's rounding twice)
        assert_close(a, b, 4 * TOLERANCE[dtype], "grad")


@pytest.mark.parametrize("name", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("causal", [False, True])
def test_every_module_method_on_cuda_matches_cpu(cuda_backend, name, causal):
    """linattn.nn.MultiheadAttention on CUDA tensors = the same module on CPU tensors (forward and
    the parameters' gradients), for every method, masked keys included."""
    if causal and name.split("-")[0] not in CAUSAL:
        pytest.skip(f"{name} has no causal form")
    torch.manual_seed(0)
    cpu_module = _build(name).double()
    cuda_module = copy.deepcopy(cpu_module).cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 24, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 33:] = True
    options = dict(key_padding_mask=None if causal else mask, need_weights=False, is_causal=causal,
                   attn_mask=nn.Transformer.generate_square_subsequent_mask(40, dtype=torch.float64) if causal else None)
    results = []
    for module, device in ((cpu_module, "cpu"), (cuda_module, "cuda")):
        xd = x.to(device)
        opts = {key: (val.to(device) if torch.is_tensor(val) else val) for key, val in options.items()}
        out, _ = module(xd, xd, xd, **opts)
        grads = torch.autograd.grad(out.square().sum(), [p for p in module.parameters() if p.requires_grad])
        results.append([out.cpu()] + [grad.cpu() for grad in grads])
    for got, expected in zip(results[1], results[0]):
        assert_close(got, expected, 1e-9, name)


def test_swapped_vit_on_cuda_matches_cpu(cuda_backend):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    linattn.swap_attention(model, method="linear")
    model = model.double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = model(images)
    got = copy.deepcopy(model).cuda()(images.cuda())
    assert_close(got.cpu(), expected, 1e-9, "swapped ViT")


def test_compiled_linear_attention_on_cuda(cuda_backend):
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: linattn.linear_attention(q, k, v, causal=True)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    assert_close(compiled(q, k, v), fn(q, k, v).double(), 1e-6, "compiled")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_generic_bf16_branch_on_cuda_equals_the_cpu_run_of_the_same_code(causal, mask):
    """The device-generic forward's bf16 branch (csrc/linear_attention/generic_forward.cpp): on CUDA
    its sums go through bmm's out_dtype overloads, on CPU tensors (where the suite checks it) through
    fp32 copies of the same operands. The same roundings, so the same result up to the order of the
    fp32 sums; a NaN value reaches the same rows."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 1000, 64, generator=g).bfloat16() for _ in range(3))
    v[1, 2, 500, 7] = float("nan")
    key_padding_mask = torch.zeros(2, 1000, dtype=torch.bool)
    key_padding_mask[0, 900:] = mask
    args = dict(causal=causal, key_padding_mask=key_padding_mask if mask else None)
    with linattn.ops.generic_implementation():
        on_cpu = linattn.linear_attention(q, k, v, **args)
    previous = linattn.cuda_backend()
    linattn.set_cuda_backend("generic")
    try:
        on_cuda = linattn.linear_attention(q.cuda(), k.cuda(), v.cuda(), **{
            **args, "key_padding_mask": key_padding_mask.cuda() if mask else None}).cpu()
    finally:
        linattn.set_cuda_backend(previous)
    assert torch.equal(torch.isfinite(on_cuda), torch.isfinite(on_cpu))
    finite = torch.isfinite(on_cpu)
    assert_close(on_cuda[finite], on_cpu[finite], 3e-3, "generic bf16, CUDA vs CPU")
