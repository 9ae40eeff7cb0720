"""Attention sinks (gpt-oss's `s_aux`): linattn.sliding_window_attention(..., sinks=) against a
float64 softmax whose rows carry one more key of score sinks[h] and value 0 — the concatenated
logit column transformers' gpt-oss attention builds — forward and backward (sinks included), every
dtype, windows and padding, fully masked rows, packed sequences, the flash engine's emulation,
gradcheck and torch.compile."""
import pytest
import torch

import linattn
from linattn import ops, reference
from conftest import TOLERANCE, assert_close

SWA = linattn.sliding_window_attention


def inputs(B=2, H=3, T=45, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return make(B, H, T, D), make(B, H, T, D), make(B, H, T, D), make(H)


def reference_with_sinks(q, k, v, window, sinks, causal=False, key_padding_mask=None, scale=None):
    """Float64: the scores of the keys each row sees, one more column of sinks[h], softmax, the
    sink's column dropped."""
    q, k, v, sinks = q.double(), k.double(), v.double(), sinks.double()
    B, H, T, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    visible = linattn.window_mask(T, k.shape[2], window, causal=causal, key_padding_mask=key_padding_mask, batch=B)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    sink_column = sinks.view(1, H, 1, 1).expand(B, H, T, 1)
    probs = torch.softmax(torch.cat([scores, sink_column], -1), -1)[..., :-1]
    return probs @ v


def check(q, k, v, sinks, window, tol=None, **options):
    out = SWA(q, k, v, window, sinks=sinks, **options)
    expected = reference_with_sinks(q, k, v, window, sinks, **options)
    tol = tol or max(TOLERANCE[q.dtype], 1e-6)
    assert out.dtype == q.dtype and out.shape == expected.shape
    assert_close(out, expected, tol, "out")
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = (q, k, v, sinks)
    grads = torch.autograd.grad((out.double() * cotangent).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "sinks"), grads, expected_grads):
        assert a.dtype == q.dtype
        assert_close(a, b, tol * 3, f"d{name}")


@pytest.mark.parametrize("window", [0, 5, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_concatenated_sink_logit(window, causal, implementation):
    check(*inputs(), window, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_every_dtype(dtype, implementation):
    check(*inputs(T=70, D=32, dtype=dtype), 9, causal=True, tol=2 * TOLERANCE[dtype])


def test_rows_that_see_no_key_are_zero_with_zero_gradients(implementation):
    """A row that sees no key gives all its attention to the sink: 0, and no gradient anywhere."""
    q, k, v, sinks = inputs(B=2, T=40)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[0] = True
    padding[1, :20] = True
    out = SWA(q, k, v, 3, causal=True, key_padding_mask=padding, sinks=sinks)
    assert (out[0] == 0).all() and (out[1, :, :20] == 0).all()
    grads = torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v, sinks))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all() and (grads[2][0] == 0).all()
    check(q, k, v, sinks, 3, causal=True, key_padding_mask=padding)


def test_packed_sequences_equal_each_sequence_alone():
    q, k, v, sinks = inputs(B=1, T=60)
    cu = torch.tensor([0, 17, 60], dtype=torch.int32)
    packed = SWA(q, k, v, 6, causal=True, cu_seqlens=cu, sinks=sinks)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = reference_with_sinks(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 6, sinks, causal=True)
        assert_close(packed[:, :, a:b], alone, 1e-6, f"sequence [{a}, {b})")


def test_flash_engine_emulation_bf16():
    """The fused operators (on CPU tensors the flash engine's emulation of its CUDA kernels) under
    the sinks, forward and backward: the sinks only rescale what the engine computes."""
    q, k, v, sinks = inputs(B=1, H=2, T=90, D=64, dtype=torch.bfloat16)
    with ops.fused_implementation():
        torch.ops.linattn._reset_warp_emulation_counters()
        check(q, k, v, sinks, 20, causal=True, tol=2 * TOLERANCE[torch.bfloat16])
        assert torch.ops.linattn._warp_emulation_counters()[0].item() > 0, "the flash engine did not run"


def test_gradcheck():
    q, k, v, sinks = (t.detach().requires_grad_() for t in inputs(B=1, H=2, T=12, D=4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *x: SWA(*x[:3], 3, causal=True, sinks=x[3]), (q, k, v, sinks))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    fn = lambda q, k, v, s: SWA(q, k, v, 6, causal=True, sinks=s)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    q, k, v, sinks = inputs()
    eager, got = fn(q, k, v, sinks), compiled(q, k, v, sinks)
    assert_close(got, eager, 1e-6, "compiled vs eager")
    for a, b in zip(torch.autograd.grad(got.sum(), (q, sinks)), torch.autograd.grad(eager.sum(), (q, sinks))):
        assert_close(a, b, 1e-6, "compiled gradient")


def test_errors():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match=r"sinks must have shape \(3,\) \(H,\) of per-head logits on cpu, "
                                         r"got \(2,\) on cpu"):
        SWA(q, k, v, 3, sinks=torch.zeros(2))
    with pytest.raises(TypeError, match=r"sinks must be float32, float64, bfloat16 or float16, got torch.int64"):
        SWA(q, k, v, 3, sinks=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"sinks must be a torch.Tensor, got list"):
        SWA(q, k, v, 3, sinks=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"sinks must have shape \(3,\) \(H,\) of per-head logits on cpu, "
                                         r"got \(3,\) on meta"):
        SWA(q, k, v, 3, sinks=torch.zeros(3, device="meta"))


def test_without_sinks_the_reference_is_softmax():
    """(The test's own reference: with sinks of −inf it is the plain windowed softmax.)"""
    q, k, v, _ = inputs(dtype=torch.float64)
    minus_inf = torch.full((3,), float("-inf"), dtype=torch.float64)
    assert_close(reference_with_sinks(q, k, v, 5, minus_inf), reference.sliding_window_attention(q, k, v, 5), 1e-12)


# --- linattn.nn.MultiheadAttention(method="local", sinks=True) ---------------------------------

def test_module_sinks_output_weights_and_gradient():
    """The local method's learned sinks: the output is the float64 reference's under the module's
    sinks, need_weights gives each key's share (rows summing to 1 − the sink's), the sinks get a
    gradient, and a state dict from torch's module (no sinks) loads, leaving them as they are."""
    from linattn.nn import MultiheadAttention
    torch.manual_seed(0)
    m = MultiheadAttention(16, 2, method="local", window=4, sinks=True, batch_first=True, dtype=torch.float64)
    assert "sinks=True" in repr(m.core)
    with torch.no_grad():
        m.core.sinks.copy_(torch.tensor([0.5, -1.0]))
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    projected = torch.nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias).detach()
    q, k, v = (t.reshape(2, 20, 2, 8).transpose(1, 2) for t in projected.chunk(3, -1))
    out, weights = m(x, x, x, need_weights=True, average_attn_weights=False)
    attended = reference_with_sinks(q, k, v, 4, m.core.sinks.detach())
    expected = m.out_proj(attended.transpose(1, 2).reshape(2, 20, 16))
    assert_close(out, expected, 1e-10, "out")
    visible = linattn.window_mask(20, 20, 4)
    scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~visible, float("-inf"))
    sink = m.core.sinks.detach().view(1, 2, 1, 1).expand(2, 2, 20, 1)
    expected_weights = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    assert_close(weights, expected_weights, 1e-10, "weights")
    out.sum().backward()
    assert m.core.sinks.grad is not None and m.core.sinks.grad.abs().min() > 0
    before = m.core.sinks.detach().clone()
    m.load_state_dict(torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64).state_dict())
    assert torch.equal(m.core.sinks.detach(), before)
    with pytest.raises(TypeError, match="sinks must be True or False"):
        MultiheadAttention(16, 2, method="local", sinks=1)
