"""Gates per key channel (Kimi Delta Attention) on the delta rule's tensor-core kernels: the
kChannels instances of csrc/delta_rule/tensor_core/forward.h and backward_walk.h (the chunk's G a
matrix, the factors inside the products as operand factors, the pair weights by split mma between
16-row blocks and in fp32 within them).

delta_rule_fwd_fused / _bwd_fused on CPU tensors run them through the warp-operation layer's
emulation; each test counts the mma instructions the emulation executed, so a test cannot pass on
another path. Oracles: the float64 per-token recurrence (reference.delta_rule) and autograd
through it."""

import pytest
import torch

import linattn
from linattn import ops, reference
from linattn.delta_rule import l2_normalize
from conftest import assert_close
from test_delta_rule_tensor_core_backward import reference_gradients

FWD = torch.ops.linattn.delta_rule_fwd_fused.default
BWD = torch.ops.linattn.delta_rule_bwd_fused.default
HALF_TYPES = [torch.bfloat16, torch.float16]
# As the per-token kernels' (test_delta_rule_tensor_core.py), the operand factors adding one more
# 16-bit rounding of K, Q and their pair factors.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
NAMES = ("q", "k", "v", "beta", "log_gate", "initial_state")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mma_count():
    return int(torch.ops.linattn._warp_emulation_counters()[0])


def make(B, H, T, dk, dv, dtype, seed=0, strength=0.3, state=True):
    """Per-channel log-gates −U(0, strength) in fp32 (the kernels read them so)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, dk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    beta = torch.rand(B, H, T, generator=g).to(dtype)
    gate = -torch.rand(B, H, T, dk, generator=g) * strength
    S0 = torch.randn(B, H, dk, dv, generator=g) if state else None
    return q, k, v, beta, gate, S0


def run(q, k, v, beta, gate, S0, causal=True, scale=None, normalize_qk=True, cu_seqlens=None):
    torch.ops.linattn._reset_warp_emulation_counters()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    result = FWD(q, k, v, beta, gate, S0, cu_seqlens, causal, scale, normalize_qk)
    assert mma_count() > 0, "the tensor-core forward did not run"
    return result


def expected(q, k, v, beta, gate, S0, causal=True, scale=None, normalize_qk=True):
    qd, kd = q.double(), k.double()
    if normalize_qk:
        qd, kd = l2_normalize(qd), l2_normalize(kd)
    return reference.delta_rule(qd, kd, v.double(), beta.double(), gate=gate.double(), scale=scale,
                                initial_state=None if S0 is None else S0.double(), causal=causal)


def check(inputs, tol, causal=True, **options):
    out, S = run(*inputs, causal=causal, **options)
    ref_out, ref_S = expected(*inputs, causal=causal, **options)
    assert out.dtype == inputs[0].dtype and out.shape == inputs[2].shape and S.dtype == torch.float32
    assert_close(out, ref_out, tol, "out")
    assert_close(S, ref_S, tol, "final state")


def fused_gradients(inputs, d_out, d_final, causal=True, scale=None, normalize_qk=True, cu_seqlens=None):
    scale = inputs[0].shape[-1] ** -0.5 if scale is None else scale
    torch.ops.linattn._reset_warp_emulation_counters()
    grads = BWD(d_out, d_final, *inputs, cu_seqlens, causal, scale, normalize_qk)
    assert mma_count() > 0, "the tensor-core backward did not run"
    return grads


def check_gradients(inputs, tol, seed=1, **options):
    q, v, S0 = inputs[0], inputs[2], inputs[5]
    g = torch.Generator().manual_seed(seed)
    d_out = torch.randn(v.shape, generator=g).to(v.dtype)
    d_final = torch.randn(q.shape[0], q.shape[1], q.shape[3], v.shape[3], generator=g)
    got = fused_gradients(inputs, d_out, d_final, **options)
    want = reference_gradients(inputs, d_out, d_final, **options)
    assert got[4].shape == inputs[4].shape and got[4].dtype == inputs[4].dtype
    for name, a, b in zip(NAMES, got, want):
        if b is not None:
            assert_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 15, 63, 64, 65, 130])
def test_forward_matches_the_recurrence_around_the_chunk(dtype, causal, T):
    check(make(2, 2, T, 32, 40, dtype, seed=T), TOL[dtype], causal=causal)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("dk, dv", [(8, 24), (64, 64), (65, 63), (100, 70), (128, 130)])
def test_head_dims_in_value_tiles_of_64(dtype, dk, dv):
    """Key dims padded to 64 or 128 (odd ones end on a zero column with G = 0), value dims in
    tiles of 64 columns, a block each (G would not fit beside a tile of 128)."""
    inputs = make(1, 2, 77, dk, dv, dtype, seed=dk + dv)
    for causal in (True, False):
        check(inputs, TOL[dtype], causal=causal)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_strong_gates_underflow_without_overflow(dtype):
    """Gates −U(0, 3) and one channel at −40 a token: the pair factors across blocks underflow to
    0 (no factor exceeds 1, so nothing overflows, float16 included); within a block the pair
    weights take an exponential per channel. Forward and backward."""
    inputs = make(1, 2, 150, 32, 24, dtype, seed=4, strength=3.0)
    inputs[4][:, :, :, 5] = -40.0
    check(inputs, TOL[dtype])
    check_gradients(inputs, 2 * TOL[dtype])


def test_equal_gates_in_every_channel_equal_the_per_token_kernel():
    """A gate the same in every channel is the per-token gate: the two instances agree (up to the
    roundings of their different products)."""
    q, k, v, beta, gate, S0 = make(1, 2, 200, 32, 48, torch.bfloat16, seed=5)
    per_token = gate[..., 0]
    channels = run(q, k, v, beta, per_token.unsqueeze(-1).expand_as(gate).contiguous(), S0)
    tokens = run(q, k, v, beta, per_token, S0)
    for a, b, name in zip(channels, tokens, ("out", "final state")):
        assert_close(a, b.double(), 1.5e-2, name)


def test_without_normalisation_state_or_scale():
    q, k, v, beta, gate, _ = make(2, 2, 150, 64, 32, torch.bfloat16, seed=3)
    q, k = l2_normalize(q), l2_normalize(k)
    for causal in (True, False):
        check((q, k, v, beta, gate, None), TOL[torch.bfloat16], causal=causal, scale=0.7, normalize_qk=False)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences_equal_one_call_per_sequence(causal):
    cu = torch.tensor([0, 15, 15, 100, 230], dtype=torch.int32)
    q, k, v, beta, gate, _ = make(1, 2, 230, 32, 40, torch.bfloat16, seed=10)
    S0 = torch.randn(4, 2, 32, 40, generator=torch.Generator().manual_seed(11))
    out, S = run(q, k, v, beta, gate, S0, causal=causal, cu_seqlens=cu)
    for n in range(4):
        a, b = int(cu[n]), int(cu[n + 1])
        if a == b:
            assert torch.equal(S[n], S0[n])
            continue
        rows = slice(a, b)
        alone = run(q[:, :, rows], k[:, :, rows], v[:, :, rows], beta[:, :, rows], gate[:, :, rows], S0[n:n + 1],
                    causal=causal)
        assert torch.equal(out[:, :, rows], alone[0]) and torch.equal(S[n:n + 1], alone[1])
        ref_out, ref_S = expected(q[:, :, rows], k[:, :, rows], v[:, :, rows], beta[:, :, rows], gate[:, :, rows],
                                  S0[n:n + 1], causal)
        assert_close(out[:, :, rows], ref_out, TOL[torch.bfloat16], f"out of sequence {n}")
        assert_close(S[n:n + 1], ref_S, TOL[torch.bfloat16], f"state of sequence {n}")


def test_sequence_split(monkeypatch):
    """Two heads on many SMs: segments' affine maps with per-channel gates, composed in order."""
    inputs = make(1, 2, 1100, 32, 48, torch.bfloat16, seed=12)
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "2")
    whole = run(*inputs)
    unsplit_mma = mma_count()
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "132")
    split = run(*inputs)
    assert mma_count() > unsplit_mma
    for a, b, name in zip(split, whole, ("out", "final state")):
        assert_close(a, b.double(), 1e-2, f"split vs unsplit {name}")
    check(inputs, TOL[torch.bfloat16])


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_later_non_finite_gate_never_reaches_earlier_rows(value):
    """A non-finite gate in one channel of row 40: the earlier rows are bitwise those with that
    gate at 0, the rows from 40 on and the state NaN (screen_rows)."""
    q, k, v, beta, gate, S0 = make(1, 2, 150, 32, 24, torch.bfloat16, seed=12)
    zeroed = gate.clone()
    zeroed[:, :, 40, 3] = 0.0
    clean, _ = run(q, k, v, beta, zeroed, S0)
    poisoned = gate.clone()
    poisoned[:, :, 40, 3] = value
    out, S = run(q, k, v, beta, poisoned, S0)
    assert torch.equal(out[:, :, :40], clean[:, :, :40])
    assert torch.isnan(out[:, :, 40:]).all() and torch.isnan(S).all()


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 64, 100, 130])
def test_every_gradient_matches_the_recurrence(dtype, causal, T):
    check_gradients(make(1, 2, T, 32, 24, dtype, seed=T), 2 * TOL[dtype], causal=causal)


@pytest.mark.parametrize("dk, dv", [(65, 63), (128, 130)])
def test_gradients_at_wide_heads(dk, dv):
    check_gradients(make(1, 1, 90, dk, dv, torch.bfloat16, seed=dk), 2 * TOL[torch.bfloat16])


def test_packed_gradients_equal_the_recurrence_per_sequence():
    cu = torch.tensor([0, 15, 15, 100, 230], dtype=torch.int32)
    q, k, v, beta, gate, _ = make(1, 2, 230, 32, 40, torch.bfloat16, seed=13)
    S0 = torch.randn(4, 2, 32, 40, generator=torch.Generator().manual_seed(14))
    inputs = (q, k, v, beta, gate, S0)
    g = torch.Generator().manual_seed(15)
    d_out = torch.randn(v.shape, generator=g).to(v.dtype)
    d_final = torch.randn(S0.shape, generator=g)
    got = fused_gradients(inputs, d_out, d_final, cu_seqlens=cu)
    for n in range(4):
        a, b = int(cu[n]), int(cu[n + 1])
        if a == b:  # an empty sequence: its state's gradient passes through
            assert torch.equal(got[5][n], d_final[n])
            continue
        rows = slice(a, b)
        piece = tuple(x[:, :, rows] for x in inputs[:5]) + (S0[n:n + 1],)
        want = reference_gradients(piece, d_out[:, :, rows], d_final[n:n + 1])
        for name, x, y in zip(NAMES[:5], got[:5], want[:5]):
            assert_close(x[:, :, rows], y, 2 * TOL[torch.bfloat16], f"grad {name} of sequence {n}")
        assert_close(got[5][n:n + 1], want[5], 2 * TOL[torch.bfloat16], f"grad initial state of sequence {n}")


def test_the_kda_module_trains_under_the_fused_backend():
    """linattn.nn.MultiheadAttention(method="kda") in bfloat16 runs its forward and backward on the
    tensor cores under the fused backend, close to the CPU kernel's."""
    torch.manual_seed(0)
    module = linattn.nn.MultiheadAttention(64, 2, method="kda", batch_first=True, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 90, 64, dtype=torch.bfloat16)
    mask = torch.ones(90, 90, dtype=torch.bool).triu(1)

    def step():
        module.zero_grad()
        out, _ = module(x, x, x, is_causal=True, need_weights=False, attn_mask=mask)
        out.float().square().mean().backward()
        return out, [p.grad.clone() for p in module.parameters()]

    want, want_grads = step()
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        got, got_grads = step()
    assert mma_count() > 0
    assert_close(got, want.double(), 2e-2, "module output")
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b.double(), 5e-2, "parameter gradient")


def test_opcheck_and_compiled_gradients():
    """Both operators pass opcheck with per-channel gates; forward and backward compiled with
    fullgraph equal eager, the tensor cores running."""
    q, k, v, beta, gate, S0 = make(1, 2, 33, 16, 16, torch.bfloat16, seed=9)
    args = (q, k, v, beta, gate, S0, None, True, 0.25, True)
    torch.library.opcheck(FWD, args, test_utils=("test_schema", "test_faketensor"))
    d_out = torch.randn(1, 2, 33, 16).bfloat16()
    torch.library.opcheck(BWD, (d_out, None, *args[:9], True), test_utils=("test_schema", "test_faketensor"))

    def f(*inputs):
        with ops.fused_implementation():
            return linattn.delta_rule_attention(*inputs[:4], gate=inputs[4], initial_state=inputs[5],
                                                output_final_state=True)

    def gradients(fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, beta, gate, S0)]
        out, S = fn(*leaves)
        return torch.autograd.grad((out.float() * d_out).sum() + S.sum(), leaves)

    eager = gradients(f)
    torch.ops.linattn._reset_warp_emulation_counters()
    compiled = gradients(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert mma_count() > 0
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, H, T, dk, dv", [(2, 3, 1, 32, 24), (2, 3, 131, 32, 24), (1, 2, 300, 128, 128)])
def test_cuda_kernels_match_the_recurrence(dtype, causal, B, H, T, dk, dv):
    inputs = make(B, H, T, dk, dv, dtype, seed=T)
    out, S = FWD(*(x.cuda() for x in inputs), None, causal, dk ** -0.5, True)
    ref_out, ref_S = expected(*inputs, causal=causal)
    assert_close(out.cpu(), ref_out, TOL[dtype], "out")
    assert_close(S.cpu(), ref_S, TOL[dtype], "final state")
    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(inputs[2].shape, generator=g).to(dtype)
    d_final = torch.randn(S.shape, generator=g)
    got = BWD(d_out.cuda(), d_final.cuda(), *(x.cuda() for x in inputs), None, causal, dk ** -0.5, True)
    want = reference_gradients(inputs, d_out, d_final, causal=causal, scale=dk ** -0.5)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a.cpu(), b, 2 * TOL[dtype], f"grad {name}")
