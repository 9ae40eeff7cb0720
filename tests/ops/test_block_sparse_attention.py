"""linattn.block_sparse_attention and its layouts (block_local_layout, bigbird_layout) against
float64 softmax under the layout expanded to a dense mask (linattn.reference): odd lengths and
block sizes (last partial block), per-head and shared layouts, causal, padding, empty rows,
T_q != T_k, every dtype, gradcheck, opcheck, torch.compile, both implementations."""
import math

import pytest
import torch

import linattn
from linattn import reference
from conftest import TOLERANCE, assert_close

BSA = linattn.block_sparse_attention


def qkv(B=2, H=2, Tq=37, Tk=None, D=16, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return make(B, H, Tq, D), make(B, H, Tk, D), make(B, H, Tk, dv or D)


def random_layout(heads, Tq, Tk, b, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(heads, math.ceil(Tq / b), math.ceil(Tk / b), generator=g) < density


def check(q, k, v, layout, b, tol=None, **options):
    out = BSA(q, k, v, layout, b, **options)
    expected = reference.block_sparse_attention(q, k, v, layout, b, **options)
    tol = tol or max(TOLERANCE[q.dtype], 1e-6)
    assert out.dtype == q.dtype and out.shape == expected.shape
    assert_close(out, expected, tol, "out")
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * cotangent).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((expected * cotangent).sum(), (q, k, v))
    for name, a, b_ in zip("qkv", grads, grads_ref):
        assert_close(a, b_, tol * 3, f"d{name}")


@pytest.mark.parametrize("T", [1, 15, 64, 100, 257])
@pytest.mark.parametrize("b", [1, 7, 16, 64])
@pytest.mark.parametrize("heads_in_layout", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_random_layouts_match_masked_softmax(T, b, heads_in_layout, causal, implementation):
    check(*qkv(Tq=T), random_layout(heads_in_layout, T, T, b, seed=T + b), b, causal=causal)


@pytest.mark.parametrize("Tq,Tk", [(30, 97), (97, 30)])
def test_different_query_and_key_lengths(Tq, Tk, implementation):
    check(*qkv(Tq=Tq, Tk=Tk, dv=5), random_layout(2, Tq, Tk, 8, density=0.5), 8)
    check(*qkv(Tq=Tq, Tk=Tk, dv=5), random_layout(1, Tq, Tk, 8, density=0.5), 8, causal=True)


def test_padding_and_rows_without_keys(implementation):
    q, k, v = qkv(B=2, Tq=50)
    layout = random_layout(2, 50, 50, 10, density=0.4)
    layout[:, 0] = False  # block row 0 sees nothing
    padding = torch.zeros(2, 50, dtype=torch.bool)
    padding[1, 25:] = True
    out = BSA(q, k, v, layout, 10, key_padding_mask=padding)
    assert torch.isfinite(out).all() and (out[:, :, :10] == 0).all()
    check(q, k, v, layout, 10, key_padding_mask=padding)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype(dtype, implementation):
    check(*qkv(Tq=90, D=32, dtype=dtype), random_layout(2, 90, 90, 16, density=0.5), 16, causal=True,
          tol=TOLERANCE[dtype] * 2)


def test_block_local_layout_is_the_seeds_local_windows(implementation):
    q, k, v = qkv(Tq=70)
    local = linattn.block_local_layout(70, 16)
    assert local.shape == (1, 5, 5) and torch.equal(local[0], torch.eye(5, dtype=torch.bool))
    check(q, k, v, local, 16)
    with_previous = linattn.block_local_layout(70, 16, previous=True, causal=True)
    assert torch.equal(with_previous[0], torch.eye(5, dtype=torch.bool) | torch.eye(5, dtype=torch.bool).roll(-1, 1).tril())
    check(q, k, v, with_previous, 16, causal=True)
    symmetric = linattn.block_local_layout(70, 16, previous=True)
    assert torch.equal(symmetric[0], symmetric[0].T)
    # A block-local layout with one block of the whole sequence is full attention.
    full = BSA(q, k, v, linattn.block_local_layout(70, 70), 70)
    assert_close(full, reference.softmax_attention(q, k, v), 1e-5, "one block = softmax")


def test_bigbird_layout_structure_and_equivalence(implementation):
    g = torch.Generator().manual_seed(0)
    layout = linattn.bigbird_layout(200, 16, num_random=2, num_global=2, heads=3, generator=g)
    n = math.ceil(200 / 16)
    assert layout.shape == (3, n, n)
    assert layout[:, 0].all() and layout[:, -1].all() and layout[:, :, 0].all() and layout[:, :, -1].all()
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 1
    assert layout[:, band].all()
    extra = layout.clone()
    extra[:, band] = False
    extra[:, [0, -1]] = False
    extra[:, :, [0, -1]] = False
    assert (extra[:, 1:-1].sum(-1) <= 2).all() and (extra[:, 1:-1].sum(-1) == 2).any()
    again = linattn.bigbird_layout(200, 16, num_random=2, num_global=2, heads=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layout, again)  # reproducible from the generator
    q, k, v = qkv(B=1, H=3, Tq=200)
    check(q, k, v, layout, 16)
    # No minimum length: a sequence shorter than a block works.
    tiny = linattn.bigbird_layout(5, 16)
    check(*qkv(Tq=5), tiny, 16)


def test_gradcheck(implementation):
    q, k, v = qkv(B=1, H=2, Tq=9, Tk=11, D=4, dtype=torch.float64)
    layout = random_layout(2, 9, 11, 3, density=0.6)
    assert torch.autograd.gradcheck(lambda a, b, c: BSA(a, b, c, layout, 3), (q, k, v))
    layout = random_layout(1, 9, 11, 2, density=0.6)
    assert torch.autograd.gradcheck(lambda a, b, c: BSA(a, b, c, layout, 2, causal=True), (q, k, v))


@pytest.mark.parametrize("name", ["restricted_softmax_fwd", "restricted_softmax_fwd_generic"])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(name, causal):
    q, k, v = qkv(B=2, H=2, Tq=70, D=8)
    p = torch.zeros(2, 70, dtype=torch.bool)
    p[1, 60:] = True
    op = getattr(torch.ops.linattn, name).default
    torch.library.opcheck(op, (q, k, v, 0.25, -1, -1, 1, causal, random_layout(2, 70, 70, 16), 16, None, p))


@pytest.mark.parametrize("name", ["restricted_softmax_bwd", "restricted_softmax_bwd_generic"])
def test_opcheck_backward(name):
    q, k, v = (t.detach() for t in qkv(B=2, H=2, Tq=70, D=8))
    layout = random_layout(1, 70, 70, 16)
    out, lse = torch.ops.linattn.restricted_softmax_fwd(q, k, v, 0.25, layout=layout, block_size=16)
    op = getattr(torch.ops.linattn, name).default
    torch.library.opcheck(op, (torch.randn_like(out), None, q, k, v, out, lse, 0.25, -1, -1, 1, False, layout, 16))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    layout = random_layout(2, 64, 64, 16, density=0.5)
    fn = lambda q, k, v: BSA(q, k, v, layout, 16, causal=True)
    compiled = torch.compile(fn, fullgraph=True)
    q, k, v = qkv(Tq=64)
    got, eager = compiled(q, k, v), fn(q, k, v)
    assert_close(got, eager, 1e-6, "compiled")
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(eager.sum(), (q, k, v))):
        assert_close(a, b, 1e-6, "compiled gradient")


def test_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1"):
        BSA(q, k, v, random_layout(1, 37, 37, 8), 0)
    with pytest.raises(ValueError, match=r"layout must have shape \(1 or 2, 5, 5\)"):
        BSA(q, k, v, random_layout(1, 37, 37, 16), 8)
    with pytest.raises(TypeError, match=r"layout must be a 3-D bool tensor"):
        BSA(q, k, v, random_layout(1, 37, 37, 8).float(), 8)
    op = torch.ops.linattn.restricted_softmax_fwd
    with pytest.raises(RuntimeError, match=r"restricted_softmax: layout must have shape"):
        op(q, k, v, 1.0, layout=random_layout(3, 37, 37, 8), block_size=8)
    with pytest.raises(RuntimeError, match=r"block_size must be >= 1"):
        op(q, k, v, 1.0, layout=random_layout(1, 37, 37, 8), block_size=0)
    with pytest.raises(RuntimeError, match=r"layout and q must be on the same device"):
        op(q, k, v, 1.0, layout=random_layout(1, 37, 37, 8).to("meta"), block_size=8)
    with pytest.raises(ValueError, match=r"bigbird_layout: num_random must be an int >= 0"):
        linattn.bigbird_layout(100, 16, num_random=-1)
