"""ALiBi in the restricted softmax (flash-attn's `alibi_slopes`; the operator's argument): every
score gets −slope·|i + T_k − T_q − j|, slopes (H,) or (B, H) float32, after the soft cap and before
any bias, no gradient for the slopes. Every engine — the CPU kernel, the device-generic kernels
(window tiles, global rows, layout tiles shared and per head) and the flash engine (its emulation,
mma counted) — against float64 softmax with the same terms, forward and backward; gradcheck,
opcheck, compile; the public functions and their checks."""
import pytest
import torch

import linattn
from linattn.flash_attn_compat import flash_attn_func
from linattn.ops.restricted import Pattern
from conftest import TOLERANCE, assert_close
from test_flash_backward import assert_gpu_backward_matches_emulation
from test_flash_forward import HALF_TYPES, make, reference_forward
from test_softcap import SCALE, check_flash_engine, check_float64, patterns


def slopes(B, H, per_batch=False, seed=0):
    """ALiBi's geometric slopes (per batch entry, scaled differently), float32."""
    base = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float32)
    if not per_batch:
        return base
    return base * torch.tensor([1.0, 0.5])[:B, None]


def with_terms(pattern, alibi, softcap=None, bias_dtype=None):
    fields = {**pattern.__dict__, "alibi_slopes": alibi}
    if softcap is not None:
        fields["softcap"] = softcap
    if bias_dtype is not None and pattern.bias is not None:
        fields["bias"] = pattern.bias.to(bias_dtype)
    return Pattern(**fields)


@pytest.mark.parametrize("suffix", ["", "_generic"])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("name", list(patterns(8, 1)))
def test_float64_equals_softmax_with_alibi(suffix, per_batch, name):
    """out, lse and the gradients of q, k, v and the bias equal float64 autograd through softmax with
    ALiBi's terms (and the soft cap, on every other case), to 1e-10 / 1e-9."""
    T, H = 37, 2
    cap = 1.5 if per_batch else 0.0
    pattern = with_terms(patterns(T, H)[name], slopes(2, H, per_batch), softcap=cap)
    q, k, v = (t.requires_grad_() for t in make(2, H, T, T, 16, 12, torch.float64, seed=4))
    bias = pattern.bias.clone().requires_grad_() if pattern.bias is not None else None
    pattern = Pattern(**{**pattern.__dict__, "bias": bias})
    ref_out = check_float64(getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix), q, k, v, pattern)
    without = reference_forward(q, k, v, SCALE, Pattern(**{**pattern.__dict__, "alibi_slopes": None}))[0]
    assert (without - ref_out).abs().max() > 0.05  # the slopes matter here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal", "layout, bias, shared-QK positions"])
def test_cpu_kernel_in_lower_precision(dtype, name):
    T, H = 150, 2
    pattern = with_terms(patterns(T, H)[name], slopes(2, H, True), bias_dtype=dtype)
    q, k, v = make(2, H, T, T, 16, 12, dtype, seed=6)
    out, _ = torch.ops.linattn.restricted_softmax_fwd(q, k, v, SCALE, *pattern.op_args())
    assert_close(out, reference_forward(q, k, v, SCALE, pattern)[0], TOLERANCE[dtype], "out")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(patterns(8, 1)))
def test_flash_engine_forward_and_backward(dtype, name):
    pattern = with_terms(patterns(150, 2)[name], slopes(2, 2, name == "causal"), softcap=0.0, bias_dtype=dtype)
    check_flash_engine(pattern, dtype)


def test_gradcheck_opcheck_and_compile():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    alibi = slopes(1, 2)
    for suffix in ("", "_generic"):
        op = getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix)
        assert torch.autograd.gradcheck(
            lambda q, k, v: op(q, k, v, SCALE, *Pattern(window=(3, 1), alibi_slopes=alibi).op_args()), (q, k, v))
    x = [t.detach().float().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.linattn.restricted_softmax_fwd.default,
                          (*x, SCALE, *Pattern(causal=True, alibi_slopes=alibi).op_args()))

    def call(q, k, v):
        return linattn.sliding_window_attention(q, k, v, 3, causal=True, alibi_slopes=alibi)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(call, fullgraph=True)(*x), call(*x))


def test_public_functions_and_flash_attn_compat():
    T = 41
    q, k, v = make(2, 4, T, T, 16, 8, torch.float64, seed=10)
    alibi = slopes(2, 4, per_batch=True)
    out = linattn.sliding_window_attention(q, k, v, 6, causal=True, alibi_slopes=alibi)
    expected = reference_forward(q, k, v, 16 ** -0.5, Pattern(window=(6, 0), causal=True, alibi_slopes=alibi))[0]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    layout = linattn.functional.block_local_layout(T, 8, previous=True)
    out = linattn.functional.block_sparse_attention(q, k, v, layout, 8, alibi_slopes=alibi)
    expected = reference_forward(q, k, v, 16 ** -0.5, Pattern(layout=layout, block_size=8, alibi_slopes=alibi))[0]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # flash-attn's layout, grouped-query heads, bottom-right alignment with more keys than queries.
    qf = q[:, :, :29].transpose(1, 2)
    kf, vf = (t[:, :2].transpose(1, 2) for t in (k, v))
    got = flash_attn_func(qf, kf, vf, causal=True, alibi_slopes=alibi)
    kx, vx = (t[:, :2].repeat_interleave(2, 1) for t in (k, v))
    expected = reference_forward(q[:, :, :29], kx, vx, 16 ** -0.5, Pattern(causal=True, alibi_slopes=alibi))[0]
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_bad_slopes_are_refused_naming_them():
    q, k, v = make(2, 3, 5, 5, 4, 4, torch.float32)
    with pytest.raises(TypeError, match="alibi_slopes must be a float32 tensor, got torch.float64"):
        linattn.sliding_window_attention(q, k, v, 2, alibi_slopes=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(H=3,\) or \(B=2, H=3\), got \(4,\)"):
        linattn.functional.block_sparse_attention(q, k, v, torch.ones(1, 1, 1, dtype=torch.bool), 5,
                                                  alibi_slopes=torch.ones(4))
    for suffix in ("", "_generic", "_fused"):
        with pytest.raises(RuntimeError, match=r"alibi_slopes must have shape \(H=3\) or \(B=2, H=3\)"):
            getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix)(
                q, k, v, 1.0, *Pattern(alibi_slopes=torch.ones(2, 2)).op_args())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["causal", "global tokens and padding", "layout, bias, shared-QK positions"])
def test_cuda_kernels_match_emulation_and_reference(name):
    T, H = 333, 2
    pattern = with_terms(patterns(T, H)[name], slopes(2, H, True), softcap=0.0, bias_dtype=torch.bfloat16)
    q, k, v = make(2, H, T, T, 64, 64, torch.bfloat16, seed=3)
    out, _ = assert_gpu_backward_matches_emulation(q, k, v, 0.125, pattern)
    assert_close(out, reference_forward(q, k, v, 0.125, pattern)[0], TOLERANCE[torch.bfloat16], "GPU vs float64")
