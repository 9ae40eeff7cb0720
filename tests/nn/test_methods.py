"""Performer, Efficient Attention and Linformer, functional and as MultiheadAttention methods,
against the float64 formulas of docs/methods.md (linattn.reference)."""
import pytest
import torch

import linattn
from linattn import reference
from conftest import TOLERANCE, assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _qkv(B, H, T, D, dtype, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, H, S, D, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _padding(B, S, seed=0, all_padded_row=False):
    mask = torch.rand(B, S, generator=torch.Generator().manual_seed(seed)) < 0.3
    if all_padded_row:
        mask[0] = True
    return mask


def _grads(out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, g.to(out.dtype))


# ---- Performer ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("T,D,m", [(1, 16, 8), (65, 16, 40), (200, 60, 97)])
def test_performer_matches_reference_with_same_features(dtype, causal, kernel, T, D, m, implementation):
    q, k, v = _qkv(2, 3, T, D, dtype)
    # Small inputs keep the unstabilized float64 reference in range.
    with torch.no_grad():
        q.mul_(0.5), k.mul_(0.5)
    W = linattn.random_features(m, D, generator=torch.Generator().manual_seed(1))
    mask = None if causal else _padding(2, T)
    out = linattn.performer_attention(q, k, v, W, causal=causal, kernel=kernel, eps=1e-300, key_padding_mask=mask)
    expected = reference.performer_attention(q, k, v, W, causal=causal, kernel=kernel, key_padding_mask=mask)
    assert out.dtype == dtype
    tol = max(TOLERANCE[dtype], 1e-5) * (3 if dtype != torch.float64 else 1)
    assert_close(out, expected, tol, "output")
    for got, want in zip(_grads(out, (q, k, v)), _grads(expected, (q, k, v))):
        assert_close(got, want, tol * 3, "gradient")


def test_performer_causal_never_sees_later_keys():
    q, k, v = _qkv(1, 2, 130, 32, torch.float32)
    W = linattn.random_features(64, 32, generator=torch.Generator().manual_seed(1))
    out = linattn.performer_attention(q, k, v, W, causal=True)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 100:] *= 30.0  # huge later keys: a sequence-wide max stabilizer would shift every feature
    v2[:, :, 100:] = 1e4
    out2 = linattn.performer_attention(q, k2, v2, W, causal=True)
    assert torch.equal(out[:, :, :100], out2[:, :, :100])


def test_performer_estimates_softmax_attention():
    q, k, v = _qkv(1, 2, 24, 8, torch.float64, seed=4)
    with torch.no_grad():
        q.mul_(0.7), k.mul_(0.7)
    exact = reference.softmax_attention(q, k, v)
    errors = {}
    # The estimate is unbiased per score but has a large variance: its error shrinks like 1/√m.
    for m in (16, 65536):
        W = linattn.random_features(m, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        errors[m] = (linattn.performer_attention(q, k, v, W) - exact).norm().item() / exact.norm().item()
    assert errors[65536] < 0.08, errors
    assert errors[65536] < errors[16] / 5, errors


def test_random_features_are_orthogonal_in_blocks():
    W = linattn.random_features(20, 8, orthogonal=True, scaling="sqrt_d", generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)
    assert W.shape == (20, 8)
    for block in (W[:8], W[8:16], W[16:]):
        gram = block @ block.T
        assert torch.allclose(gram, 8.0 * torch.eye(len(block), dtype=torch.float64), atol=1e-10)
    again = linattn.random_features(20, 8, orthogonal=True, scaling="sqrt_d", generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64)
    assert torch.equal(W, again)


def test_performer_rejects_bad_arguments():
    q, k, v = _qkv(1, 1, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="projection must be"):
        linattn.performer_attention(q, k, v, torch.randn(5, 7))
    with pytest.raises(ValueError, match="kernel must be one of"):
        linattn.performer_attention(q, k, v, torch.randn(5, 8), kernel="cosine")
    with pytest.raises(ValueError, match="nb_features"):
        linattn.random_features(0, 8)


# ---- Efficient Attention ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,S,D", [(1, 1, 16), (63, 65, 16), (64, 200, 60)])
@pytest.mark.parametrize("masked", [False, True])
def test_efficient_matches_reference(dtype, T, S, D, masked, implementation):
    q, k, v = _qkv(2, 3, T, D, dtype, S=S)
    mask = _padding(2, S, all_padded_row=True) if masked else None
    out = linattn.efficient_attention(q, k, v, key_padding_mask=mask)
    expected = reference.efficient_attention(q, k, v, key_padding_mask=mask)
    assert out.dtype == dtype
    tol = max(TOLERANCE[dtype], 1e-5)
    assert_close(out, expected, tol, "output")
    if masked:
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # every key padded: nothing to attend
    for got, want in zip(_grads(out, (q, k, v)), _grads(expected, (q, k, v))):
        assert_close(got, want, tol * 3, "gradient")


def test_efficient_and_performer_gradcheck():
    q, k, v = _qkv(1, 2, 5, 4, torch.float64)
    W = linattn.random_features(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.tensor([[False, True, False, False, True]])
    assert torch.autograd.gradcheck(lambda a, b, c: linattn.efficient_attention(a, b, c, key_padding_mask=mask), (q, k, v))
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            # eps ≈ 0: the detached stabilizers then cancel exactly, as the gradient assumes.
            lambda a, b, c: linattn.performer_attention(a, b, c, W, causal=causal, eps=1e-300), (q, k, v)
        )


def test_compile_fullgraph_matches_eager():
    q, k, v = _qkv(2, 2, 33, 16, torch.float32)
    W = linattn.random_features(24, 16, generator=torch.Generator().manual_seed(0))
    for fn in (
        lambda a, b, c: linattn.performer_attention(a, b, c, W, causal=True),
        lambda a, b, c: linattn.performer_attention(a, b, c, W),
        lambda a, b, c: linattn.efficient_attention(a, b, c),
    ):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        eager_out, compiled_out = fn(q, k, v), compiled(q, k, v)
        assert_close(compiled_out, eager_out, 1e-6, "compiled output")
        for got, want in zip(_grads(compiled_out, (q, k, v)), _grads(eager_out, (q, k, v))):
            assert_close(got, want, 1e-6, "compiled gradient")


def test_causal_performer_state_chains_across_calls():
    q, k, v = _qkv(2, 2, 150, 16, torch.float32, seed=7)
    W = linattn.random_features(40, 16, generator=torch.Generator().manual_seed(0))
    whole = linattn.performer_attention(q, k, v, W, causal=True)
    first, state = linattn.performer_attention(q[:, :, :61], k[:, :, :61], v[:, :, :61], W, causal=True,
                                               output_final_state=True)
    rest = linattn.performer_attention(q[:, :, 61:], k[:, :, 61:], v[:, :, 61:], W, causal=True, initial_state=state)
    assert_close(torch.cat([first, rest], dim=2), whole, 1e-5, "chained")
    with pytest.raises(ValueError, match="need causal=True"):
        linattn.performer_attention(q, k, v, W, output_final_state=True)
