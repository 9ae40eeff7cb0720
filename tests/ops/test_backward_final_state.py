"""The linear-attention backward handed the forward's final state (linear_attn_bwd's
final_state argument, which autograd passes for non-causal calls): every query saw that state,
so the backward uses it instead of recomputing it from the keys. It must give what the
recomputing backward gives, in every implementation (CPU kernel, sequential and sequence-
parallel; device-generic; fused block program; the packed variable-length operator), and a
causal backward must not read it."""
import pytest
import torch

BACKWARDS = ["linear_attn_bwd", "linear_attn_bwd_generic", "linear_attn_bwd_fused"]
FORWARDS = {"linear_attn_bwd": "linear_attn_fwd", "linear_attn_bwd_generic": "linear_attn_fwd_generic",
            "linear_attn_bwd_fused": "linear_attn_fwd_fused"}


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def call(name, B, H, Tq, Tk, m, dv, causal, with_initial, with_mask, dtype=torch.float32, feature_map=1):
    g = torch.Generator().manual_seed(Tq + 11 * Tk + 5 * with_initial + 3 * with_mask)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(B, H, Tq, m, generator=g).to(dtype)
    k = torch.randn(B, H, Tk, m, generator=g).to(dtype)
    v = torch.randn(B, H, Tk, dv, generator=g).to(dtype)
    initial = torch.rand(B, H, m, dv + 1, generator=g).to(acc) if with_initial else None
    mask = None
    if with_mask:
        mask = torch.rand(B, Tk, generator=g) < 0.25
        mask[:, 0] = False
    forward = getattr(torch.ops.linattn, FORWARDS[name])
    out, final_state, normalizer = forward(q, k, v, initial, mask, feature_map, causal, True, 1e-6)
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    grad_final = torch.randn(final_state.shape, generator=g).to(acc)
    backward = getattr(torch.ops.linattn, name)

    def run(final):
        return backward(grad_out, grad_final, q, k, v, out, normalizer, initial, mask, feature_map, causal,
                        True, final)
    return run, final_state


@pytest.mark.parametrize("name", BACKWARDS)
@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_non_causal_reuse_equals_recompute(name, with_initial, with_mask):
    run, final_state = call(name, 2, 3, 37, 29, 8, 6, False, with_initial, with_mask)
    for got, expected, what in zip(run(final_state), run(None), ("dq", "dk", "dv", "d_initial")):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=lambda m, w=what: f"{name} {w}: {m}")


@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_causal_reuse_in_sequence_parallel_kernel(threads, n_threads, dtype):
    """B·H = 1 below the thread count: the CPU kernel cuts the sequence into segments."""
    torch.set_num_threads(n_threads)
    run, final_state = call("linear_attn_bwd", 1, 1, 2311, 2311, 24, 19, False, True, True, dtype)
    for got, expected in zip(run(final_state), run(None)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKWARDS)
def test_causal_backward_does_not_read_final_state(name):
    run, final_state = call(name, 1, 2, 45, 45, 8, 5, True, True, False)
    garbage = torch.full_like(final_state, float("nan"))
    for got, expected in zip(run(garbage), run(None)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", BACKWARDS)
def test_bad_final_state_is_refused(name):
    run, final_state = call(name, 1, 2, 9, 9, 4, 3, False, False, False)
    with pytest.raises(RuntimeError, match=r"final_state must have shape \[1, 2, 4, 4\]"):
        run(final_state[..., :3])
    with pytest.raises(RuntimeError, match=r"final_state must be Float for Float inputs, got Double"):
        run(final_state.double())


@pytest.mark.parametrize("name", BACKWARDS)
def test_opcheck_with_final_state(name):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, T, d, generator=g) for T, d in ((13, 4), (11, 4), (11, 3)))
    forward = getattr(torch.ops.linattn, FORWARDS[name])
    out, final_state, normalizer = forward(q, k, v, None, None, 1, False, True, 1e-6)
    torch.library.opcheck(getattr(torch.ops.linattn, name).default,
                          (torch.randn_like(out), None, q, k, v, out, normalizer, None, None, 1, False, True,
                           final_state))


def test_returned_state_may_be_changed_in_place():
    """The state handed to the caller is not the tensor autograd saved for the backward."""
    import linattn

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g).requires_grad_() for _ in range(3))
    expected = torch.autograd.grad(linattn.linear_attention(q, k, v).sum(), (q, k, v))
    out, (S, z) = linattn.linear_attention(q, k, v, output_final_state=True)
    S.mul_(0.5)
    z.add_(1.0)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("in_parallel", [False, True])
def test_varlen_reuse_equals_recompute(causal, in_parallel):
    """linear_attn_bwd with cu_seqlens: each sequence's final state; many short sequences run as
    parallel (sequence, head) items, a few long ones one after another."""
    lengths = [5, 0, 17, 9, 30, 1] * 4 if in_parallel else [700, 3, 1300]
    g = torch.Generator().manual_seed(len(lengths))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total, H, m, dv = int(cu[-1]), 2, 6, 5
    q, k = (torch.randn(1, H, total, m, generator=g) for _ in range(2))
    v = torch.randn(1, H, total, dv, generator=g)
    initial = torch.rand(len(lengths), H, m, dv + 1, generator=g)
    out, final_state, normalizer = torch.ops.linattn.linear_attn_fwd(q, k, v, initial, None, 1, causal, True, 1e-6,
                                                                     None, cu)
    grad_out = torch.randn(out.shape, generator=g)
    grad_final = torch.randn(final_state.shape, generator=g)

    def run(final):
        return torch.ops.linattn.linear_attn_bwd(grad_out, grad_final, q, k, v, out, normalizer, initial, None, 1,
                                                 causal, True, final, None, cu)
    handed = final_state if not causal else torch.full_like(final_state, float("nan"))  # causal: not read
    for got, expected in zip(run(handed), run(None)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"final_state must have shape"):
        run(final_state[:1])


def test_varlen_returned_state_may_be_changed_in_place():
    import linattn

    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 11, 4, generator=g).requires_grad_() for _ in range(3))
    expected = torch.autograd.grad(linattn.linear_attention(q, k, v, cu_seqlens=cu).sum(), (q, k, v))
    out, (S, z) = linattn.linear_attention(q, k, v, cu_seqlens=cu, output_final_state=True)
    S.mul_(0.5)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
