"""linattn.sliding_window_attention (docs/methods.md §5) against float64 softmax under the
equivalent dense mask (built by linattn.reference; the operators never build it): windows,
(left, right) bounds, T_q != T_k, dilation, causal, global tokens, padding, fully masked rows,
every dtype, forward and backward, gradcheck, opcheck, torch.compile, both implementations."""
import math

import pytest
import torch

import linattn
from linattn import reference
from conftest import TOLERANCE, assert_close

SWA = linattn.sliding_window_attention


def qkv(B=2, H=2, Tq=37, Tk=None, D=16, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return make(B, H, Tq, D), make(B, H, Tk, D), make(B, H, Tk, dv or D)


def check(q, k, v, window, tol=None, **options):
    out = SWA(q, k, v, window, **options)
    expected = reference.sliding_window_attention(q, k, v, window, **options)
    tol = tol or max(TOLERANCE[q.dtype], 1e-6)
    assert out.dtype == q.dtype and out.shape == expected.shape
    assert_close(out, expected, tol, "out")
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * cotangent).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((expected * cotangent).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, grads_ref):
        assert a.dtype == q.dtype
        assert_close(a, b, tol * 3, f"d{name}")


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 130, 300])
@pytest.mark.parametrize("window", [0, 1, 7, 64, 200])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_masked_softmax(T, window, causal, implementation):
    check(*qkv(Tq=T), window, causal=causal)


@pytest.mark.parametrize("window", [(3, 10), (0, 5), (-1, 2), (17, -1), (-1, -1), (64, 0)])
@pytest.mark.parametrize("Tq,Tk", [(50, 50), (30, 97), (97, 30), (1, 200)])
def test_left_right_windows_bottom_right_aligned(window, Tq, Tk, implementation):
    check(*qkv(Tq=Tq, Tk=Tk, dv=9), window)


@pytest.mark.parametrize("dilation", [2, 3, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_windows(dilation, causal, implementation):
    check(*qkv(Tq=150), 20, causal=causal, dilation=dilation)


@pytest.mark.parametrize("T", [10, 64, 190])
def test_longformer_global_tokens_and_padding(T, implementation):
    q, k, v = qkv(B=3, Tq=T)
    g = torch.Generator().manual_seed(1)
    global_mask = torch.rand(3, T, generator=g) < 0.05
    global_mask[0, 0] = True
    global_mask[1] = False
    padding = torch.zeros(3, T, dtype=torch.bool)
    padding[2, T // 2:] = True
    check(q, k, v, 4, global_mask=global_mask, key_padding_mask=padding)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_that_see_no_key_are_zero_with_zero_gradients(causal, implementation):
    q, k, v = qkv(B=2, Tq=40)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[0] = True            # every key padded
    padding[1, :20] = True       # causal rows 0..19 see nothing; window 2 rows < 18 too
    out = SWA(q, k, v, 2, causal=causal, key_padding_mask=padding)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :, :18] == 0).all()
    grads = torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all() and (grads[2][0] == 0).all()
    check(q, k, v, 2, causal=causal, key_padding_mask=padding)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_every_dtype(dtype, causal, implementation):
    check(*qkv(Tq=100, D=32, dtype=dtype), 9, causal=causal, tol=TOLERANCE[dtype] * 2)


def test_strided_inputs_and_scale(implementation):
    x = torch.randn(2, 77, 3, 16, dtype=torch.float64)  # (B, T, H, D) viewed as (B, H, T, D)
    q = x.transpose(1, 2).requires_grad_()
    k = x.flip(1).transpose(1, 2).detach().requires_grad_()
    v = torch.randn(2, 3, 77, 32, dtype=torch.float64)[..., ::2].requires_grad_()
    check(q, k, v, 11, scale=0.3)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_values_outside_a_window_never_reach_it(bad, implementation):
    q, k, v = (t.detach() for t in qkv(B=1, H=1, Tq=200))
    v = v.clone()
    v[0, 0, 150, 3] = bad
    out = SWA(q, k, v, 5)
    assert torch.isfinite(out[0, 0, :145]).all() and torch.isfinite(out[0, 0, 156:]).all()
    assert not torch.isfinite(out[0, 0, 145:156, 3]).any()
    clean = v.clone()
    clean[0, 0, 150, 3] = 0.0
    assert_close(out[0, 0, :145], SWA(q, k, clean, 5)[0, 0, :145], 1e-6, "rows away from the bad value")
    expected = reference.sliding_window_attention(q, k, v, 5)
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))


def test_gradcheck(implementation):
    q, k, v = qkv(B=1, H=2, Tq=9, Tk=11, D=4, dtype=torch.float64)
    global_mask = None
    for options in ({"window": 2}, {"window": (1, 3), "dilation": 2}, {"window": 1, "causal": True}):
        window = options.pop("window")
        assert torch.autograd.gradcheck(lambda a, b, c: SWA(a, b, c, window, **options), (q, k, v))
    q, k, v = qkv(B=2, H=1, Tq=12, D=4, dtype=torch.float64)
    global_mask = torch.zeros(2, 12, dtype=torch.bool)
    global_mask[0, 3] = True
    assert torch.autograd.gradcheck(lambda a, b, c: SWA(a, b, c, 1, global_mask=global_mask), (q, k, v))


@pytest.mark.parametrize("name", ["restricted_softmax_fwd", "restricted_softmax_fwd_generic"])
@pytest.mark.parametrize("window,dilation,with_masks", [((3, 3), 1, False), ((5, 0), 2, True), ((-1, 2), 1, True)])
def test_opcheck(name, window, dilation, with_masks):
    q, k, v = qkv(B=2, H=2, Tq=70, D=8)
    g = torch.zeros(2, 70, dtype=torch.bool)
    g[0, 5] = True
    p = torch.zeros(2, 70, dtype=torch.bool)
    p[1, 60:] = True
    op = getattr(torch.ops.linattn, name).default
    torch.library.opcheck(op, (q, k, v, 0.25, *window, dilation, False, None, 1, g if with_masks else None,
                               p if with_masks else None))


@pytest.mark.parametrize("name", ["restricted_softmax_bwd", "restricted_softmax_bwd_generic"])
def test_opcheck_backward(name):
    q, k, v = (t.detach() for t in qkv(B=2, H=2, Tq=70, D=8))
    out, lse = torch.ops.linattn.restricted_softmax_fwd(q, k, v, 0.25, 4, 4)
    op = getattr(torch.ops.linattn, name).default
    torch.library.opcheck(op, (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, 0.25, 4, 4))


@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_dynamic_matches_eager(causal):
    torch._dynamo.reset()
    fn = lambda q, k, v: SWA(q, k, v, 6, causal=causal)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for T in (33, 64, 101):
        q, k, v = qkv(Tq=T)
        eager = fn(q, k, v)
        got = compiled(q, k, v)
        assert_close(got, eager, 1e-6, f"compiled vs eager at T={T}")
        for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(eager.sum(), (q, k, v))):
            assert_close(a, b, 1e-6, "compiled gradient")


def test_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"sliding_window_attention: window must be >= 0"):
        SWA(q, k, v, -2)
    with pytest.raises(TypeError, match=r"window must be an int or a \(left, right\) pair"):
        SWA(q, k, v, 2.5)
    with pytest.raises(ValueError, match=r"window bounds must be >= 0 or -1"):
        SWA(q, k, v, (3, -4))
    with pytest.raises(ValueError, match=r"dilation must be an int >= 1"):
        SWA(q, k, v, 3, dilation=0)
    with pytest.raises(ValueError, match=r"global_mask needs causal=False"):
        SWA(q, k, v, 3, causal=True, global_mask=torch.zeros(2, 37, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"global_mask must be a bool tensor \(True = global token\)"):
        SWA(q, k, v, 3, global_mask=torch.zeros(2, 37))
    with pytest.raises(ValueError, match=r"scale must be a finite number"):
        SWA(q, k, v, 3, scale=math.inf)
    op = torch.ops.linattn.restricted_softmax_fwd
    with pytest.raises(RuntimeError, match=r"restricted_softmax: dilation must be >= 1"):
        op(q, k, v, 1.0, 3, 3, 0)
    with pytest.raises(RuntimeError, match=r"k and q must be on the same device"):
        op(q, k.detach().to("meta"), v, 1.0, 3, 3)
    with pytest.raises(RuntimeError, match=r"global_mask needs as many queries as keys"):
        op(q[:, :, :5], k, v, 1.0, 3, 3, global_mask=torch.zeros(2, 37, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"global_mask needs causal=False"):
        op(q, k, v, 1.0, 3, 3, causal=True, global_mask=torch.zeros(2, 37, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"a layout is a region of its own"):
        op(q, k, v, 1.0, 3, 3, layout=torch.ones(1, 1, 1, dtype=torch.bool), block_size=37)
    with pytest.raises(RuntimeError, match=r"bias and positions are terms of a layout pattern"):
        op(q, k, v, 1.0, 3, 3, bias=torch.zeros(1, 37, 37))


def test_double_backward_raises():
    q, k, v = qkv()
    (gq,) = torch.autograd.grad(SWA(q, k, v, 3).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"second derivatives"):
        gq.sum().backward()


# --- the "local" and "longformer" methods of linattn.nn.MultiheadAttention ---------------------

def test_longformer_module_takes_a_global_mask_per_call():
    torch.manual_seed(0)
    module = linattn.nn.MultiheadAttention(16, 2, batch_first=True, method="longformer", window=3, global_tokens=1)
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    module = module.double()
    default, _ = module(x, x, x, need_weights=False)
    first = torch.zeros(2, 30, dtype=torch.bool)
    first[:, 0] = True
    explicit, _ = module(x, x, x, need_weights=False, global_mask=first)
    assert_close(explicit, default, 1e-12, "global_tokens=1 is the first token")
    other = torch.zeros(2, 30, dtype=torch.bool)
    other[:, [5, 17]] = True
    out, weights = module(x, x, x, global_mask=other, average_attn_weights=False)
    assert weights[:, :, 5].gt(0).all() and weights[:, :, :, 17].gt(0).all()  # global row 5 sees all; all see 17
    assert (weights[:, :, 0, 10] == 0).all()  # outside row 0's window, not global


def test_global_mask_and_extra_keys_errors():
    x = torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match=r"global_mask is only for method='longformer'"):
        linattn.nn.MultiheadAttention(16, 2, batch_first=True, method="local")(
            x, x, x, global_mask=torch.zeros(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"add_bias_kv and add_zero_attn are not supported by this method"):
        linattn.nn.MultiheadAttention(16, 2, batch_first=True, method="local", add_zero_attn=True)(x, x, x)
    with pytest.raises(ValueError, match=r"non-causal only"):
        linattn.nn.MultiheadAttention(16, 2, batch_first=True, method="longformer")(x, x, x, is_causal=True,
                                                                                   attn_mask=torch.zeros(10, 10))
    with pytest.raises(ValueError, match=r"linattn method 'local': window must be"):
        linattn.nn.MultiheadAttention(16, 2, method="local", window=-5)


@pytest.mark.parametrize("method", ["local", "longformer"])
@pytest.mark.parametrize("training", [False, True])
def test_swapped_encoder_with_a_window_covering_the_sequence_is_softmax(method, training):
    def encoder():
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    windowed = linattn.swap_attention(encoder(), method=method, window=200).train(training)
    dense = linattn.swap_attention(encoder(), method="softmax").train(training)
    assert all(layer.self_attn.method == method for layer in windowed.layers)
    x = torch.randn(2, 50, 16)
    out = windowed(x)
    assert_close(out, dense(x), 1e-5, "window >= T equals softmax")
    out.sum().backward()
    assert all(p.grad is not None for p in windowed.parameters())


@pytest.mark.parametrize("threads", [1, 2])
def test_scratch_kept_between_calls_leaves_no_trace(threads):
    """Each thread keeps its kernel scratch from call to call: a call with NaN inputs, a wide
    window and a large head dimension must not change the result of a later, smaller call."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nan = float("nan")
        q, k, v = (torch.full((1, 2, 300, 64), nan, requires_grad=True) for _ in range(3))
        SWA(q, k, v, 200).sum().backward()
        for dtype in (torch.float32, torch.float64):
            check(*qkv(Tq=49, D=19, dtype=dtype, seed=3), 9)
            check(*qkv(Tq=77, D=8, dtype=dtype, seed=4), 30, causal=True)
    finally:
        torch.set_num_threads(previous)
