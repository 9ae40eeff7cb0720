"""The delta rule's fused decoding step on CUDA (csrc/delta_rule/step_kernel.h: a thread per value
column), tested on any machine through its CPU emulation (_delta_rule_step_emulated runs the very
column program each GPU thread runs) against the float64 formula, and on a GPU against both; gates
per head (Gated DeltaNet) or per key channel (KDA)."""
import pytest
import torch

import linattn
from linattn import ops

from conftest import assert_close

EMULATED = torch.ops.linattn._delta_rule_step_emulated.default
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make(B, H, dk, dv, dtype, gated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, dk, generator=g), dim=-1).to(dtype) for _ in range(2))
    v = torch.randn(B, H, dv, generator=g).to(dtype)
    beta = torch.rand(B, H, generator=g).to(dtype)
    channels = (dk,) if gated == "per channel" else ()
    gate = (-torch.rand(B, H, *channels, generator=g)).to(dtype) if gated else None
    state = torch.randn(B, H, dk, dv, generator=g)
    return q, k, v, beta, gate, state


def formula(q, k, v, beta, gate, state, scale):
    """S' = Diag(e^g) S, S'' = S' + β k (v − S'ᵀk)ᵀ, out = scale · S''ᵀ q, in float64."""
    q, k, v, beta, S = q.double(), k.double(), v.double(), beta.double(), state.double()
    if gate is not None:  # (B, H): the whole state; (B, H, dk): row by row
        S = S * (gate.double().exp()[..., None] if gate.dim() == 3 else gate.double().exp()[..., None, None])
    predicted = torch.einsum("bhk,bhkv->bhv", k, S)
    S = S + k[..., :, None] * (beta[..., None] * (v - predicted))[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q, S), S


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [True, False, "per channel"])
@pytest.mark.parametrize("dk, dv", [(1, 1), (16, 16), (37, 129), (128, 128), (64, 300)])
def test_column_program_matches_the_formula(dtype, gated, dk, dv):
    q, k, v, beta, gate, state = make(2, 3, dk, dv, dtype, gated, seed=dk + dv)
    out, new_state = EMULATED(q, k, v, beta, gate, state, 0.7)
    ref_out, ref_state = formula(q, k, v, beta, gate, state, 0.7)
    assert out.dtype == dtype and new_state.dtype == torch.float32 and new_state.is_contiguous()
    assert_close(out, ref_out, TOL[dtype], "out")
    assert_close(new_state, ref_state, 1e-6, "new state")


def test_strided_inputs_and_a_transposed_state():
    q, k, v, beta, gate, state = make(3, 4, 24, 40, torch.bfloat16, seed=5)
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v)]
    state_t = state.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = EMULATED(*strided, beta, gate, state_t, 0.5)
    want = EMULATED(q, k, v, beta, gate, state, 0.5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_equals_the_cpu_kernel_and_refuses_float64():
    q, k, v, beta, gate, state = make(2, 2, 32, 48, torch.float32, seed=6)
    got = EMULATED(q, k, v, beta, gate, state, 1.0)
    want = torch.ops.linattn.delta_rule_step_fused(q, k, v, beta, gate, state, 1.0)
    for a, b in zip(got, want):
        assert_close(a, b.double(), 1e-6, "emulated vs CPU kernel")
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        EMULATED(q.double(), k.double(), v.double(), beta.double(), gate.double(), state.double(), 1.0)
    with pytest.raises(RuntimeError, match="state must be"):
        EMULATED(q, k, v, beta, gate, state.double(), 1.0)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [True, "per channel"])
def test_cuda_kernel_matches_the_formula_and_the_emulation(dtype, gated):
    q, k, v, beta, gate, state = make(4, 8, 128, 200, dtype, gated, seed=7)
    cuda = [t.cuda() for t in (q, k, v, beta, gate, state)]
    out, new_state = torch.ops.linattn.delta_rule_step_fused(*cuda, 0.3)
    ref_out, ref_state = formula(q, k, v, beta, gate, state, 0.3)
    assert_close(out.cpu(), ref_out, TOL[dtype], "out")
    assert_close(new_state.cpu(), ref_state, 1e-6, "new state")
    emulated = EMULATED(q, k, v, beta, gate, state, 0.3)
    assert_close(out.cpu(), emulated[0].double(), TOL[dtype], "GPU vs emulation")


@needs_gpu
def test_the_public_step_takes_the_kernel_under_the_fused_backend():
    """linattn.delta_rule_step on CUDA under the fused backend without gradients: one launch of the
    fused kernel (the profiler sees it), the formula's result; with gradients the formula."""
    q, k, v, beta, gate, state = (t.cuda() for t in make(2, 4, 64, 64, torch.bfloat16, seed=8))
    previous = linattn.cuda_backend()
    linattn.set_cuda_backend("fused")
    try:
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out, S = linattn.delta_rule_step(q, k, v, beta, state, gate=gate)
    finally:
        linattn.set_cuda_backend(previous)
    assert any("delta_rule_step_fused" in e.name for e in prof.events())
    want, S_want = linattn.delta_rule_step(q, k, v, beta, state, gate=gate)
    assert_close(out.cpu(), want.cpu().double(), 1e-2, "out")
    assert_close(S.cpu(), S_want.cpu().double(), 1e-5, "state")
