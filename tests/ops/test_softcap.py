"""Logit soft-capping in the restricted softmax (Gemma-2's, flash-attn's `softcap`; the operator's
`softcap` argument): the scaled scores s become c·tanh(s / c) before the bias. Every engine — the
CPU kernel, the device-generic kernels (window tiles, global rows, layout tiles) and the flash
engine (its CUDA kernels' emulation on CPU tensors, mma counted) — against float64 softmax over the
capped scores, forward and backward (the bias's and lse's cotangents included); gradcheck, opcheck
and compile; the public functions and their argument checks."""
import math

import pytest
import torch

import linattn
from linattn import ops, reference
from linattn.ops.restricted import Pattern
from conftest import TOLERANCE, assert_close
from test_flash_backward import assert_gpu_backward_matches_emulation, check as check_flash_backward
from test_flash_forward import HALF_TYPES, check as check_flash_forward, ids, make, reference_forward

# Small against the scores (unit-normal q and k, D = 16, scale 0.9: scores of spread ~3.6), so that
# tanh bends most of them well away from linear.
CAP, SCALE = 1.5, 0.9


def patterns(T, H):
    global_mask = torch.zeros(2, T, dtype=torch.bool)
    global_mask[0, [2, T // 2]] = True
    padding = torch.zeros(2, T, dtype=torch.bool)
    padding[1, T - T // 4:] = True
    n = -(-T // 8)
    positions = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(s)) for s in range(2)])[:, None]
    return {
        "window": Pattern(window=(9, 4), softcap=CAP),
        "causal": Pattern(causal=True, softcap=CAP),
        "global tokens and padding": Pattern(window=(6, 6), global_mask=global_mask, key_padding_mask=padding,
                                             softcap=CAP),
        "segments": Pattern(q_segments=ids(2, H, T, seed=1), k_segments=ids(2, H, T, seed=1), softcap=CAP),
        "layout, bias, shared-QK positions": Pattern(
            layout=torch.rand(H, n, n, generator=torch.Generator().manual_seed(2)) < 0.6, block_size=8, causal=True,
            positions=positions, bias=torch.randn(H, T, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
            softcap=CAP),
    }


def with_bias(pattern, bias):
    return Pattern(**{**pattern.__dict__, "bias": bias})


def uncapped(pattern):
    return Pattern(**{**pattern.__dict__, "softcap": 0.0})


@pytest.mark.parametrize("suffix", ["", "_generic"])
@pytest.mark.parametrize("name", list(patterns(8, 1)))
def test_float64_equals_softmax_over_capped_scores(suffix, name):
    """out, lse and the gradients of q, k, v and the bias (cotangents of out and lse) equal float64
    autograd through softmax over the capped scores, to 1e-10 / 1e-9."""
    T, H = 37, 2
    pattern = patterns(T, H)[name]
    q, k, v = (t.requires_grad_() for t in make(2, H, T, T, 16, 12, torch.float64, seed=4))
    bias = pattern.bias.clone().requires_grad_() if pattern.bias is not None else None
    pattern = with_bias(pattern, bias)
    ref_out = check_float64(getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix), q, k, v, pattern)
    # The cap matters here: without it every output moves.
    assert (reference_forward(q, k, v, SCALE, uncapped(pattern))[0] - ref_out).abs().max() > 0.05


def check_float64(op, q, k, v, pattern, reference=reference_forward):
    """op's out, lse and gradients of q, k, v and the pattern's bias and forget gates (cotangents of out
    and lse) equal float64 autograd through `reference` (q, k, v, scale, pattern), to 1e-10 / 1e-9;
    returns the reference's output."""
    out, lse = op(q, k, v, SCALE, *pattern.op_args())
    ref_out, ref_lse = reference(q, k, v, SCALE, pattern)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(5)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).masked_fill(torch.isinf(ref_lse), 0)

    def loss(out, lse):
        return (out * w_out).sum() + (torch.where(torch.isinf(lse), 0, lse) * w_lse).sum()

    terms = {name: t for name in ("bias", "forget_cumsum") if (t := getattr(pattern, name)) is not None}
    leaves = [q, k, v, *terms.values()]
    grads = torch.autograd.grad(loss(out, lse), leaves)
    expected = torch.autograd.grad(loss(ref_out, ref_lse), leaves)
    for label, got, want in zip(("q", "k", "v", *terms), grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"grad {label}")
    return ref_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["window", "layout, bias, shared-QK positions"])
def test_cpu_kernel_in_every_dtype(dtype, name):
    """The CPU kernel's fast float tanh (and its fp32 accumulation for 16-bit inputs) against float64."""
    T, H = 150, 2
    pattern = patterns(T, H)[name]
    if pattern.bias is not None:
        pattern = with_bias(pattern, pattern.bias.to(dtype))
    q, k, v = make(2, H, T, T, 16, 12, dtype, seed=6)
    out, lse = torch.ops.linattn.restricted_softmax_fwd(q, k, v, SCALE, *pattern.op_args())
    ref_out, ref_lse = reference_forward(q, k, v, SCALE, pattern)
    assert_close(out, ref_out, TOLERANCE[dtype], "out")
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], 1e-4 if dtype != torch.float32 else 1e-5, "lse")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(patterns(8, 1)))
def test_flash_engine_forward_and_backward(dtype, name):
    """The flash engine (its emulation; mma counted by the shared checks) caps in the forward's
    scores and passes the cap's slope in the backward's."""
    pattern = patterns(150, 2)[name]
    check_flash_engine(pattern if pattern.bias is None else with_bias(pattern, pattern.bias.to(dtype)), dtype)


def check_flash_engine(pattern, dtype, T=150, H=2):
    """The flash engine's forward and backward (its emulation, mma counted) against float64."""
    q, k, v = make(2, H, T, T, 40, 24, dtype, seed=7)
    check_flash_forward(q, k, v, pattern, scale=SCALE)
    check_flash_backward(q, k, v, pattern, scale=SCALE)


def test_gradcheck_cpu_and_generic():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    layout = torch.ones(1, 3, 3, dtype=torch.bool).tril()
    for suffix in ("", "_generic"):
        op = getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix)

        def window(q, k, v):
            return op(q, k, v, SCALE, *Pattern(window=(3, 1), softcap=CAP).op_args())

        def with_layout(q, k, v, b):
            return op(q, k, v, SCALE, *Pattern(layout=layout, block_size=3, causal=True, bias=b, softcap=CAP).op_args())

        assert torch.autograd.gradcheck(window, (q, k, v))
        assert torch.autograd.gradcheck(with_layout, (q, k, v, bias))


def test_opcheck_and_compile():
    q, k, v = make(1, 2, 33, 33, 16, 16, torch.float32, seed=9)
    for t in (q, k, v):
        t.requires_grad_()
    args = (q, k, v, SCALE, *Pattern(window=(5, 5), softcap=CAP).op_args())
    torch.library.opcheck(torch.ops.linattn.restricted_softmax_fwd.default, args)

    def call(q, k, v):
        return linattn.sliding_window_attention(q, k, v, 5, scale=SCALE, softcap=CAP)

    expected = call(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True)
    assert torch.equal(compiled(q, k, v), expected)


def test_public_functions():
    """sliding_window_attention and block_sparse_attention take softcap, in every engine's terms
    the same softmax over capped scores; a huge cap is no cap."""
    T = 41
    q, k, v = make(2, 3, T, T, 16, 8, torch.float64, seed=10)
    out = linattn.sliding_window_attention(q, k, v, 6, causal=True, scale=SCALE, softcap=CAP)
    visible = Pattern(window=(6, -1), causal=True).dense_mask(T, T)
    expected = reference.masked_softmax_attention(q, k, v, visible, SCALE, softcap=CAP)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    layout = linattn.functional.block_local_layout(T, 8, previous=True)
    out = linattn.functional.block_sparse_attention(q, k, v, layout, 8, scale=SCALE, softcap=CAP)
    visible = Pattern(layout=layout, block_size=8).dense_mask(T, T)
    torch.testing.assert_close(out, reference.masked_softmax_attention(q, k, v, visible, SCALE, softcap=CAP),
                               rtol=1e-10, atol=1e-10)
    plain = linattn.sliding_window_attention(q, k, v, 6, scale=SCALE)
    huge = linattn.sliding_window_attention(q, k, v, 6, scale=SCALE, softcap=1e7)
    torch.testing.assert_close(huge, plain, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("softcap", [0, -1.0, math.inf, math.nan, True, "50"])
def test_bad_softcap_is_refused_naming_it(softcap):
    q, k, v = make(1, 1, 5, 5, 4, 4, torch.float32)
    with pytest.raises(ValueError, match=r"sliding_window_attention: softcap must be a finite number > 0"):
        linattn.sliding_window_attention(q, k, v, 2, softcap=softcap)
    with pytest.raises(ValueError, match=r"block_sparse_attention: softcap must be"):
        linattn.functional.block_sparse_attention(q, k, v, torch.ones(1, 1, 1, dtype=torch.bool), 5, softcap=softcap)


def test_operator_refuses_a_negative_or_non_finite_cap():
    q, k, v = make(1, 1, 5, 5, 4, 4, torch.float32)
    for bad in (-1.0, math.inf, math.nan):
        for suffix in ("", "_generic", "_fused"):
            op = getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix)
            with pytest.raises(RuntimeError, match="softcap must be a finite number >= 0"):
                op(q, k, v, 1.0, *Pattern(softcap=bad).op_args())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("name", ["causal", "global tokens and padding", "layout, bias, shared-QK positions"])
def test_cuda_kernels_match_emulation_and_reference(name, D):
    """On a GPU the flash kernels cap with tanhf: forward against float64, forward and backward
    against their own emulation on the CPU."""
    block_limit = torch.cuda.get_device_properties().shared_memory_per_block_optin
    if torch.ops.linattn._flash_shared_bytes(D, D, True, 1) > block_limit:
        pytest.skip("this GPU's blocks cannot hold the backward's shared memory at this head dim")
    T, H = 333, 2
    pattern = patterns(T, H)[name]
    if pattern.bias is not None:
        pattern = with_bias(pattern, pattern.bias.bfloat16())
    q, k, v = make(2, H, T, T, D, D, torch.bfloat16, seed=3)
    out, _ = assert_gpu_backward_matches_emulation(q, k, v, SCALE / 4, pattern)
    assert_close(out, reference_forward(q, k, v, SCALE / 4, pattern)[0], TOLERANCE[torch.bfloat16], "GPU vs float64")


# --- linattn.nn.MultiheadAttention(method="local", softcap=c) ---------------------------------

@pytest.mark.parametrize("sinks", [False, True])
def test_module_soft_capping_output_weights_and_gradient(sinks):
    """The local method's cap (with and without sinks): the output and need_weights equal the float64
    reference's softmax over capped scores; the gradient reaches the projections; bad caps raise."""
    from linattn.nn import MultiheadAttention

    torch.manual_seed(0)
    m = MultiheadAttention(16, 2, method="local", window=4, softcap=0.8, sinks=sinks, batch_first=True,
                           dtype=torch.float64)
    assert "softcap=0.8" in repr(m.core)
    x = torch.randn(2, 20, 16, dtype=torch.float64) * 3
    projected = torch.nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias).detach()
    q, k, v = (t.reshape(2, 20, 2, 8).transpose(1, 2) for t in projected.chunk(3, -1))
    out, weights = m(x, x, x, need_weights=True, average_attn_weights=False)
    visible = linattn.window_mask(20, 20, 4)
    scores = 0.8 * torch.tanh(q @ k.transpose(-1, -2) / 8 ** 0.5 / 0.8)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks:
        sink = m.core.sinks.detach().view(1, 2, 1, 1).expand(2, 2, 20, 1)
        expected_weights = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        expected_weights = torch.softmax(scores, -1)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)
    expected = m.out_proj((expected_weights @ v).transpose(1, 2).reshape(2, 20, 16))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert m.in_proj_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        MultiheadAttention(16, 2, method="local", softcap=-1.0)
