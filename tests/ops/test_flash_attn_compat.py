"""linattn.flash_attn_compat: flash-attn's flash_attn_func / flash_attn_varlen_func on linattn's
restricted-softmax operator. Against float64 softmax under flash-attn's own definitions (layouts,
bottom-right causal alignment, window_size, softcap, grouped-query heads, the returned logsumexp),
forward and backward; packed sequences each equal to the sequence alone; compile; and the
arguments it refuses, by name (ALiBi: tests/ops/test_alibi.py). (sliding_window_attention's return_lse is checked here too.)"""
import math

import pytest
import torch

import linattn
from linattn import reference
from linattn.flash_attn_compat import flash_attn_func, flash_attn_varlen_func
from linattn.ops.restricted import Pattern


def flash_reference(q, k, v, scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """flash-attn's attention by its definition, float64: (B, T, H, D) layouts, k/v heads each
    serving H / H_k query heads, key j seen by query i when a − left <= j <= a + right with
    a = i + T_k − T_q (causal: right 0); (out, lse (B, H, T_q))."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = window_size
    visible = Pattern(window=(left, 0 if causal else right), causal=causal).dense_mask(q.shape[2], k.shape[2])
    out, lse = reference.masked_softmax_attention(q, k, v, visible, scale, softcap=softcap, return_lse=True)
    return out.transpose(1, 2), lse


def make(B, Tq, Tk, H, Hk, D, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Tq, H, D), (B, Tk, Hk, D), (B, Tk, Hk, D + 3))
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad) for s in shapes]


CASES = {
    "full": dict(),
    "causal": dict(causal=True),
    "causal, more keys than queries": dict(causal=True, lengths=(7, 19)),
    "window (3, 1)": dict(window_size=(3, 1)),
    "causal window, softcap": dict(causal=True, window_size=(4, -1), softcap=0.7),
    "grouped-query heads, scale": dict(heads=(4, 2), softmax_scale=0.3),
    "multi-query, window, softcap": dict(heads=(4, 1), window_size=(2, 5), softcap=1.1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flash_attn_func_is_flash_attns_definition(name):
    options = dict(CASES[name])
    Tq, Tk = options.pop("lengths", (17, 17))
    H, Hk = options.pop("heads", (2, 2))
    q, k, v = make(2, Tq, Tk, H, Hk, 8, seed=1, requires_grad=True)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, **options)
    assert probs is None and out.shape == (2, Tq, H, 11) and lse.shape == (2, H, Tq)
    ref_out, ref_lse = flash_reference(q, k, v, scale=options.get("softmax_scale"), causal=options.get("causal", False),
                                       window_size=options.get("window_size", (-1, -1)),
                                       softcap=options.get("softcap", 0.0))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(2)
    w_out, w_lse = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                         dtype=torch.float64)
    grads = torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), (q, k, v))
    expected = torch.autograd.grad((ref_out * w_out).sum() + (ref_lse * w_lse).sum(), (q, k, v))
    for label, got, want in zip("qkv", grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"grad {label}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attn_func_in_lower_precision(dtype):
    q, k, v = make(2, 40, 40, 4, 2, 16, dtype=dtype, seed=3)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, window_size=(9, 0), softcap=2.0, return_attn_probs=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, _ = flash_reference(q, k, v, causal=True, window_size=(9, 0), softcap=2.0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)


def test_varlen_sequences_each_equal_the_sequence_alone():
    lengths = [5, 1, 12, 7]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    total = sum(lengths)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(total, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(total, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu.clone(), max(lengths), max(lengths), causal=True,
                                         window_size=(3, -1), softcap=0.9, return_attn_probs=True)
    assert out.shape == (total, 4, 8) and lse.shape == (4, total)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone, alone_lse, _ = flash_attn_func(q[None, start:end], k[None, start:end], v[None, start:end], causal=True,
                                              window_size=(3, -1), softcap=0.9, return_attn_probs=True)
        torch.testing.assert_close(out[start:end], alone[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[:, start:end], alone_lse[0], rtol=1e-10, atol=1e-10)


def test_compiles_fullgraph():
    q, k, v = make(1, 33, 33, 4, 2, 8, dtype=torch.float32, seed=5)
    expected = flash_attn_func(q, k, v, causal=True, window_size=(6, 0), softcap=1.5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: flash_attn_func(a, b, c, causal=True, window_size=(6, 0), softcap=1.5),
                             fullgraph=True)
    assert torch.equal(compiled(q, k, v), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_packed_cross_attention_equals_each_pair_alone(dtype):
    """Different query and key offsets (a packed encoder-decoder batch, grouped-query heads): query
    sequence n attends to all of key sequence n, as flash-attn's varlen call does — one empty key
    sequence's queries get 0 and lse −inf; forward and backward against each pair alone in float64."""
    cu_q = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32)  # a sequence without queries
    cu_k = torch.tensor([0, 9, 13, 30, 30], dtype=torch.int32)  # the last without keys
    q, k, v = (t[0].requires_grad_() for t in make(1, 20, 30, 4, 2, 8, dtype=dtype, seed=6))
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 17, softcap=2.0, return_attn_probs=True)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    for (q0, q1), (k0, k1) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
        parts = [t.detach()[None, a:b].double().requires_grad_() for t, (a, b) in ((q, (q0, q1)), (k, (k0, k1)),
                                                                                  (v, (k0, k1)))]
        want, want_lse = flash_reference(*parts, softcap=2.0)
        torch.testing.assert_close(out[q0:q1].double(), want[0], rtol=tol, atol=tol)
        if k1 == k0:
            assert torch.all(out[q0:q1] == 0) and torch.all(lse[:, q0:q1] == float("-inf"))
            continue
        torch.testing.assert_close(lse[:, q0:q1].double(), want_lse[0], rtol=tol, atol=tol)
        if q1 == q0:  # keys no query sees: zero gradients
            assert torch.all(k.grad[k0:k1] == 0) and torch.all(v.grad[k0:k1] == 0)
        else:
            (want[0] * weights[q0:q1]).sum().backward()
            for part, full, (a, b) in zip(parts, (q, k, v), ((q0, q1), (k0, k1), (k0, k1))):
                torch.testing.assert_close(full.grad[a:b].double(), part.grad[0], rtol=tol, atol=tol)


def test_what_it_refuses_is_named():
    q, k, v = make(1, 5, 5, 2, 2, 4)
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):  # (dropout: test_dropout.py)
        flash_attn_func(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="k and v must have the same number of heads, dividing q's 2"):
        flash_attn_func(q, k[:, :, :1].expand(1, 5, 3, 4), v)
    with pytest.raises(TypeError, match="window_size must be a"):
        flash_attn_func(q, k, v, window_size=3)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    packed = [t[0] for t in (q, k, v)]
    other = torch.tensor([0, 3, 5], dtype=torch.int32)
    for options in (dict(causal=True), dict(window_size=(2, 2)), dict(alibi_slopes=torch.ones(2))):
        with pytest.raises(ValueError, match="cross-attention between packed sequences"):
            flash_attn_varlen_func(*packed, cu, other, 3, 3, **options)
    with pytest.raises(ValueError, match="must hold as many sequences"):
        flash_attn_varlen_func(*packed, cu, torch.tensor([0, 5], dtype=torch.int32), 3, 3)
    with pytest.raises(ValueError, match=r"\(cu_seqlens_k\): cu_seqlens must be non-decreasing offsets"):
        flash_attn_varlen_func(*packed, cu, torch.tensor([0, 3, 4], dtype=torch.int32), 3, 3)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(*packed, cu, cu, 3, 3, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"alibi_slopes must be one slope per head \(H,\) in a packed call"):
        flash_attn_varlen_func(*packed, cu, cu, 3, 3, alibi_slopes=torch.ones(2, 2))


def test_sliding_window_attention_returns_the_lse_sinks_included():
    """return_lse: the rows' logsumexp, which with sinks counts the sink's logit too (so that
    e^(score − lse) over keys and sink sums to 1); differentiable."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 11, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sinks = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    out, lse = linattn.sliding_window_attention(q, k, v, 3, sinks=sinks, return_lse=True)
    visible = Pattern(window=(3, 3)).dense_mask(11, 11)
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~visible, -math.inf)
    expected = torch.logsumexp(torch.cat([scores, sinks.view(1, 3, 1, 1).expand(2, 3, 11, 1)], -1), -1)
    torch.testing.assert_close(lse, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, linattn.sliding_window_attention(q, k, v, 3, sinks=sinks), rtol=0, atol=0)
