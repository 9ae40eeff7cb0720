"""linattn.linear_attention_step: one decoding step of causal linear attention (the RNN form).
Token by token it must give what the whole-sequence operator gives (outputs and final state),
and with decay or gates what the float64 decayed reference gives; gradients for every input,
compile equality and clear errors."""
import pytest
import torch

import linattn
from linattn import reference

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def inputs(B=2, H=3, T=13, D=7, dv=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    return q, k, v


def run_steps(q, k, v, state=None, **kwargs):
    gate = kwargs.pop("gate", None)
    outs = []
    for t in range(q.shape[2]):
        step_gate = None if gate is None else gate[:, :, t]
        out, state = linattn.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, gate=step_gate, **kwargs)
        outs.append(out)
    return torch.stack(outs, 2), state


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature_map,normalize", [("elu", True), ("relu", True), ("identity", False)])
@pytest.mark.parametrize("with_state", [False, True])
def test_steps_equal_the_causal_operator(dtype, feature_map, normalize, with_state, implementation):
    q, k, v = inputs(dtype=dtype)
    state = None
    if with_state:
        g = torch.Generator().manual_seed(5)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        state = (torch.randn(2, 3, 7, 5, generator=g).to(acc), torch.rand(2, 3, 7, generator=g).to(acc) + 1)
    out, (S, z) = run_steps(q, k, v, state, feature_map=feature_map, normalize=normalize)
    whole, (S_w, z_w) = linattn.linear_attention(q, k, v, causal=True, feature_map=feature_map, normalize=normalize,
                                                 initial_state=state, output_final_state=True)
    torch.testing.assert_close(out.float(), whole.float(), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(S, S_w, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(z, z_w, rtol=TOL[dtype], atol=TOL[dtype])
    assert out.dtype == dtype and S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("kind", ["decay", "gate", "both"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_decay_and_gates_against_reference(kind, normalize, dtype, implementation):
    q, k, v = inputs(dtype=dtype, T=17)
    g = torch.Generator().manual_seed(3)
    decay = torch.tensor([1.0, 0.9, 0.5], dtype=dtype) if kind in ("decay", "both") else None
    gate = -torch.rand(2, 3, 17, generator=g).to(dtype) * 2 if kind in ("gate", "both") else None
    state = (torch.randn(2, 3, 7, 5, generator=g).to(dtype), torch.rand(2, 3, 7, generator=g).to(dtype) + 1)
    out, (S, z) = run_steps(q, k, v, state, normalize=normalize, decay=decay, gate=gate)
    log_f = torch.zeros(2, 3, 17, dtype=torch.float64)
    if decay is not None:
        log_f = log_f + decay.double().log().view(1, 3, 1)
    if gate is not None:
        log_f = log_f + gate.double()
    expected, (S_e, z_e) = reference.decayed_linear_attention(q, k, v, log_f, normalize=normalize,
                                                              initial_state=state)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(S.double(), S_e, rtol=tol, atol=tol)
    torch.testing.assert_close(z.double(), z_e, rtol=tol, atol=tol)


def test_reference_without_decay_is_the_plain_reference():
    q, k, v = inputs(dtype=torch.float64)
    out, (S, z) = reference.decayed_linear_attention(q, k, v, torch.zeros(2, 3, 13, dtype=torch.float64))
    plain, (S_p, z_p) = reference.linear_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(S, S_p)
    torch.testing.assert_close(z, z_p)


@pytest.mark.parametrize("feature_map,normalize", [("elu", True), ("relu", True), ("identity", False), ("elu", False)])
def test_gradcheck(feature_map, normalize, implementation):
    q, k, v = (t[:, :, 0].detach().requires_grad_() for t in inputs(dtype=torch.float64))
    if feature_map == "relu":  # keep away from relu's kink, where finite differences disagree
        with torch.no_grad():
            q.add_(q.sign() * 0.1)
            k.add_(k.sign() * 0.1)
    g = torch.Generator().manual_seed(1)
    S = torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=g).requires_grad_()
    z = (torch.rand(2, 3, 7, dtype=torch.float64, generator=g) + 1).requires_grad_()
    decay = torch.tensor([0.9, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
    gate = (-torch.rand(2, 3, dtype=torch.float64, generator=g)).requires_grad_()

    def fn(q, k, v, S, z, decay, gate):
        out, (S2, z2) = linattn.linear_attention_step(q, k, v, (S, z), decay=decay, gate=gate,
                                                      feature_map=feature_map, normalize=normalize)
        return out, S2, z2

    assert torch.autograd.gradcheck(fn, (q, k, v, S, z, decay, gate))
    # Only the output used (no gradient flows into the new state), and the state unused.
    assert torch.autograd.gradcheck(lambda *a: fn(*a)[0], (q, k, v, S, z, decay, gate))
    assert torch.autograd.gradcheck(lambda *a: fn(*a)[1], (q, k, v, S, z, decay, gate))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_factor", [False, True])
def test_opcheck(dtype, with_factor):
    q, k, v = (t[:, :, 0] for t in inputs(dtype=dtype))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S, z = torch.randn(2, 3, 7, 5, dtype=acc), torch.rand(2, 3, 7, dtype=acc) + 1
    factor = torch.rand(2, 3, dtype=acc) if with_factor else None
    grad = dtype == torch.float64
    args = [t.requires_grad_(grad) if t is not None else None for t in (q, k, v, S, z, factor)]
    torch.library.opcheck(torch.ops.linattn.linear_attn_step.default, (*args, 1, True, 1e-6))


def test_callable_feature_map(implementation):
    q, k, v = inputs(dtype=torch.float64)
    square = lambda x: x * x  # noqa: E731
    out, state = run_steps(q, k, v, feature_map=square)
    whole, final = linattn.linear_attention(q, k, v, causal=True, feature_map=square, output_final_state=True)
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(state[0], final[0])


def test_compile_fullgraph_equals_eager(implementation):
    q, k, v = (t[:, :, 0] for t in inputs())
    state = (torch.rand(2, 3, 7, 5), torch.rand(2, 3, 7) + 1)
    decay = torch.tensor([0.9, 0.7, 1.0])

    def step(q, k, v, S, z):
        return linattn.linear_attention_step(q, k, v, (S, z), decay=decay)

    compiled = torch.compile(step, fullgraph=True)
    eager_out, (eager_S, eager_z) = step(q, k, v, *state)
    out, (S, z) = compiled(q, k, v, *state)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(S, eager_S)
    torch.testing.assert_close(z, eager_z)


@pytest.mark.parametrize("call,message", [
    (lambda q, k, v: linattn.linear_attention_step(q[:, :, None], k, v), "q must be a 3-D tensor (B, H, D)"),
    (lambda q, k, v: linattn.linear_attention_step(q, k[..., :3], v), "q and k must have the same shape"),
    (lambda q, k, v: linattn.linear_attention_step(q, k, v, decay=torch.ones(4)), "decay must have shape (3,)"),
    (lambda q, k, v: linattn.linear_attention_step(q, k, v, gate=torch.zeros(2, 3, 1, 1)), "gate must be a 2-D tensor"),
    # (B, H, m) is a per-channel gate, one entry per feature
    (lambda q, k, v: linattn.linear_attention_step(q, k, v, gate=torch.zeros(2, 3, 1)),
     "gate must have shape (2, 3, 7) (B, H, m)"),
    (lambda q, k, v: linattn.linear_attention_step(q, k, v, (torch.zeros(2, 3, 7, 4), torch.zeros(2, 3, 7))),
     "state S must have shape (2, 3, 7, 5)"),
    (lambda q, k, v: linattn.linear_attention_step(q, k, v, feature_map="identity"), "feature_map='identity'"),
])
def test_errors_name_the_argument(call, message):
    q, k, v = (t[:, :, 0] for t in inputs())
    with pytest.raises((ValueError, TypeError)) as info:
        call(q, k, v)
    assert message in str(info.value)
