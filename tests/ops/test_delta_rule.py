"""delta_rule_attention and delta_rule_step (DeltaNet, Gated DeltaNet), docs/methods.md §11: the
CPU chunkwise kernel and the device-generic path (what other devices run, here on CPU tensors)
against the float64 per-token recurrence (reference.delta_rule) forward and backward at odd
lengths around the chunk (64), every dtype, gates and states in and out; chaining, packed
sequences against a per-sequence loop, decoding steps, gradcheck, opcheck, compile, a long
half-precision sequence, flash-linear-attention's reference functions as an independent oracle
when installed, and clear errors."""
import pytest
import torch

import linattn
from linattn import reference
from linattn.delta_rule import l2_normalize

from conftest import assert_close

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make(B=2, H=2, T=70, dk=6, dv=5, dtype=torch.float64, seed=0, gated=True, state=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, dk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    beta = torch.rand(B, H, T, generator=g).to(dtype)
    gate = (-torch.rand(B, H, T, generator=g) * 0.3).to(dtype) if gated else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = torch.randn(B, H, dk, dv, generator=g).to(acc) if state else None
    return q, k, v, beta, gate, S0


def expected(q, k, v, beta, gate, S0, causal=True, scale=None):
    """The recurrence on the normalised q and k the function feeds its operator."""
    qn, kn = l2_normalize(q.double()), l2_normalize(k.double())
    return reference.delta_rule(qn, kn, v, beta, gate=gate, scale=scale, initial_state=S0, causal=causal)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 130])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_matches_the_recurrence_in_float64(implementation, T, causal, gated):
    q, k, v, beta, gate, S0 = make(T=T, gated=gated)
    out, S = linattn.delta_rule_attention(q, k, v, beta, gate=gate, causal=causal, initial_state=S0,
                                          output_final_state=True)
    ref_out, ref_S = expected(q, k, v, beta, gate, S0, causal)
    assert out.shape == v.shape and S.shape == S0.shape and S.dtype == torch.float64
    assert_close(out, ref_out, 1e-12, "out")
    assert_close(S, ref_S, 1e-12, "final state")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_every_gradient_matches_the_recurrence(implementation, dtype, causal):
    q, k, v, beta, gate, S0 = make(T=97, dtype=dtype)
    ins = leaves(q, k, v, beta, gate, S0)
    out, S = linattn.delta_rule_attention(*ins[:4], gate=ins[4], initial_state=ins[5], causal=causal,
                                          output_final_state=True)
    ref = leaves(*(t.double() for t in (q, k, v, beta, gate, S0)))
    ref_out, ref_S = expected(*ref, causal=causal)
    g = torch.Generator().manual_seed(1)
    d_out, d_S = torch.randn(out.shape, generator=g), torch.randn(S.shape, generator=g)
    got = torch.autograd.grad((out.double() * d_out).sum() + (S.double() * d_S).sum(), ins)
    want = torch.autograd.grad((ref_out * d_out).sum() + (ref_S * d_S).sum(), ref)
    assert out.dtype == dtype and all(a.dtype == t.dtype for a, t in zip(got, ins))
    assert_close(out, ref_out, TOL[dtype], "out")
    assert_close(S, ref_S, TOL[dtype], "final state")
    for name, a, b in zip(("q", "k", "v", "beta", "gate", "initial_state"), got, want):
        assert_close(a, b, 2 * TOL[dtype], f"d{name}")


def test_without_gate_or_state_the_gradients_are_none_for_them(implementation):
    q, k, v, beta, _, _ = make(T=20, gated=False, state=False)
    q, k, v, beta = leaves(q, k, v, beta)
    linattn.delta_rule_attention(q, k, v, beta).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, beta))


def test_fla_conventions_scale_and_orientation(implementation):
    """β = 1 and one unit key: the state's row k takes v exactly (the delta rule writes what it
    did not predict), and a query equal to that key reads scale · v back."""
    dk, dv = 4, 3
    k = torch.zeros(1, 1, 2, dk, dtype=torch.float64)
    k[..., 0, 1] = 1.0
    k[..., 1, 1] = 1.0
    v = torch.tensor([[[[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]]]], dtype=torch.float64)
    beta = torch.ones(1, 1, 2, dtype=torch.float64)
    out, S = linattn.delta_rule_attention(k, k, v, beta, scale=1.0, output_final_state=True, normalize_qk=False)
    assert torch.equal(S[0, 0, 1], v[0, 0, 1]) and S[0, 0, [0, 2, 3]].abs().max() == 0
    assert torch.allclose(out[0, 0], v[0, 0])  # each token reads what it just wrote


def test_chaining_states_equals_one_call(implementation):
    q, k, v, beta, gate, S0 = make(T=150, dtype=torch.float32)
    whole, S_whole = linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)
    first, S_mid = linattn.delta_rule_attention(q[:, :, :71], k[:, :, :71], v[:, :, :71], beta[:, :, :71],
                                                gate=gate[:, :, :71], initial_state=S0, output_final_state=True)
    second, S_end = linattn.delta_rule_attention(q[:, :, 71:], k[:, :, 71:], v[:, :, 71:], beta[:, :, 71:],
                                                 gate=gate[:, :, 71:], initial_state=S_mid, output_final_state=True)
    assert_close(torch.cat([first, second], 2), whole, 2e-6, "out")
    assert_close(S_end, S_whole, 2e-6, "state")


def test_decoding_steps_equal_the_chunked_forward(implementation):
    q, k, v, beta, gate, S0 = make(T=70, dtype=torch.float32)
    out, S = linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)
    state = S0
    for t in range(q.shape[2]):
        o_t, state = linattn.delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], state, gate=gate[:, :, t])
        assert_close(o_t, out[:, :, t], 1e-5, f"step {t}")
    assert_close(state, S, 1e-5, "state")


def test_decoding_step_is_differentiable():
    q, k, v, beta, gate, S0 = make(B=1, T=1, dtype=torch.float64)
    args = leaves(q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], S0)
    g = gate[:, :, 0].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: linattn.delta_rule_step(*a, gate=g), args)


def step_by_formula(q, k, v, beta, gate, state, scale):
    """One step from the formula in float64: S' = e^g S, S'' = S' + β k (v − S'ᵀk)ᵀ, out = scale S''ᵀq."""
    q, k, v, beta, S = (t.double() for t in (q, k, v, beta, state))
    if gate is not None:
        S = S * gate.double().exp()[..., None, None]
    predicted = torch.einsum("bhr,bhrc->bhc", k, S)
    S_new = S + k[..., :, None] * (beta[..., None] * (v - predicted))[..., None, :]
    return scale * torch.einsum("bhr,bhrc->bhc", q, S_new), S_new


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
def test_fused_decoding_step_equals_the_formula(dtype, gated):
    """delta_rule_step_fused (the CPU kernel decoding runs) on strided inputs, every dtype."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(3, 5, 2, 33, generator=g, dtype=torch.float64).transpose(1, 2)[:, :, 1] for _ in range(2))
    v = torch.randn(3, 2, 40, generator=g, dtype=torch.float64)[..., ::2]
    q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(3, 2, generator=g, dtype=torch.float64)
    gate = -torch.rand(3, 2, generator=g, dtype=torch.float64) if gated else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = torch.randn(3, 2, 33, 20, generator=g, dtype=torch.float64).to(acc)
    out, S = torch.ops.linattn.delta_rule_step_fused(q.to(dtype), k.to(dtype), v.to(dtype), beta, gate, state, 0.7)
    ref_out, ref_S = step_by_formula(q.to(dtype), k.to(dtype), v.to(dtype), beta, gate, state, 0.7)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert out.dtype == dtype and S.dtype == acc
    assert_close(out, ref_out, tol, "out")
    assert_close(S, ref_S, tol if dtype == torch.float64 else 1e-6, "state")
    torch.library.opcheck(torch.ops.linattn.delta_rule_step_fused.default,
                          (q.to(dtype), k.to(dtype), v.to(dtype), beta, gate, state, 0.7))


def test_decoding_step_runs_the_fused_kernel_only_without_gradients():
    """delta_rule_step on CPU tensors: the fused kernel when no gradient is wanted (counted in the
    profiler), the differentiable ATen formula otherwise; both give the same step."""
    q, k, v, beta, gate, S0 = make(B=2, T=1, dtype=torch.float32)
    args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], S0)

    def fused_calls(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = fn()
        return result, sum(e.name == "linattn::delta_rule_step_fused" for e in prof.events())

    with torch.no_grad():
        (out, S), calls = fused_calls(lambda: linattn.delta_rule_step(*args, gate=gate[:, :, 0]))
    assert calls == 1
    grad_args = [t.clone().requires_grad_() for t in args]
    (out_g, S_g), calls = fused_calls(lambda: linattn.delta_rule_step(*grad_args, gate=gate[:, :, 0]))
    assert calls == 0 and out_g.requires_grad
    assert_close(out, out_g.detach(), 1e-6, "out")
    assert_close(S, S_g.detach(), 1e-6, "state")
    compiled = torch.compile(lambda *a: linattn.delta_rule_step(*a, gate=gate[:, :, 0]), fullgraph=True)
    with torch.no_grad():
        out_c, S_c = compiled(*args)
    assert torch.equal(out_c, out) and torch.equal(S_c, S)


def packed(seed=0, lengths=(5, 0, 64, 71, 1), H=2, dk=6, dv=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k = (torch.randn(1, H, total, dk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(1, H, total, dv, generator=g).to(dtype)
    beta = torch.rand(1, H, total, generator=g).to(dtype)
    gate = (-torch.rand(1, H, total, generator=g) * 0.3).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = torch.randn(len(lengths), H, dk, dv, generator=g).to(acc)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, beta, gate, S0, cu


@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences_equal_a_loop_over_them(implementation, causal):
    q, k, v, beta, gate, S0, cu = packed()
    ins = leaves(q, k, v, beta, gate, S0)
    out, S = linattn.delta_rule_attention(*ins[:4], gate=ins[4], initial_state=ins[5], cu_seqlens=cu, causal=causal,
                                          output_final_state=True)
    (out.sum() + S.square().sum()).backward()
    loop = leaves(q, k, v, beta, gate, S0)
    outs, states = [], []
    for n in range(len(cu) - 1):
        a, b = cu[n].item(), cu[n + 1].item()
        o, s = linattn.delta_rule_attention(*(t[:, :, a:b] for t in loop[:5][:4]), gate=loop[4][:, :, a:b],
                                            initial_state=loop[5][n:n + 1], causal=causal, output_final_state=True)
        outs.append(o)
        states.append(s)
    out_loop, S_loop = torch.cat(outs, 2), torch.cat(states, 0)
    (out_loop.sum() + S_loop.square().sum()).backward()
    assert_close(out, out_loop, 1e-12, "out")
    assert_close(S, S_loop, 1e-12, "states")
    for name, a, b in zip(("q", "k", "v", "beta", "gate", "initial_state"), ins, loop):
        assert_close(a.grad, b.grad, 1e-12, f"d{name}")


def test_gradcheck(implementation):
    q, k, v, beta, gate, S0 = make(B=1, H=1, T=9, dk=3, dv=2)
    args = leaves(q, k, v, beta, gate, S0)

    def f(q, k, v, beta, gate, S0):
        return linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradcheck(lambda *a: f(*a)[0].tanh(), args)


@pytest.mark.parametrize("name", ["delta_rule_fwd", "delta_rule_fwd_generic"])
def test_opcheck(name):
    q, k, v, beta, gate, S0 = make(T=67, dtype=torch.float32)
    args = [t.requires_grad_() for t in leaves(q, k, v, beta, gate, S0)]
    op = getattr(torch.ops.linattn, name)
    torch.library.opcheck(op, (*args[:4], args[4], args[5], None, True, 0.5))
    torch.library.opcheck(op, (*args[:4], None, None, None, False, 0.5))
    torch.library.opcheck(op, (*args[:4], args[4], args[5], None, True, 0.5, True))  # normalize_qk in the kernel
    torch.library.opcheck(op, (*args[:4], None, None, None, False, 0.5, True))
    channel_gate = (gate.unsqueeze(-1) * torch.linspace(0.5, 2.0, q.shape[-1])).requires_grad_()  # KDA
    torch.library.opcheck(op, (*args[:4], channel_gate, args[5], None, True, 0.5))
    torch.library.opcheck(op, (*args[:4], channel_gate, None, None, False, 0.5, True))
    pq, pk, pv, pb, pg, pS, cu = packed(dtype=torch.float32)
    torch.library.opcheck(op, (pq, pk, pv, pb, pg, pS.requires_grad_(), cu, True, 0.5))


@pytest.mark.parametrize("gates", ["per token", "per key channel"])
def test_compile_fullgraph_equals_eager(implementation, gates):
    q, k, v, beta, gate, S0 = make(T=80, dtype=torch.float32)
    if gates == "per key channel":  # KDA (test_delta_rule_channel_gates.py tests the rest)
        gate = gate.unsqueeze(-1) * torch.linspace(0.5, 2.0, q.shape[-1])

    def f(q, k, v, beta, gate, S0):
        out, S = linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)
        return out.square().sum() + S.sum()

    eager_args, compiled_args = leaves(q, k, v, beta, gate, S0), leaves(q, k, v, beta, gate, S0)
    eager = f(*eager_args)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(*compiled_args)
    compiled.backward()
    assert_close(compiled, eager, 1e-6, "loss")
    for a, b in zip(compiled_args, eager_args):
        assert_close(a.grad, b.grad, 1e-5, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_half_precision_sequence_stays_finite_and_close(dtype):
    q, k, v, beta, gate, _ = make(B=1, H=2, T=4096, dk=16, dv=16, dtype=torch.float32, state=False)
    v = v * 100  # large values: the state is float32, only inputs and outputs are half
    low = [t.to(dtype) for t in (q, k, v, beta, gate)]
    ins = leaves(*low)
    out = linattn.delta_rule_attention(*ins[:4], gate=ins[4])
    out.float().square().mean().backward()
    full = linattn.delta_rule_attention(*(t.float() for t in low[:4]), gate=low[4].float())
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in ins)
    assert_close(out, full, TOL[dtype], "out")


def test_matches_flash_linear_attention_reference_functions():
    naive = pytest.importorskip("fla.ops.delta_rule.naive")
    gated_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    q, k, v, beta, gate, S0 = make(B=2, H=3, T=128, dk=16, dv=8, dtype=torch.float32)
    qn, kn = l2_normalize(q), l2_normalize(k)
    ours = linattn.delta_rule_attention(qn, kn, v, beta, normalize_qk=False)
    theirs, _ = naive.delta_rule_recurrence(qn, kn, v, beta)
    assert_close(ours, theirs, 1e-5, "DeltaNet")
    ours, S = linattn.delta_rule_attention(qn, kn, v, beta, gate=gate, initial_state=S0, normalize_qk=False,
                                           output_final_state=True)
    bthd = lambda x: x.transpose(1, 2)  # fla's gated reference takes (B, T, H, ·)
    theirs, S_theirs = gated_naive.naive_recurrent_gated_delta_rule(
        bthd(qn), bthd(kn), bthd(v), bthd(beta), bthd(gate), initial_state=S0, output_final_state=True)
    assert_close(ours, bthd(theirs), 1e-5, "Gated DeltaNet")
    assert_close(S, S_theirs, 1e-5, "Gated DeltaNet state")


@pytest.mark.parametrize("bad, message", [
    (dict(beta=torch.rand(2, 2, 5)), "beta must have shape"),
    (dict(gate=torch.rand(2, 2, 70, 1)), "log_gate must have shape"),
    (dict(initial_state=torch.zeros(2, 2, 6, 4)), "initial_state must have shape"),
    (dict(cu_seqlens=torch.tensor([0, 70], dtype=torch.int32)), "packed sequences"),
    (dict(v=torch.rand(2, 2, 69, 5, dtype=torch.float64)), "k and v must have the same length"),
])
def test_bad_arguments_raise_naming_them(implementation, bad, message):
    q, k, v, beta, gate, S0 = make(T=70)
    kwargs = dict(v=v, beta=beta, gate=gate, initial_state=S0, cu_seqlens=None) | bad
    with pytest.raises(RuntimeError, match=message):
        linattn.delta_rule_attention(q, k, kwargs.pop("v"), kwargs.pop("beta"), **kwargs)


def test_bad_packing_offsets_raise(implementation):
    q, k, v, beta, gate, S0, cu = packed()
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0 and end at the packed length"):
        linattn.delta_rule_attention(q, k, v, beta, cu_seqlens=cu[:-1])
    with pytest.raises(RuntimeError, match="non-decreasing"):
        linattn.delta_rule_attention(q, k, v, beta, cu_seqlens=torch.tensor([0, 100, 50, cu[-1]], dtype=torch.int32))


@pytest.mark.parametrize("poisoned", ["v", "k", "q"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_later_non_finite_row_never_reaches_earlier_rows(implementation, poisoned, value):
    """Inf or NaN in row 40 of q, k or v (inside the first 64-row chunk): every earlier row's output
    is what it is without row 40 (the per-token recurrence never lets row j reach a row i < j), and
    finite. The chunk's intra-chunk product P·u must leave the masked pairs out rather than
    multiply them by 0 (0 · NaN = NaN)."""
    q, k, v, beta, gate, S0 = make(B=1, H=2, T=70)
    clean = linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0)
    inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    inputs[poisoned][:, :, 40, 1] = value
    out = linattn.delta_rule_attention(inputs["q"], inputs["k"], inputs["v"], beta, gate=gate, initial_state=S0)
    assert torch.isfinite(out[:, :, :40]).all(), "a later row's Inf/NaN reached earlier rows"
    assert_close(out[:, :, :40], clean[:, :, :40], 1e-12, "earlier rows")
    assert not torch.isfinite(out[:, :, 40]).all(), "the poisoned row itself must see its value"
