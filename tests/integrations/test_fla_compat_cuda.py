"""On a CUDA GPU with flash-linear-attention installed (scripts/gpu_check.sh carries its wheels):
linattn.fla_compat's functions against fla's own Triton kernels on the same bfloat16 inputs —
outputs, final states and gradients. Skipped elsewhere (the CPU tests compare with fla's naive
references instead)."""
import pytest
import torch
import torch.nn.functional as F

from linattn import fla_compat
from linattn.delta_rule import l2_normalize

from conftest import assert_close

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
B, T, H, K, V = 2, 300, 4, 64, 64
CU = [0, 100, 117, 300]  # packed: three sequences


def _inputs(seed, **shapes):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {name: torch.randn(*shape, generator=g, device="cuda") for name, shape in shapes.items()}


def _compare(name, ours, theirs, leaves, tol=2e-2):
    """ours() and theirs() return (out, final state); both in the same leaves' gradients."""
    out, state = ours()
    ref_out, ref_state = theirs()
    assert_close(out.float(), ref_out.double(), tol, f"{name}: out")
    assert_close(state.float(), ref_state.double(), tol, f"{name}: final state")
    w = torch.randn_like(out)
    got = torch.autograd.grad((out.float() * w).sum() + state.float().sum(), leaves)
    want = torch.autograd.grad((ref_out.float() * w).sum() + ref_state.float().sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a.float(), b.double(), 2 * tol, f"{name}: gradient of input {i}")


@needs_gpu
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_linear_family_against_flas_kernels(packed):
    ops = pytest.importorskip("fla.ops")
    x = _inputs(1, q=(B, T, H, K), k=(B, T, H, K), v=(B, T, H, V), g=(B, T, H, K), h0=(B, H, K, V), u=(H, K))
    if packed:
        x = {n: t[:1] if t.shape[0] == B and n != "h0" else t for n, t in x.items()}
        x["h0"] = torch.randn(len(CU) - 1, H, K, V, device="cuda")
    cu = torch.tensor(CU, device="cuda") if packed else None
    q, k, v = (x[n].bfloat16().requires_grad_() for n in ("q", "k", "v"))
    gk = F.logsigmoid(x["g"]).requires_grad_()
    h0, u = x["h0"], x["u"].bfloat16().requires_grad_()
    common = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu)
    _compare("chunk_gla", lambda: fla_compat.chunk_gla(q, k, v, gk, **common),
             lambda: ops.chunk_gla(q, k, v, gk, **common), [q, k, v, gk])
    _compare("chunk_retention", lambda: fla_compat.chunk_retention(q, k, v, **common),
             lambda: ops.chunk_retention(q, k, v, **common), [q, k, v])
    _compare("fused_recurrent_simple_gla reverse",
             lambda: fla_compat.fused_recurrent_simple_gla(q, k, v, gk[..., 0], reverse=True, **common),
             lambda: ops.fused_recurrent_simple_gla(q, k, v, gk[..., 0], reverse=True, **common), [q, k, v, gk])
    _compare("chunk_rwkv6", lambda: fla_compat.chunk_rwkv6(q, k, v, gk, u, **common),
             lambda: ops.chunk_rwkv6(q, k, v, gk, u, **common), [q, k, v, gk, u])


@needs_gpu
def test_cuda_delta_product_and_based_against_flas_kernels():
    ops = pytest.importorskip("fla.ops")
    n = 2
    x = _inputs(2, q=(B, T, H, K), k=(B, T * n, H, K), v=(B, T * n, H, V), b=(B, T * n, H), g=(B, T, H),
                h0=(B, H, K, V))
    q, v = x["q"].bfloat16().requires_grad_(), x["v"].bfloat16().requires_grad_()
    k = l2_normalize(x["k"]).bfloat16().requires_grad_()
    beta, g = x["b"].sigmoid().bfloat16().requires_grad_(), F.logsigmoid(x["g"]).requires_grad_()
    common = dict(initial_state=x["h0"], output_final_state=True)
    _compare("chunk_gated_delta_product",
             lambda: fla_compat.chunk_gated_delta_product(q, k, v, g, beta, n, **common),
             lambda: ops.chunk_gated_delta_product(q, k, v, g, beta, n, **common), [q, k, v, g, beta])
    qb, kb = (t[..., :16].detach().bfloat16().requires_grad_() for t in (x["q"], x["k"][:, :T]))
    vb = x["v"][:, :T].bfloat16().requires_grad_()
    out = fla_compat.parallel_based(qb, kb, vb)
    ref = ops.parallel_based(qb, kb, vb)
    assert_close(out.float(), ref.double(), 2e-2, "parallel_based: out")


@needs_gpu
@pytest.mark.parametrize("backend", ["generic", "fused"])
@pytest.mark.parametrize("packed, window_size", [(False, None), (True, 37)])
def test_cuda_forgetting_attention_against_flas_kernel(backend, packed, window_size):
    """parallel_forgetting_attn (grouped-query heads, gates per query head) on the device-generic path
    and on the flash engine, against fla's Triton kernel: output and the gradients of q, k, v, g."""
    import linattn

    forgetting = pytest.importorskip("fla.ops.forgetting_attn")
    x = _inputs(3, q=(B, T, H, K), k=(B, T, H // 2, K), v=(B, T, H // 2, V), g=(B, T, H))
    if packed:
        x = {n: t[:1] for n, t in x.items()}
    cu = torch.tensor(CU, device="cuda") if packed else None
    q, k, v = (x[n].bfloat16().requires_grad_() for n in ("q", "k", "v"))
    g = F.logsigmoid(x["g"] + 2).requires_grad_()
    previous = linattn.cuda_backend()
    linattn.set_cuda_backend(backend)
    try:
        out = fla_compat.parallel_forgetting_attn(q, k, v, g, window_size=window_size, cu_seqlens=cu)
        w = torch.randn_like(out)
        got = torch.autograd.grad((out.float() * w).sum(), [q, k, v, g])
    finally:
        linattn.set_cuda_backend(previous)
    ref = forgetting.parallel_forgetting_attn(q, k, v, g, window_size=window_size, cu_seqlens=cu)
    want = torch.autograd.grad((ref.float() * w).sum(), [q, k, v, g])
    assert_close(out.float(), ref.double(), 2e-2, "out")
    for name, a, b in zip("qkvg", got, want):
        assert_close(a.float(), b.double(), 4e-2, f"gradient of {name}")
