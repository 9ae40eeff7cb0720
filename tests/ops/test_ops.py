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

def _extended_calls():
    """(forward args, grad_final_state) of fading and packed calls, float64."""
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    B, H, T, D, DV = 2, 3, 77, 5, 4
    q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, DV)
    log_decay = -torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.2
    initial = torch.cat([rand(B, H, D, DV), torch.rand(B, H, D, 1, generator=g, dtype=torch.float64) + 1], -1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, 60:] = True
    cu = torch.tensor([0, 9, 9, 40, 77], dtype=torch.int32)
    packed = [t[:1] for t in (q, k, v)]
    packed_initial = torch.cat([rand(4, H, D, DV), torch.rand(4, H, D, 1, generator=g, dtype=torch.float64) + 1], -1)
    calls = {
        "fading": ((q, k, v, initial, mask, 1, True, True, 1e-6, log_decay, None), rand(B, H, D, DV + 1)),
        "fading, identity map, no state": ((q, k, v, None, None, 0, True, False, 1e-6, log_decay, None), None),
        "packed, fading, states": ((*packed, packed_initial, None, 2, True, True, 1e-6, log_decay[:1], cu),
                                   rand(4, H, D, DV + 1)),
        "packed, causal": ((*packed, None, None, 1, True, True, 1e-6, None, cu), None),
        "packed, not causal, states": ((*packed, packed_initial, None, 1, False, True, 1e-6, None, cu),
                                       rand(4, H, D, DV + 1)),
    }
    return calls


@pytest.mark.parametrize("case", list(_extended_calls()))
def test_generic_kernel_runs_fading_and_packing_as_the_cpu_kernel(case):
    """The device-generic kernel (what CUDA tensors run) takes the whole schema: its forward and
    backward operators give the CPU kernel's outputs, final states, normalizers and gradients
    (dL/d cumsum(log_decay) included), in float64."""
    args, grad_final = _extended_calls()[case]
    outputs = {}
    for suffix in ("", "_generic"):
        forward = getattr(torch.ops.linattn, "linear_attn_fwd" + suffix)
        backward = getattr(torch.ops.linattn, "linear_attn_bwd" + suffix)
        out, state, normalizer = forward(*args)
        q, k, v, initial, mask, code, causal, normalize, _, log_decay, cu = args
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        grads = backward(grad_out, grad_final, q, k, v, out, normalizer, initial, mask, code, causal, normalize,
                         None, log_decay, cu)
        outputs[suffix] = (out, state, normalizer, *grads)
    names = ["out", "final_state", "normalizer", "grad_q", "grad_k", "grad_v", "grad_initial", "grad_cumulative"]
    for name, got, want in zip(names, outputs["_generic"], outputs[""]):
        if name == "grad_initial" and args[3] is None:
            continue  # not an input: the kernels may return zeros or nothing
        if want.numel() == 0:
            assert got.numel() == 0, name
            continue
        assert_close(got, want, 1e-9, name)


@pytest.mark.parametrize("case", list(_extended_calls()))
def test_fused_operators_hand_what_tensor_cores_do_not_take_to_the_family_operator(case):
    """The fused operators take the family's whole schema: a fading state runs on tensor cores
    where they take the call (16-bit inputs: tests/ops/test_tensor_core_forward.py); otherwise,
    and for packed sequences, linear_attn_fwd / linear_attn_bwd run it, here in float64: the same
    outputs, states, normalizers and gradients, bit for bit — never refused, never ignored."""
    args, grad_final = _extended_calls()[case]
    outputs = {}
    for suffix in ("", "_fused"):
        out, state, normalizer = getattr(torch.ops.linattn, "linear_attn_fwd" + suffix)(*args)
        q, k, v, initial, mask, code, causal, normalize, _, log_decay, cu = args
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        grads = getattr(torch.ops.linattn, "linear_attn_bwd" + suffix)(
            grad_out, grad_final, q, k, v, out, normalizer, initial, mask, code, causal, normalize, None, log_decay, cu)
        outputs[suffix] = (out, state, normalizer, *grads)
    for got, want in zip(outputs["_fused"], outputs[""]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", list(_extended_calls()))
def test_generic_kernel_opcheck_with_fading_and_packing(case):
    args, _ = _extended_calls()[case]
    args = tuple(a.clone().requires_grad_() if i in (0, 1, 2) else a for i, a in enumerate(args))
    torch.library.opcheck(torch.ops.linattn.linear_attn_fwd_generic.default, args)


@pytest.mark.parametrize("name", ["linear_attn_fwd", "linear_attn_fwd_generic"])
def test_the_operator_checks_its_extensions(name):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    op = getattr(torch.ops.linattn, name)
    with pytest.raises(RuntimeError, match=r"fade a causal state; need causal=True"):
        op(q, k, v, None, None, 1, False, True, 1e-6, -torch.rand(1, 2, 8))
    with pytest.raises(RuntimeError, match=r"with cu_seqlens there is no padding to mask"):
        op(q, k, v, None, torch.zeros(1, 8, dtype=torch.bool), 1, True, True, 1e-6, None,
           torch.tensor([0, 3, 8], dtype=torch.int32))
    # Both extensions at once: a fading state per packed sequence.
    out, state, _ = op(q, k, v, None, None, 1, True, True, 1e-6, -torch.rand(1, 2, 8),
                       torch.tensor([0, 3, 8], dtype=torch.int32))
    assert out.shape == (1, 2, 8, 4) and state.shape == (2, 2, 4, 5)
