"""The registered operators: opcheck, and torch.compile(fullgraph=True) equal to eager."""
import pytest
import torch

import linattn
from conftest import assert_close

OPS = ["linear_attn_fwd", "linear_attn_fwd_generic"]


def op_args(causal, with_state, dtype=torch.float32, requires_grad=True, feature_map=1, masked=False):
    g = torch.Generator().manual_seed(0)
    B, H, T, m, dv = 2, 3, 37, 8, 6
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(B, H, T, m, generator=g).to(dtype).requires_grad_(requires_grad)
    k = torch.randn(B, H, T, m, generator=g).to(dtype).requires_grad_(requires_grad)
    v = torch.randn(B, H, T, dv, generator=g).to(dtype).requires_grad_(requires_grad)
    state = torch.rand(B, H, m, dv + 1, generator=g).to(acc).requires_grad_(requires_grad) if with_state else None
    mask = (torch.arange(T) >= T - 5).expand(B, T).contiguous() if masked else None
    return (q, k, v, state, mask, feature_map, causal, True, 1e-6)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_forward(name, causal, with_state, dtype):
    op = getattr(torch.ops.linattn, name).default
    torch.library.opcheck(op, op_args(causal, with_state, dtype))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("feature_map", [0, 1, 2])
def test_opcheck_forward_feature_maps_and_mask(name, feature_map):
    op = getattr(torch.ops.linattn, name).default
    torch.library.opcheck(op, op_args(True, False, feature_map=feature_map, masked=True))


@pytest.mark.parametrize("name", ["linear_attn_bwd", "linear_attn_bwd_generic"])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_backward(name, causal):
    q, k, v, state, mask, feature_map, causal, normalize, eps = op_args(causal, True, requires_grad=False,
                                                                        masked=True)
    out, final_state, normalizer = torch.ops.linattn.linear_attn_fwd(
        q, k, v, state, mask, feature_map, causal, normalize, eps)
    grad_out = torch.randn_like(out)
    grad_final = torch.randn_like(final_state)
    op = getattr(torch.ops.linattn, name).default
    for gf in (grad_final, None):
        torch.library.opcheck(
            op, (grad_out, gf, q, k, v, out, normalizer, state, mask, feature_map, causal, normalize))


def _loss_and_grads(fn, q, k, v):
    out, (S, z) = fn(q, k, v)
    loss = out.square().sum() + S.sum() + z.sum()
    return (out, S, z) + torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_matches_eager_dynamic_lengths(causal):
    torch._dynamo.reset()

    def fn(q, k, v):
        return linattn.linear_attention(q, k, v, causal=causal, output_final_state=True)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for T in (33, 64, 101):
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(2, 2, T, 16, generator=g).requires_grad_() for _ in range(3))
        eager = _loss_and_grads(fn, q, k, v)
        got = _loss_and_grads(compiled, q, k, v)
        for a, b in zip(got, eager):
            assert_close(a, b, 1e-6, f"compiled vs eager at T={T}")


def test_compile_with_mask_and_state():
    torch._dynamo.reset()

    def fn(q, k, v, mask, S, z):
        return linattn.linear_attention(q, k, v, causal=True, key_padding_mask=mask, initial_state=(S, z))

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 50, 8, generator=g).requires_grad_() for _ in range(3))
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 30:] = True
    S = torch.randn(2, 2, 8, 8, generator=g).requires_grad_()
    z = torch.rand(2, 2, 8, generator=g).requires_grad_()
    compiled = torch.compile(fn, fullgraph=True)
    eager = fn(q, k, v, mask, S, z)
    got = compiled(q, k, v, mask, S, z)
    assert_close(got, eager, 1e-6, "compiled output")
    ge = torch.autograd.grad(eager.sum(), (q, k, v, S, z))
    gc = torch.autograd.grad(got.sum(), (q, k, v, S, z))
    for a, b in zip(gc, ge):
        assert_close(a, b, 1e-6, "compiled gradient")


# --- one schema for the linear family: plain, fading (log_decay) and packed (cu_seqlens) ---

@pytest.mark.parametrize("name", ["linear_attn_fwd_generic", "linear_attn_fwd_fused"])
def test_plain_implementations_refuse_fading_and_packing(name):
    """The device-generic and fused kernels register under the family's one schema but run the
    plain operator only: a fading state or a packing is refused with a message, never ignored."""
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    op = getattr(torch.ops.linattn, name)
    with pytest.raises(RuntimeError, match=r"neither a fading state \(log_decay\) nor packed sequences"):
        op(q, k, v, None, None, 1, True, True, 1e-6, -torch.rand(1, 2, 8))
    with pytest.raises(RuntimeError, match=r"neither a fading state \(log_decay\) nor packed sequences"):
        op(q, k, v, None, None, 1, True, True, 1e-6, None, torch.tensor([0, 3, 8], dtype=torch.int32))


def test_the_cpu_operator_checks_its_extensions():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    op = torch.ops.linattn.linear_attn_fwd
    with pytest.raises(RuntimeError, match=r"fade a causal state; need causal=True"):
        op(q, k, v, None, None, 1, False, True, 1e-6, -torch.rand(1, 2, 8))
    with pytest.raises(RuntimeError, match=r"with cu_seqlens there is no padding to mask"):
        op(q, k, v, None, torch.zeros(1, 8, dtype=torch.bool), 1, True, True, 1e-6, None,
           torch.tensor([0, 3, 8], dtype=torch.int32))
    # Both extensions at once: a fading state per packed sequence.
    out, state, _ = op(q, k, v, None, None, 1, True, True, 1e-6, -torch.rand(1, 2, 8),
                       torch.tensor([0, 3, 8], dtype=torch.int32))
    assert out.shape == (1, 2, 8, 4) and state.shape == (2, 2, 4, 5)
