"""The delta rule's tensor-core backward (csrc/delta_rule/fused_backward.h: the forward kernel
re-walks the state, tensor_core/backward_walk.h walks its gradient in reverse, the products
parallel over chunks are batched).

delta_rule_bwd_fused is delta_rule_fwd_fused's gradient; on CPU tensors its kernels run through
the warp-operation layer's emulation. Each test counts the mma instructions the backward executed,
so a test cannot pass on another path; the oracle is autograd through the float64 per-token
recurrence (reference.delta_rule)."""

import pytest
import torch

import linattn
from linattn import ops, reference
from linattn.delta_rule import l2_normalize
from conftest import assert_close, assert_tensor_cores_without_local_memory, compiled_kernel_rows

FWD = torch.ops.linattn.delta_rule_fwd_fused.default
BWD = torch.ops.linattn.delta_rule_bwd_fused.default
HALF_TYPES = [torch.bfloat16, torch.float16]
# As the forward's (test_delta_rule_tensor_core.py): the walks round T, W's factors, u, du and the
# states' copies to the inputs' 16 bits before each tensor-core product.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
NAMES = ("q", "k", "v", "beta", "log_gate", "initial_state")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mma_count():
    return int(torch.ops.linattn._warp_emulation_counters()[0])


def make(B, H, T, dk, dv, dtype, seed=0, gated=True, state=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, dk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    beta = torch.rand(B, H, T, generator=g).to(dtype)
    gate = (-torch.rand(B, H, T, generator=g) * 0.3).to(dtype) if gated else None
    S0 = torch.randn(B, H, dk, dv, generator=g) if state else None
    d_out = torch.randn(B, H, T, dv, generator=g).to(dtype)
    d_final = torch.randn(B, H, dk, dv, generator=g)
    return (q, k, v, beta, gate, S0), d_out, d_final


def fused_gradients(inputs, d_out, d_final, causal=True, scale=None, normalize_qk=True):
    """delta_rule_bwd_fused's gradients, asserting that the tensor cores' emulation ran them."""
    q = inputs[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    torch.ops.linattn._reset_warp_emulation_counters()
    grads = BWD(d_out, d_final, *inputs, None, causal, scale, normalize_qk)
    assert mma_count() > 0, "the tensor-core backward did not run"
    return grads


def reference_gradients(inputs, d_out, d_final, causal=True, scale=None, normalize_qk=True):
    """Autograd through the float64 recurrence: dL for L = <out, d_out> + <final state, d_final>."""
    leaves = [None if t is None else t.double().requires_grad_() for t in inputs]
    q, k, v, beta, gate, S0 = leaves
    if normalize_qk:
        q, k = l2_normalize(q), l2_normalize(k)
    out, S = reference.delta_rule(q, k, v, beta, gate=gate, scale=scale, initial_state=S0, causal=causal)
    loss = (out * d_out.double()).sum() + (S * d_final.double()).sum()
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, wanted))
    return [None if t is None else next(grads) for t in leaves]


def check(inputs, d_out, d_final, tol, **options):
    got = fused_gradients(inputs, d_out, d_final, **options)
    want = reference_gradients(inputs, d_out, d_final, **options)
    q, _, v, beta = inputs[:4]
    assert got[0].dtype == q.dtype and got[2].shape == v.shape and got[3].dtype == beta.dtype
    assert got[5].dtype == torch.float32
    for name, a, b in zip(NAMES, got, want):
        if b is not None:
            assert_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("T", [1, 15, 64, 65, 130])
def test_matches_the_recurrence_around_the_chunk(dtype, causal, gated, T):
    inputs, d_out, d_final = make(2, 3, T, 32, 48, dtype, seed=T, gated=gated)
    check(inputs, d_out, d_final, TOL[dtype], causal=causal)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("dk, dv", [(8, 24), (64, 64), (65, 63), (128, 128), (100, 130), (16, 200)])
def test_head_dims_and_value_tiles(dtype, dk, dv):
    inputs, d_out, d_final = make(1, 2, 77, dk, dv, dtype, seed=dk + dv)
    check(inputs, d_out, d_final, TOL[dtype])


@pytest.mark.parametrize("causal", [True, False])
def test_without_normalisation_state_or_scale(causal):
    inputs, d_out, d_final = make(1, 2, 100, 16, 16, torch.bfloat16, seed=3, state=False)
    q, k = (t / 4 for t in inputs[:2])  # unnormalised keys: keep ‖k‖² β < 2 (a contracting recurrence)
    inputs = (q, k) + inputs[2:]
    check(inputs, d_out, d_final, TOL[torch.bfloat16], causal=causal, normalize_qk=False, scale=0.5)


def test_strided_inputs_and_no_final_state_gradient():
    inputs, d_out, _ = make(2, 2, 70, 32, 32, torch.bfloat16, seed=4)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in inputs[:3])  # (B, T, H, D) memory
    inputs = (q, k, v) + inputs[3:]
    zeros = torch.zeros(2, 2, 32, 32)
    torch.ops.linattn._reset_warp_emulation_counters()
    got = BWD(d_out, None, *inputs, None, True, 32 ** -0.5, True)
    assert mma_count() > 0
    want = reference_gradients(inputs, d_out, zeros, scale=32 ** -0.5)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, TOL[torch.bfloat16], f"grad {name}")


def test_long_half_precision_sequence_stays_finite():
    inputs, d_out, d_final = make(1, 1, 1500, 64, 64, torch.float16, seed=5)
    grads = fused_gradients(inputs, d_out, d_final)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences_match_the_recurrence_per_sequence(dtype, causal):
    """cu_seqlens (an empty sequence included, lengths across chunk boundaries): one call, the
    sequences' chunks end to end; each sequence's gradients are those of its own recurrence from
    its own state."""
    inputs, d_out, _ = make(1, 2, 200, 32, 24, dtype, seed=10)
    bounds = [0, 70, 70, 135, 200]
    cu = torch.tensor(bounds, dtype=torch.int32)
    g = torch.Generator().manual_seed(11)
    S0, d_final = (torch.randn(4, 2, 32, 24, generator=g) for _ in range(2))
    torch.ops.linattn._reset_warp_emulation_counters()
    got = BWD(d_out, d_final, *inputs[:5], S0, cu, causal, 0.25, True)
    assert mma_count() > 0
    assert torch.equal(got[5][1], d_final[1])  # the empty sequence: its state's gradient passes through
    for n in (0, 2, 3):
        a, b = bounds[n], bounds[n + 1]
        piece = [t[:, :, a:b] for t in inputs[:5]] + [S0[n:n + 1]]
        want = reference_gradients(piece, d_out[:, :, a:b], d_final[n:n + 1], causal=causal, scale=0.25)
        for name, x, y in zip(NAMES, got, want):
            x = x[n:n + 1] if name == "initial_state" else x[:, :, a:b]
            assert_close(x, y, TOL[dtype], f"sequence {n} grad {name}")


def test_calls_it_does_not_take_run_the_cpu_kernel():
    """float32 (and key dims above 128) run delta_rule_bwd (no mma), with its exact results."""
    inputs, d_out, d_final = make(1, 2, 90, 16, 16, torch.float32, seed=6)
    wide = make(1, 1, 20, 130, 8, torch.bfloat16, seed=6)
    for args in [(d_out, d_final, *inputs, None, True, 0.25, True),
                 (wide[1], wide[2], *wide[0], None, True, 0.25, True)]:
        torch.ops.linattn._reset_warp_emulation_counters()
        got = BWD(*args)
        assert mma_count() == 0
        want = torch.ops.linattn.delta_rule_bwd(*args)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_bad_gradients_are_rejected_by_name():
    inputs, d_out, _ = make(1, 1, 10, 16, 16, torch.bfloat16, seed=7)
    with pytest.raises(RuntimeError, match="grad_out"):
        BWD(d_out[..., :8], None, *inputs, None, True, 0.25, True)
    with pytest.raises(RuntimeError, match="grad_final_state"):
        BWD(d_out, torch.zeros(1, 1, 16, 16, dtype=torch.float64), *inputs, None, True, 0.25, True)


def test_the_public_function_trains_through_the_fused_backend():
    """delta_rule_attention under the fused backend: the forward and the backward both run on the
    tensor cores, and the gradients are those of the CPU kernel's path to bf16 precision."""
    inputs, d_out, _ = make(1, 2, 70, 32, 16, torch.bfloat16, seed=8)
    leaves = [t.clone().requires_grad_() for t in inputs]
    with ops.fused_implementation():
        out, S = linattn.delta_rule_attention(*leaves[:4], gate=leaves[4], initial_state=leaves[5],
                                              output_final_state=True)
        torch.ops.linattn._reset_warp_emulation_counters()
        fused_grads = torch.autograd.grad((out * d_out).sum() + S.sum(), leaves)
    assert mma_count() > 0, "the backward did not run on the tensor cores"
    plain = [t.clone().requires_grad_() for t in inputs]
    out2, S2 = linattn.delta_rule_attention(*plain[:4], gate=plain[4], initial_state=plain[5], output_final_state=True)
    plain_grads = torch.autograd.grad((out2 * d_out).sum() + S2.sum(), plain)
    for name, a, b in zip(NAMES, fused_grads, plain_grads):
        assert_close(a, b.double(), TOL[torch.bfloat16], f"grad {name}")


def test_opcheck_and_compile():
    inputs, d_out, d_final = make(1, 2, 33, 16, 16, torch.bfloat16, seed=9)
    args = (d_out, d_final, *inputs, None, True, 0.25, True)
    torch.library.opcheck(BWD, args, test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v, beta, gate, S0):
        with ops.fused_implementation():
            return linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)

    def gradients(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, S = fn(*leaves)
        return torch.autograd.grad((out.float() * d_out).sum() + S.sum(), leaves)

    eager = gradients(f)
    torch.ops.linattn._reset_warp_emulation_counters()
    compiled = gradients(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert mma_count() > 0
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_cubins_hold_tensor_core_instructions_and_no_local_memory():
    """The compiled backward walks (sm_80 and sm_90, both dtypes, DK = 64 and 128, gates per token and
    per key channel) use mma.sync and no local memory."""
    assert_tensor_cores_without_local_memory(compiled_kernel_rows("delta-bwd"), 2 * 2 * 2 * 2)


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, H, T, dk, dv", [(2, 3, 1, 32, 24), (2, 3, 131, 32, 24), (1, 2, 77, 128, 128),
                                             (2, 4, 300, 64, 64)])
def test_cuda_backward_matches_the_recurrence(dtype, causal, B, H, T, dk, dv):
    inputs, d_out, d_final = make(B, H, T, dk, dv, dtype, seed=T)
    cuda = [None if t is None else t.cuda() for t in inputs]
    got = BWD(d_out.cuda(), d_final.cuda(), *cuda, None, causal, dk ** -0.5, True)
    want = reference_gradients(inputs, d_out, d_final, causal=causal, scale=dk ** -0.5)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a.cpu(), b, TOL[dtype], f"grad {name}")


@needs_gpu
def test_cuda_backward_equals_emulation():
    """The GPU and its CPU emulation run the same kernel source: equal up to the order of fp32
    additions inside an mma (and the GPU's fast exp)."""
    inputs, d_out, d_final = make(2, 4, 333, 64, 64, torch.bfloat16, seed=21)
    emulated = fused_gradients(inputs, d_out, d_final, scale=0.125)
    cuda = [None if t is None else t.cuda() for t in inputs]
    got = BWD(d_out.cuda(), d_final.cuda(), *cuda, None, True, 0.125, True)
    for name, a, b in zip(NAMES, got, emulated):
        assert_close(a.cpu(), b.double(), 2e-3, f"grad {name}")
