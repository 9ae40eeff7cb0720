"""Sequence parallelism of the CPU linear-attention kernel (csrc/linear_attention/
cpu_kernel_impl.h, SequenceParallel): when batch·heads is below the thread count, each
sequence is cut into segments that run on their own threads after a pass of partial states.
It must compute what the sequential kernel computes (one thread), to float rounding, and what
the float64 reference computes: forward, states and gradients, at odd segment lengths, with
padding and initial states, causal and not."""
import pytest
import torch

import linattn
from linattn import reference


@pytest.fixture
def threads():
    """Runs the test body under several thread counts and restores the original."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(q, k, v, causal, mask, initial, dtype, n_threads):
    torch.set_num_threads(n_threads)
    q, k, v = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # states accumulate
    init = None if initial is None else tuple(t.detach().to(state_dtype).requires_grad_() for t in initial)
    out, (S, z) = linattn.linear_attention(q, k, v, causal=causal, key_padding_mask=mask, initial_state=init,
                                           output_final_state=True)
    g_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    loss = (out.double() * g_out).sum() + (S.double() * 0.1).sum() + (z.double() * 0.01).sum()
    inputs = (q, k, v) + (init if init else ())
    grads = torch.autograd.grad(loss, inputs)
    return [out.detach(), S.detach(), z.detach(), *grads]


# Lengths: segments at least 4 chunks (64 causal, 256 not), so these split into 2–4 segments
# of unequal length, last chunks partial.
CASES = [(True, 1, 1, 777), (True, 1, 3, 1290), (False, 1, 1, 2311), (False, 2, 1, 4100)]


@pytest.mark.parametrize("causal,B,H,T", CASES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_initial", [False, True])
def test_segments_equal_sequential_and_reference(threads, causal, B, H, T, with_mask, with_initial):
    g = torch.Generator().manual_seed(T + 7 * with_mask + 3 * with_initial)
    q, k, v = [torch.randn(B, H, T, 24, generator=g) for _ in range(3)]
    v = v[..., :19]  # m ≠ dv
    mask = None
    if with_mask:
        mask = torch.rand(B, T, generator=g) < 0.2
        mask[:, :5] = False
    initial = None
    if with_initial:
        initial = (torch.randn(B, H, 24, 19, generator=g), torch.rand(B, H, 24, generator=g) + 1)
    sequential = run(q, k, v, causal, mask, initial, torch.float32, 1)
    names = ["out", "S", "z", "dq", "dk", "dv", "dS0", "dz0"]
    for n_threads in (2, 3, 4):
        parallel = run(q, k, v, causal, mask, initial, torch.float32, n_threads)
        for name, a, b in zip(names, parallel, sequential):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, n=n_threads, name=name: f"{n} threads, {name}: {m}")
    # and the float64 kernel (segmented too) against the reference
    got = run(q, k, v, causal, mask, initial, torch.float64, 4)
    qd, kd, vd = [t.double().requires_grad_() for t in (q, k, v)]
    init = None if initial is None else tuple(t.double().requires_grad_() for t in initial)
    out, (S, z) = reference.linear_attention(qd, kd, vd, causal=causal, key_padding_mask=mask, initial_state=init)
    g_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    loss = (out * g_out).sum() + (S * 0.1).sum() + (z * 0.01).sum()
    expected = [out, S, z, *torch.autograd.grad(loss, (qd, kd, vd) + (init if init else ()))]
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"float64 {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_segments(threads, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 1, 1000, 32, generator=g) for _ in range(3)]
    sequential = run(q, k, v, True, None, None, dtype, 1)
    parallel = run(q, k, v, True, None, None, dtype, 4)
    for a, b in zip(parallel, sequential):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_deterministic_for_a_thread_count(threads):
    g = torch.Generator().manual_seed(1)
    q, k, v = [torch.randn(1, 1, 3000, 32, generator=g) for _ in range(3)]
    first = run(q, k, v, True, None, None, torch.float32, 3)
    second = run(q, k, v, True, None, None, torch.float32, 3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T", [777, 1290])
@pytest.mark.parametrize("with_initial", [False, True])
def test_fading_state_segments(threads, T, with_initial):
    """Decay and gates: partial states fade across the pieces they are carried over."""
    g = torch.Generator().manual_seed(T)
    q, k, v = [torch.randn(1, 2, T, 16, generator=g) for _ in range(3)]
    decay = torch.tensor([0.999, 0.99])
    gate = -torch.rand(1, 2, T, generator=g) * 0.01
    mask = torch.rand(1, T, generator=g) < 0.1
    initial = (torch.randn(1, 2, 16, 16, generator=g), torch.rand(1, 2, 16, generator=g) + 1) if with_initial else None

    def run_gated(dtype, n_threads):
        torch.set_num_threads(n_threads)
        qq, kk, vv = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        dd, gg = decay.to(dtype).requires_grad_(), gate.to(dtype).requires_grad_()
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        init = None if initial is None else tuple(t.to(state_dtype).requires_grad_() for t in initial)
        out, (S, z) = linattn.linear_attention(qq, kk, vv, causal=True, decay=dd, gate=gg, key_padding_mask=mask,
                                               initial_state=init, output_final_state=True)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        loss = (out.double() * weights).sum() + (S.double() * 0.1).sum() + (z.double() * 0.01).sum()
        grads = torch.autograd.grad(loss, (qq, kk, vv, dd, gg) + (init if init else ()))
        return [out.detach(), S.detach(), z.detach(), *grads]

    names = ["out", "S", "z", "dq", "dk", "dv", "ddecay", "dgate", "dS0", "dz0"]
    sequential = run_gated(torch.float32, 1)
    for n_threads in (2, 4):
        parallel = run_gated(torch.float32, n_threads)
        for name, a, b in zip(names, parallel, sequential):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, n=n_threads, name=name: f"{n} threads, {name}: {m}")
    got = run_gated(torch.float64, 4)
    qd, kd, vd = [t.double().requires_grad_() for t in (q, k, v)]
    dd, gg = decay.double().requires_grad_(), gate.double().requires_grad_()
    init = None if initial is None else tuple(t.double().requires_grad_() for t in initial)
    out, (S, z) = reference.decayed_linear_attention(qd, kd, vd, dd.log().view(1, 2, 1) + gg, key_padding_mask=mask,
                                                     initial_state=init)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    loss = (out * weights).sum() + (S * 0.1).sum() + (z * 0.01).sum()
    expected = [out, S, z, *torch.autograd.grad(loss, (qd, kd, vd, dd, gg) + (init if init else ()))]
    for name, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b.detach(), rtol=1e-8, atol=1e-8, msg=lambda m, name=name: f"float64 {name}: {m}")
