"""The operators' autograd lives in C++ (csrc/*/autograd.cpp, the Autograd dispatch key): every
differentiable operator has a C++ node, calls that need no graph get none, second derivatives
raise for every family, and gradients that only some outputs receive are right. Numerics of the
gradients themselves are tested per family (gradcheck in their own files)."""
import pytest
import torch

import linattn

# Each forward operator with a small valid call (inputs requiring grad first).
def _linear():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return (q, k, v), lambda: torch.ops.linattn.linear_attn_fwd(q, k, v, None, None, 1, True, True, 1e-6)


def _generic():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return (q, k, v), lambda: torch.ops.linattn.linear_attn_fwd_generic(q, k, v, None, None, 1, False, True, 1e-6)


def _fused():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return (q, k, v), lambda: torch.ops.linattn.linear_attn_fwd_fused(q, k, v, None, None, 1, True, True, 1e-6)


def _decayed():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    log_decay = (-torch.rand(1, 2, 9, dtype=torch.float64)).requires_grad_()
    return (q, k, v, log_decay), lambda: torch.ops.linattn.linear_attn_fwd(
        q, k, v, None, None, 1, True, True, 1e-6, log_decay)


def _varlen():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    log_decay = (-torch.rand(1, 2, 9, dtype=torch.float64)).requires_grad_()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    return (q, k, v, log_decay), lambda: torch.ops.linattn.linear_attn_fwd(
        q, k, v, None, None, 1, True, True, 1e-6, log_decay, cu)


def _step():
    q, k, v = (torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    S = torch.rand(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    z = torch.rand(1, 2, 4, dtype=torch.float64, requires_grad=True)
    return (q, k, v, S, z), lambda: torch.ops.linattn.linear_attn_step(q, k, v, S, z, None, 1, True, 1e-6)


def _step_generic():
    inputs, _ = _step()
    return inputs, lambda: torch.ops.linattn.linear_attn_step_generic(*inputs, None, 1, True, 1e-6)


def _window():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return (q, k, v), lambda: torch.ops.linattn.restricted_softmax_fwd(q, k, v, 0.5, 2, 0)


def _block_sparse():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    layout = torch.ones(1, 3, 3, dtype=torch.bool)
    return (q, k, v), lambda: torch.ops.linattn.restricted_softmax_fwd(q, k, v, 0.5, causal=True, layout=layout, block_size=4)


def _flash():
    """The restricted-softmax flash engine (bf16: the engine's emulation, forward and backward)."""
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return (q, k, v), lambda: torch.ops.linattn.restricted_softmax_fwd_fused(q, k, v, 0.5, 2, 0)


OPERATORS = {"linear": _linear, "generic": _generic, "fused": _fused, "decayed": _decayed, "varlen": _varlen,
             "step": _step, "step_generic": _step_generic, "window": _window, "block_sparse": _block_sparse,
             "flash": _flash}


@pytest.mark.parametrize("name", OPERATORS)
def test_the_backward_node_is_a_cpp_function(name):
    _, call = OPERATORS[name]()
    out = call()[0]
    assert out.requires_grad
    # torch.library's Python autograd would make a Python node (BackwardCFunction).
    assert type(out.grad_fn).__name__ == "CppFunction", type(out.grad_fn)
    assert "linattn::" in out.grad_fn.name()


@pytest.mark.parametrize("name", OPERATORS)
def test_no_graph_is_recorded_without_grad_mode(name):
    _, call = OPERATORS[name]()
    with torch.no_grad():
        outputs = call()
    assert all(t.grad_fn is None and not t.requires_grad for t in outputs)


@pytest.mark.parametrize("name", [n for n in OPERATORS if not n.startswith("step")])
def test_second_derivatives_raise(name):
    inputs, call = OPERATORS[name]()
    out = call()[0]
    (grad,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
    assert grad.requires_grad
    with pytest.raises(RuntimeError, match=r"second derivatives \(double backward\) are not implemented"):
        grad.sum().backward()


def test_the_step_has_second_derivatives():
    """The step's backward is ATen ops, so its gradient is itself differentiable."""
    def step(q, k, v, S, z):
        out, S_new, z_new = torch.ops.linattn.linear_attn_step(q, k, v, S, z, None, 1, True, 1e-6)
        return out.square().sum() + S_new.sum() + z_new.square().sum()

    inputs, _ = _step()
    torch.autograd.gradgradcheck(step, inputs)


@pytest.mark.parametrize("name", ["decayed", "varlen"])
def test_gradient_of_the_final_state_alone(name):
    """Only the final state reaches the loss: the backward gets no output gradient, and the
    gradients equal those of the same loss through the float64 per-token recurrence."""
    inputs, call = OPERATORS[name]()
    q, k, v, log_decay = inputs
    final_state = call()[1]
    weights = torch.randn_like(final_state)
    grads = torch.autograd.grad((final_state * weights).sum(), (k, v, log_decay))

    def recurrence(k, v, log_decay, starts):
        phi_k = torch.nn.functional.elu(k) + 1
        values = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        states = []
        for begin, end in zip(starts[:-1], starts[1:]):
            state = phi_k.new_zeros(phi_k.shape[0], phi_k.shape[1], phi_k.shape[3], values.shape[3])
            for t in range(begin, end):
                state = state * log_decay[:, :, t, None, None].exp() + phi_k[:, :, t, :, None] * values[:, :, t, None]
            states.append(state)
        return torch.cat(states, dim=0)

    starts = [0, 4, 9] if name == "varlen" else [0, 9]
    expected = torch.autograd.grad((recurrence(k, v, log_decay, starts) * weights).sum(), (k, v, log_decay))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("feature_map", [0, 1, 2])
@pytest.mark.parametrize("with_factor", [False, True])
def test_the_generic_step_equals_the_cpu_kernel(feature_map, with_factor):
    """linear_attn_step's ATen formulation (what non-CPU devices run) against its CPU kernel,
    outputs and gradients, in float64."""
    inputs, _ = _step()
    factor = torch.rand(1, 2, dtype=torch.float64, requires_grad=True) if with_factor else None
    results = []
    for op in (torch.ops.linattn.linear_attn_step, torch.ops.linattn.linear_attn_step_generic):
        out, S_new, z_new = op(*inputs, factor, feature_map, feature_map != 0, 1e-6)
        loss = out.square().sum() + (S_new * S_new.detach()).sum() + z_new.sum()
        wrt = inputs + ((factor,) if with_factor else ())
        results.append((out, S_new, z_new) + torch.autograd.grad(loss, wrt))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
