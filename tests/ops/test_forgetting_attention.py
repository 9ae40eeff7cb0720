"""The Forgetting Transformer's attention (docs/methods.md §5.1): the restricted-softmax operator's
`forget_cumsum` term (σ·(c_a − c_j) added to each score, σ = −1 past the query's position) in every
engine — the CPU kernel (window and layout patterns), the device-generic kernels (window tiles,
global rows, layout tiles shared and per head) and the flash engine (its emulation: float64 calls
it hands on, bf16 and fp16 it runs) — against float64 autograd through the dense definition,
forward and backward (the gates' gradient included, lse's cotangent too); gradcheck, opcheck,
compile; linattn.forgetting_attention against the reference built from running sums of log f, in
every dtype, packed, grouped-query, decoding; fla's parallel_forgetting_attn / parallel_attn
against fla's own naive reference."""
import pytest
import torch

import linattn
from linattn import reference
from linattn.fla_compat import parallel_attn, parallel_forgetting_attn
from linattn.ops.restricted import Pattern
from conftest import TOLERANCE, assert_close
from test_flash_forward import HALF_TYPES, counters, make, reference_forward
from test_softcap import check_float64 as check_terms_float64

SCALE = 0.3
OPS = {suffix: getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix) for suffix in ("", "_generic", "_fused")}


def cumsum_of(B, H, T, dtype=torch.float64, seed=0, rate=0.3):
    """Cumulative log forget gates: log f ~ −rate·U(0, 2) (a few strong forgets), summed."""
    g = torch.Generator().manual_seed(seed)
    log_f = -rate * 2 * torch.rand(B, H, T, generator=g, dtype=torch.float64)
    log_f[..., ::7] -= 2.0
    return log_f.cumsum(-1).to(dtype)


def decay(c, T_q):
    """σ·(c_a − c_j) (B, H, T_q, T_k) from the cumulative gates, from the definition."""
    T_k = c.shape[-1]
    a = torch.arange(T_q) + (T_k - T_q)
    j = torch.arange(T_k)
    at_a, at_j = c[..., a].unsqueeze(-1), c[..., j].unsqueeze(-2)
    return torch.where(j[None, :] <= a[:, None], at_a - at_j, at_j - at_a)


def patterns(T_q, T_k, H):
    B = 2
    global_mask = torch.zeros(B, T_k, dtype=torch.bool)
    global_mask[0, [2, T_k // 2]] = True
    padding = torch.zeros(B, T_k, dtype=torch.bool)
    padding[1, T_k - T_k // 4:] = True
    seg = torch.sort(torch.randint(0, 3, (B, 1, T_k), generator=torch.Generator().manual_seed(1)), -1).values
    nq, nk = -(-T_q // 8), -(-T_k // 8)
    layout = torch.rand(1, nq, nk, generator=torch.Generator().manual_seed(2)) < 0.6
    per_head = torch.rand(H, nq, nk, generator=torch.Generator().manual_seed(3)) < 0.6
    bias = torch.randn(1, T_q, T_k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cases = {
        "causal": Pattern(causal=True),
        "causal window, capped": Pattern(window=(9, 0), causal=True, softcap=1.5),
        "bidirectional window and padding": Pattern(window=(6, 4), key_padding_mask=padding),
        "causal segments": Pattern(causal=True, q_segments=seg[..., T_k - T_q:], k_segments=seg),
        "layout shared, bias": Pattern(layout=layout, block_size=8, causal=True, bias=bias),
        "layout per head, not causal": Pattern(layout=per_head, block_size=8),
    }
    if T_q == T_k:
        cases["global tokens"] = Pattern(window=(3, 3), global_mask=global_mask)
    return cases


def with_gates(pattern, c):
    return Pattern(**{**pattern.__dict__, "forget_cumsum": c})


def dense_reference(q, k, v, scale, pattern):
    """float64 softmax over the pattern's dense mask with the decay joining its bias."""
    terms = decay(pattern.forget_cumsum, q.shape[2])
    bias = terms if pattern.bias is None else terms + pattern.bias
    return reference_forward(q, k, v, scale, Pattern(**{**pattern.__dict__, "bias": bias, "forget_cumsum": None}))


def check_float64(op, q, k, v, pattern):
    """out, lse and the gradients of q, k, v, the gates (and the bias) equal float64 autograd through the
    dense reference, to 1e-10 / 1e-9, with cotangents of out and lse; the gates take a gradient."""
    ref_out = check_terms_float64(op, q, k, v, pattern, reference=dense_reference)
    out, lse = op(q, k, v, SCALE, *pattern.op_args())
    assert torch.autograd.grad(lse.sum() + out.sum(), pattern.forget_cumsum)[0].abs().max() > 1e-3
    return ref_out


@pytest.mark.parametrize("suffix", ["", "_generic", "_fused"])
@pytest.mark.parametrize("lengths", [(37, 37), (21, 37)])
@pytest.mark.parametrize("name", list(patterns(37, 37, 2)))
def test_float64_equals_the_dense_definition(suffix, lengths, name):
    T_q, T_k = lengths
    H = 2
    cases = patterns(T_q, T_k, H)
    if name not in cases:
        pytest.skip("global tokens need T_q == T_k")
    q, k, v = (t.requires_grad_() for t in make(2, H, T_q, T_k, 16, 12, torch.float64, seed=4))
    c = cumsum_of(2, H, T_k).requires_grad_()
    pattern = with_gates(cases[name], c)
    if pattern.bias is not None:
        pattern = Pattern(**{**pattern.__dict__, "bias": pattern.bias.clone().requires_grad_()})
    ref_out = check_float64(OPS[suffix], q, k, v, pattern)
    without = dense_reference(q, k, v, SCALE, with_gates(pattern, torch.zeros_like(c)))[0]
    assert (without - ref_out).abs().max() > 0.05  # the gates matter here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("suffix", ["", "_generic"])
@pytest.mark.parametrize("name", ["causal window, capped", "layout per head, not causal"])
def test_lower_precision(dtype, suffix, name):
    """fp32 accumulation with float32 gates for every input dtype, forward and backward."""
    T, H = 150, 2
    pattern = patterns(T, T, H)[name]
    q, k, v = (t.requires_grad_() for t in make(2, H, T, T, 16, 12, dtype, seed=6))
    c = cumsum_of(2, H, T, torch.float32, seed=7).requires_grad_()
    pattern = with_gates(pattern, c)
    out, lse = OPS[suffix](q, k, v, SCALE, *pattern.op_args())
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    ref_out, _ = dense_reference(*x64[:3], SCALE, with_gates(pattern, x64[3]))
    assert_close(out, ref_out, TOLERANCE[dtype], "out")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v, c))
    expected = torch.autograd.grad((ref_out * w).sum(), x64)
    for label, got, want in zip("qkvc", grads, expected):
        assert got.dtype == (torch.float32 if label == "c" else dtype)
        assert_close(got, want, 4 * TOLERANCE[dtype], f"grad {label}")


FUSED_FWD = torch.ops.linattn.restricted_softmax_fwd_fused.default
FUSED_BWD = torch.ops.linattn.restricted_softmax_bwd_fused.default


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("lengths", [(150, 150), (70, 150)])
@pytest.mark.parametrize("name", list(patterns(150, 150, 2)))
def test_flash_engine(dtype, lengths, name):
    """The flash engine's forward and backward (its emulation, mma counted) with the gates against
    float64 autograd through the dense definition: out, lse, the gradients of q, k, v, the bias and
    the gates (the key blocks' and query blocks' sums added)."""
    T_q, T_k = lengths
    H = 2
    cases = patterns(T_q, T_k, H)
    if name not in cases or (T_q != T_k and name not in ("causal", "layout shared, bias")):
        pytest.skip("global tokens need T_q == T_k; T_q < T_k on two patterns")
    pattern = with_gates(cases[name], cumsum_of(2, H, T_k, torch.float32, seed=3))
    if pattern.bias is not None:
        pattern = Pattern(**{**pattern.__dict__, "bias": pattern.bias.to(dtype)})
    q, k, v = make(2, H, T_q, T_k, 40, 24, dtype, seed=7)
    torch.ops.linattn._reset_warp_emulation_counters()
    out, lse = FUSED_FWD(q, k, v, SCALE, *pattern.op_args())
    assert counters()["mma"] > 0, "the flash forward did not run"
    g = torch.Generator().manual_seed(11)
    w_out = torch.randn(out.shape, generator=g).to(dtype)
    w_lse = torch.randn(lse.shape, generator=g).masked_fill(torch.isinf(lse), 0)
    torch.ops.linattn._reset_warp_emulation_counters()
    grads = FUSED_BWD(w_out, w_lse, q, k, v, out, lse, SCALE, *pattern.op_args())
    assert counters()["mma"] > 0, "the flash backward did not run"
    terms = {name: t for name in ("bias", "forget_cumsum") if (t := getattr(pattern, name)) is not None}
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, *terms.values())]
    ref_out, ref_lse = dense_reference(*leaves[:3], SCALE, Pattern(**{**pattern.__dict__,
                                                                      **dict(zip(terms, leaves[3:]))}))
    assert_close(out, ref_out, TOLERANCE[dtype], "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite)
    assert_close(lse[finite], ref_lse[finite], 1e-4, "lse")
    loss = (ref_out * w_out.double()).sum() + (torch.where(finite, ref_lse, 0) * w_lse.double()).sum()
    expected = torch.autograd.grad(loss, leaves)
    got = list(grads[:3]) + [grads[3]] * ("bias" in terms) + [grads[4]]
    for label, grad, want in zip(("q", "k", "v", *terms), got, expected):
        assert_close(grad, want, 2 * TOLERANCE[dtype], f"grad {label}")
    assert grads[4].dtype == torch.float32 and expected[-1].abs().max() > 1e-3


def test_cpu_and_generic_agree_on_a_long_causal_window():
    """Many key groups (CPU kernel) and many sliding tiles (generic) over T = 700."""
    T, H = 700, 3
    q, k, v = make(1, H, T, T, 32, 32, torch.float32, seed=9)
    c = cumsum_of(1, H, T, torch.float32, seed=10, rate=0.05)
    pattern = Pattern(window=(200, 0), causal=True, forget_cumsum=c)
    cpu = OPS[""](q, k, v, SCALE, *pattern.op_args())[0]
    generic = OPS["_generic"](q, k, v, SCALE, *pattern.op_args())[0]
    torch.testing.assert_close(cpu, generic, rtol=1e-5, atol=1e-5)


def test_gradcheck_opcheck_and_compile():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    c = cumsum_of(1, 2, 9).requires_grad_()
    for suffix in ("", "_generic"):
        op = OPS[suffix]
        for pattern in (Pattern(causal=True), Pattern(window=(3, 2)),
                        Pattern(layout=torch.ones(1, 3, 3, dtype=torch.bool), block_size=3)):
            assert torch.autograd.gradcheck(
                lambda q, k, v, c: op(q, k, v, SCALE, *with_gates(pattern, c).op_args()), (q, k, v, c))
    x = [t.detach().float().requires_grad_() for t in (q, k, v, c)]
    for pattern in (Pattern(causal=True), Pattern(layout=torch.ones(2, 3, 3, dtype=torch.bool), block_size=3)):
        torch.library.opcheck(torch.ops.linattn.restricted_softmax_fwd.default,
                              (*x[:3], SCALE, *with_gates(pattern, x[3]).op_args()))
    log_f = torch.nn.functional.logsigmoid(torch.randn(1, 2, 9, generator=g))

    def run(q, k, v, log_f):
        return linattn.forgetting_attention(q, k, v, log_f, window=4)

    eager = run(*x[:3], log_f)
    compiled = torch.compile(run, fullgraph=True)(*x[:3], log_f)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_op_refuses_bad_gates():
    q, k, v = make(1, 2, 5, 7, 4, 4, torch.float32)
    op = OPS[""]
    good = cumsum_of(1, 2, 7, torch.float32)
    with pytest.raises(RuntimeError, match=r"forget_cumsum must be Float for Float inputs, got Double"):
        op(q, k, v, SCALE, *Pattern(causal=True, forget_cumsum=good.double()).op_args())
    with pytest.raises(RuntimeError, match=r"forget_cumsum must have shape"):
        op(q, k, v, SCALE, *Pattern(causal=True, forget_cumsum=good[:, :1]).op_args())
    with pytest.raises(RuntimeError, match=r"forget_cumsum needs T_q <= T_k"):
        op(k, q[..., :5, :], q[..., :5, :], SCALE, *Pattern(forget_cumsum=cumsum_of(1, 2, 5, torch.float32)).op_args())
    positions = torch.arange(7).view(1, 1, 7)
    x = make(1, 2, 7, 7, 4, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"does not combine with positions"):
        op(*x, SCALE, *Pattern(layout=torch.ones(1, 1, 1, dtype=torch.bool), block_size=7, positions=positions,
                               forget_cumsum=good).op_args())


# --- linattn.forgetting_attention --------------------------------------------------------------

def inputs(B, H, H_kv, T_q, T_k, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T_q, D, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(B, H_kv, T_k, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    log_f = torch.nn.functional.logsigmoid(torch.randn(B, H, T_k, generator=g, dtype=torch.float64) + 1.5)
    return q, k, v, log_f.to(dtype)


def repeat_heads(x, H):
    return x.repeat_interleave(H // x.shape[1], 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal, window", [(True, -1), (True, 5), (False, (4, 2))])
def test_function_against_the_reference(dtype, causal, window):
    """Outputs and gradients (q, k, v, log f) against float64 autograd through the reference, grouped-query
    heads and key padding included."""
    B, H, H_kv, T, D = 2, 4, 2, 29, 8
    q, k, v, log_f = (t.requires_grad_() for t in inputs(B, H, H_kv, T, T, D, dtype, seed=1))
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, -5:] = True
    out = linattn.forgetting_attention(q, k, v, log_f, causal=causal, window=window, key_padding_mask=padding)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v, log_f)]
    ref = reference.forgetting_attention(x64[0], repeat_heads(x64[1], H), repeat_heads(x64[2], H), x64[3],
                                         causal=causal, window=window, key_padding_mask=padding)
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    assert out.dtype == dtype
    assert_close(out, ref, tol, "out")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v, log_f))
    expected = torch.autograd.grad((ref * w).sum(), x64)
    for label, got, want in zip(("q", "k", "v", "log_forget"), grads, expected):
        assert got.dtype == dtype
        assert_close(got, want, tol if dtype == torch.float64 else 4 * tol, f"grad {label}")


def test_shared_gates_packed_sequences_and_decoding():
    B, H, T, D = 1, 2, 40, 8
    q, k, v, log_f = inputs(B, H, H, T, T, D, torch.float64, seed=3)
    shared = log_f[:, :1]
    torch.testing.assert_close(linattn.forgetting_attention(q, k, v, shared),
                               linattn.forgetting_attention(q, k, v, shared.expand(B, H, T)), rtol=0, atol=0)
    # Packed: each sequence alone, its gates' sums starting afresh, equals its rows of the packed call.
    cu = torch.tensor([0, 11, 11, 30, 40], dtype=torch.int32)
    packed = linattn.forgetting_attention(q, k, v, log_f, cu_seqlens=cu, window=7)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            alone = linattn.forgetting_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], log_f[..., s:e], window=7)
            torch.testing.assert_close(packed[:, :, s:e], alone, rtol=1e-12, atol=1e-12)
    # Decoding: the last 3 queries against the whole cache equal the full call's last rows.
    full = linattn.forgetting_attention(q, k, v, log_f)
    last = linattn.forgetting_attention(q[:, :, -3:], k, v, log_f)
    torch.testing.assert_close(last, full[:, :, -3:], rtol=1e-12, atol=1e-12)


def test_sinks_and_lse():
    q, k, v, log_f = inputs(2, 2, 2, 13, 13, 8, torch.float64, seed=4)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out, lse = linattn.forgetting_attention(q, k, v, log_f, sinks=sinks, return_lse=True)
    ref, ref_lse = reference.forgetting_attention(q, k, v, log_f, return_lse=True)
    torch.testing.assert_close(out, ref * torch.sigmoid(ref_lse - sinks.view(1, -1, 1)).unsqueeze(-1))
    torch.testing.assert_close(lse, torch.logaddexp(ref_lse, sinks.view(1, -1, 1)))


def test_function_refuses_bad_arguments():
    q, k, v, log_f = inputs(1, 2, 2, 6, 6, 4, torch.float32)
    where = "linattn.forgetting_attention"
    with pytest.raises(ValueError, match=rf"{where}: log_forget must have shape \(B=1, H=2 or 1, T_k=6\)"):
        linattn.forgetting_attention(q, k, v, log_f[..., :5])
    with pytest.raises(TypeError, match=rf"{where}: log_forget"):
        linattn.forgetting_attention(q, k, v, log_f.long())
    with pytest.raises(ValueError, match=rf"{where}: the queries are the last T_q of the T_k key positions"):
        linattn.forgetting_attention(q, k[:, :, :4], v[:, :, :4], log_f[..., :4])


# --- flash-linear-attention's interface --------------------------------------------------------

def fla_inputs(B, T, HQ, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g).to(dtype)
    k, v = (torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(2))
    log_f = torch.nn.functional.logsigmoid(torch.randn(B, T, HQ, generator=g) + 2).to(dtype)
    return q, k, v, log_f


@pytest.mark.parametrize("window_size", [None, 6])
def test_fla_functions_against_fla_naive(window_size):
    naive = pytest.importorskip("fla.ops.forgetting_attn.naive")
    q, k, v, g = fla_inputs(2, 33, 4, 2, 16, seed=5)
    want = naive.naive_forgetting_attn(q, k, v, g, window_size=window_size)
    got = parallel_forgetting_attn(q, k, v, g, window_size=window_size)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(parallel_attn(q, k, v, g, window_size=window_size), got, rtol=0, atol=0)


def test_fla_functions_packed_and_plain():
    q, k, v, g = fla_inputs(1, 30, 2, 2, 8, torch.float64, seed=6)
    cu = torch.tensor([0, 12, 30])
    got = parallel_forgetting_attn(q, k, v, g, cu_seqlens=cu)
    for s, e in ((0, 12), (12, 30)):
        alone = parallel_forgetting_attn(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e])
        torch.testing.assert_close(got[:, s:e], alone, rtol=1e-12, atol=1e-12)
    sink = torch.tensor([0.3, -0.2], dtype=torch.float64)
    plain = parallel_attn(q, k, v, window_size=5, sink_bias=sink)
    x = [t.transpose(1, 2) for t in (q, k, v)]
    want = linattn.sliding_window_attention(*x, (4, 0), causal=True, sinks=sink).transpose(1, 2)
    torch.testing.assert_close(plain, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"parallel_forgetting_attn: g must be \(B, T, HQ\)"):
        parallel_forgetting_attn(q, k, v, g[..., :1])
    with pytest.raises(ValueError, match=r"parallel_attn: window_size must be an int >= 1"):
        parallel_attn(q, k, v, window_size=0)
