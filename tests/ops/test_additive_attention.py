"""linattn.additive_attention (Bahdanau) against the float64 reference that builds the whole
(T_q, T_k, D) tanh tensor: windows, causal, T_q != T_k, padding, every dtype, gradients of
q, k, v and w, gradcheck, opcheck, torch.compile, and a blocked evaluation (several slabs)."""
import pytest
import torch

import linattn
from linattn import reference
from linattn.ops import additive
from conftest import TOLERANCE, assert_close


def inputs(B=2, H=3, Tq=19, Tk=23, D=6, dv=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return make(B, H, Tq, D), make(B, H, Tk, D), make(B, H, Tk, dv), make(H, D)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,causal", [(None, False), (None, True), (3, False), (4, True), ((2, 5), False)])
def test_matches_reference(dtype, window, causal):
    q, k, v, w = inputs(dtype=dtype)
    pad = torch.zeros(2, 23, dtype=torch.bool)
    pad[1, -4:] = True
    options = dict(window=window, causal=causal, key_padding_mask=pad)
    out = linattn.additive_attention(q, k, v, w, **options)
    want = reference.additive_attention(q, k, v, w, **options)
    tol = max(TOLERANCE[dtype], 1e-6)
    assert out.dtype == dtype
    assert_close(out, want, tol, "out")
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * cot).sum(), (q, k, v, w))
    ref = torch.autograd.grad((want * cot).sum(), (q, k, v, w))
    for name, a, b in zip("qkvw", got, ref):
        assert_close(a, b, tol * 3, f"d{name}")


def test_blocked_evaluation(monkeypatch):
    monkeypatch.setattr(additive, "_SLAB_ELEMENTS", 500)  # many small blocks
    q, k, v, w = inputs()
    for window in (None, 2):
        assert len(list(additive._blocks(q, k, -1 if window is None else window, -1 if window is None else window))) > 3
        out = linattn.additive_attention(q, k, v, w, window=window)
        assert_close(out, reference.additive_attention(q, k, v, w, window=window), 1e-12, "blocked")


def test_gradcheck_and_opcheck():
    q, k, v, w = inputs(B=1, H=2, Tq=5, Tk=7, D=3, dv=2)
    assert torch.autograd.gradcheck(lambda a, b, c, d: linattn.additive_attention(a, b, c, d, window=2), (q, k, v, w))
    torch.library.opcheck(torch.ops.linattn.additive_attn_fwd.default, (q, k, v, w, 2, 2, None))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v, w = inputs(dtype=torch.float32)
    fn = lambda a, b, c, d: linattn.additive_attention(a, b, c, d, causal=True)
    got, eager = torch.compile(fn, fullgraph=True)(q, k, v, w), fn(q, k, v, w)
    assert_close(got, eager, 1e-6, "compiled")
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v, w)), torch.autograd.grad(eager.sum(), (q, k, v, w))):
        assert_close(a, b, 1e-5, "compiled gradient")


def test_errors():
    q, k, v, w = inputs()
    with pytest.raises(ValueError, match=r"w must be a \(H, D\) = \(3, 6\) tensor, got \(6,\)"):
        linattn.additive_attention(q, k, v, w[0])
    with pytest.raises(ValueError, match="window must be >= 0"):
        linattn.additive_attention(q, k, v, w, window=-3)
