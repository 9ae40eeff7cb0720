"""Grouped-query (and multi-query) heads in the restricted softmax: k and v with H_kv heads, H_kv
dividing q's H, query head h reading key/value head h // (H / H_kv) in place; the gradients of k
and v are per shared head, summed over the query heads it serves. Every engine — the CPU kernel
(one work item per shared head in the backward), the device-generic kernels and the flash engine
(its emulation, mma counted) — against float64 softmax with the heads repeated, forward and
backward, for every pattern kind; gradcheck, opcheck, compile; the public functions and the
operator's refusal of heads that do not divide."""
import pytest
import torch

import linattn
from linattn.flash_attn_compat import flash_attn_func, flash_attn_varlen_func
from linattn.ops.restricted import Pattern
from conftest import TOLERANCE, assert_close
from test_flash_backward import BWD, FWD, assert_gpu_backward_matches_emulation, check as check_flash_backward
from test_flash_forward import HALF_TYPES, check as check_flash_forward, reference_forward
from test_softcap import SCALE, check_float64, patterns

OPS = {suffix: getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix) for suffix in ("", "_generic", "_fused")}


def grouped(B, H, kv_heads, Tq, Tk, D, dv, dtype, seed=0):
    """q (B, H, Tq, D), k (B, kv_heads, Tk, D), v (B, kv_heads, Tk, dv), unit normal."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((H, Tq, D), (kv_heads, Tk, D), (kv_heads, Tk, dv))
    return [torch.randn(B, *shape, generator=g, dtype=torch.float64).to(dtype) for shape in shapes]


def repeated(x, H):
    """Shared heads repeated to H: what grouped-query attention means."""
    return x.repeat_interleave(H // x.shape[1], 1)


def uncapped(pattern):
    return Pattern(**{**pattern.__dict__, "softcap": 0.0})


@pytest.mark.parametrize("suffix", ["", "_generic"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("name", list(patterns(8, 1)))
def test_float64_equals_softmax_with_repeated_heads(suffix, kv_heads, name):
    """out, lse and the gradients of q, k, v (summed over each shared head's query heads) and the bias
    equal float64 autograd through softmax with k and v repeated, to 1e-10 / 1e-9: per-head layouts,
    biases and segments stay per query head."""
    T, H = 37, 4
    pattern = patterns(T, H)[name]
    q, k, v = (t.requires_grad_() for t in grouped(2, H, kv_heads, T, T, 16, 12, torch.float64, seed=3))
    bias = pattern.bias.clone().requires_grad_() if pattern.bias is not None else None
    check_float64(OPS[suffix], q, k, v, Pattern(**{**pattern.__dict__, "bias": bias}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_equals_itself_on_repeated_heads(dtype):
    """The CPU kernel's forward on shared heads is the same arithmetic as on repeated copies (bit for
    bit); the backward's shared-head sums agree with the repeated copies' summed gradients."""
    T, H = 150, 6
    pattern = Pattern(window=(20, 3), causal=False)
    q, k, v = grouped(2, H, 2, T, T, 16, 12, dtype, seed=5)
    out, lse = OPS[""](q, k, v, SCALE, *pattern.op_args())
    out_r, lse_r = OPS[""](q, repeated(k, H), repeated(v, H), SCALE, *pattern.op_args())
    assert torch.equal(out, out_r) and torch.equal(lse, lse_r)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    bwd = torch.ops.linattn.restricted_softmax_bwd
    dq, dk, dv, *_ = bwd(grad_out, None, q, k, v, out, lse, SCALE, *pattern.op_args())
    dq_r, dk_r, dv_r, *_ = bwd(grad_out, None, q, repeated(k, H), repeated(v, H), out, lse, SCALE, *pattern.op_args())
    assert dk.shape == k.shape and dv.shape == v.shape
    assert torch.equal(dq, dq_r)
    folded = [g.double().view(2, 2, 3, T, -1).sum(2) for g in (dk_r, dv_r)]
    assert_close(dk, folded[0], TOLERANCE[dtype], "grad k")
    assert_close(dv, folded[1], TOLERANCE[dtype], "grad v")


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("B, kv_heads", [(1, 1), (2, 2)])
def test_cpu_backward_per_shared_head_and_per_query_head(threads, B, kv_heads):
    """The CPU backward's two ways of splitting work — one item per shared head (its query heads in
    turn into one accumulator) while those keep the threads busy, else one per query head (fp32
    partials summed after) — both equal float64 autograd."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pattern = patterns(70, 4)["layout, bias, shared-QK positions"]
        q, k, v = (t.requires_grad_() for t in grouped(B, 4, kv_heads, 70, 70, 16, 12, torch.float64, seed=4))
        positions = pattern.positions[:B]
        check_float64(OPS[""], q, k, v, Pattern(**{**pattern.__dict__, "positions": positions, "bias": None}))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(patterns(8, 1)))
def test_flash_engine_forward_and_backward(dtype, name):
    T, H = 150, 4
    pattern = uncapped(patterns(T, H)[name])
    if pattern.bias is not None:
        pattern = Pattern(**{**pattern.__dict__, "bias": pattern.bias.to(dtype)})
    q, k, v = grouped(2, H, 2, T, T, 40, 24, dtype, seed=7)
    check_flash_forward(q, k, v, pattern, scale=SCALE)
    grads = check_flash_backward(q, k, v, pattern, scale=SCALE)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape


def test_flash_engine_multi_query_head_dim_256():
    """One shared head (multi-query) at D = 256, whose backward blocks split the gradient columns."""
    q, k, v = grouped(1, 3, 1, 70, 90, 256, 256, torch.bfloat16, seed=8)
    pattern = Pattern(causal=True)
    check_flash_forward(q, k, v, pattern, scale=0.0625)
    check_flash_backward(q, k, v, pattern, scale=0.0625)


def test_gradcheck_opcheck_and_compile():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    layout = torch.ones(1, 3, 3, dtype=torch.bool).tril()
    for suffix in ("", "_generic"):
        for pattern in (Pattern(window=(3, 1)), Pattern(layout=layout, block_size=3, causal=True)):
            assert torch.autograd.gradcheck(lambda q, k, v: OPS[suffix](q, k, v, SCALE, *pattern.op_args()),
                                            (q, k, v))
    x = [t.detach().float().requires_grad_() for t in (q, k, v)]
    for op in (torch.ops.linattn.restricted_softmax_fwd.default, FWD):
        torch.library.opcheck(op, (*x, SCALE, *Pattern(causal=True).op_args()))

    def call(q, k, v):
        return linattn.sliding_window_attention(q, k, v, 3, causal=True)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(call, fullgraph=True)(*x), call(*x))


def test_public_functions_and_flash_attn_compat():
    T, H = 41, 4
    q, k, v = grouped(2, H, 2, T, T, 16, 8, torch.float64, seed=10)
    scale = 16 ** -0.5
    out = linattn.sliding_window_attention(q, k, v, 6, causal=True)
    expected = reference_forward(q, k, v, scale, Pattern(window=(6, 0), causal=True))[0]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    layout = linattn.functional.block_local_layout(T, 8, previous=True)
    out = linattn.functional.block_sparse_attention(q, k, v, layout, 8)
    expected = reference_forward(q, k, v, scale, Pattern(layout=layout, block_size=8))[0]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # flash-attn's layouts: (B, T, H, D) and packed (total, H, D).
    got = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)
    expected = reference_forward(q, k, v, scale, Pattern(causal=True))[0]
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-10, atol=1e-10)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    cu = torch.tensor([0, 17, T], dtype=torch.int32)
    got = flash_attn_varlen_func(*packed, cu, cu, T, T, window_size=(5, 2))
    for start, end in ((0, 17), (17, T)):
        part = [t[:, :, start:end] for t in (q[:1], k[:1], v[:1])]
        expected = reference_forward(*part, scale, Pattern(window=(5, 2)))[0]
        torch.testing.assert_close(got[start:end], expected[0].transpose(0, 1), rtol=1e-10, atol=1e-10)


def test_heads_that_do_not_divide_are_refused_naming_them():
    q, k, v = grouped(2, 3, 2, 5, 5, 4, 4, torch.float32)
    with pytest.raises(ValueError, match=r"q's heads must be a multiple of k and v's \(grouped-query attention\)"):
        linattn.sliding_window_attention(q, k, v, 2)
    with pytest.raises(ValueError, match="k and v the head dim"):
        linattn.sliding_window_attention(q, k, v[:, :1], 2)
    for op in OPS.values():
        with pytest.raises(RuntimeError, match=r"q's heads must be a multiple of k and v's .*, got q \[2, 3, 5, 4\]"):
            op(q, k, v, 1.0, *Pattern().op_args())
    with pytest.raises(ValueError, match="k and v must have the same number of heads, dividing q's 3"):
        flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["causal", "global tokens and padding", "layout, bias, shared-QK positions"])
def test_cuda_kernels_match_emulation_and_reference(name):
    T, H = 333, 4
    pattern = uncapped(patterns(T, H)[name])
    if pattern.bias is not None:
        pattern = Pattern(**{**pattern.__dict__, "bias": pattern.bias.to(torch.bfloat16)})
    q, k, v = grouped(2, H, 2, T, T, 64, 64, torch.bfloat16, seed=3)
    out, _ = assert_gpu_backward_matches_emulation(q, k, v, 0.125, pattern)
    assert_close(out, reference_forward(q, k, v, 0.125, pattern)[0], TOLERANCE[torch.bfloat16], "GPU vs float64")
