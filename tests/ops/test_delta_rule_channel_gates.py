"""Gates per key channel in the delta rule (Kimi Delta Attention), docs/methods.md §11:
gate (B, H, T, dk) fades row c of the state by e^{g_tc} before each delta update. The CPU kernel
(split GEMMs in tame chunks, exact pair sums in chunks that fade too far) and the device-generic
path (pairs in recursive halves) against the float64 per-token recurrence, forward and backward, at
odd lengths around the chunk, every dtype, with states in and out; equal gates in every channel
equal the per-token kernel; packed sequences; decoding steps (the ATen formula, the CPU step kernel,
the CUDA step's emulation); the tensor-core operator's float32 fallback; gradcheck, the step's opcheck
(the operators' opcheck and compile: test_delta_rule.py);
flash-linear-attention's naive KDA as an oracle when installed; errors naming the argument."""
import pytest
import torch

import linattn
from linattn import reference
from linattn.delta_rule import l2_normalize

from conftest import assert_close

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make(B=2, H=2, T=70, dk=6, dv=5, dtype=torch.float64, seed=0, strength=0.3, state=True):
    """Inputs with per-channel log-gates −U(0, strength): a strength of 3 makes the 64-row chunks
    fade past e^80 in some channels (the exact pair sums), 0.3 keeps them tame (the split GEMMs)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, dk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    beta = torch.rand(B, H, T, generator=g).to(dtype)
    gate = (-torch.rand(B, H, T, dk, generator=g) * strength).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = torch.randn(B, H, dk, dv, generator=g).to(acc) if state else None
    return q, k, v, beta, gate, S0


def expected(q, k, v, beta, gate, S0, causal=True):
    qn, kn = l2_normalize(q.double()), l2_normalize(k.double())
    return reference.delta_rule(qn, kn, v, beta, gate=gate, initial_state=S0, causal=causal)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def gradients(ins, out, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    d_out, d_S = (torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device) for x in (out, S))
    return torch.autograd.grad((out.double() * d_out).sum() + (S.double() * d_S).sum(),
                               [t for t in ins if t is not None])


def assert_matches_reference(q, k, v, beta, gate, S0, causal, tol, **kwargs):
    ins = leaves(q, k, v, beta, gate, S0)
    out, S = linattn.delta_rule_attention(*ins[:4], gate=ins[4], initial_state=ins[5], causal=causal,
                                          output_final_state=True, **kwargs)
    ref = leaves(*(t.double() if t is not None else None for t in (q, k, v, beta, gate, S0)))
    ref_out, ref_S = expected(*ref, causal=causal)
    assert out.dtype == q.dtype and S.shape == (q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    assert_close(out, ref_out, tol, "out")
    assert_close(S, ref_S, tol, "final state")
    names = [n for n, t in zip(("q", "k", "v", "beta", "gate", "initial_state"), ins) if t is not None]
    for name, a, b, t in zip(names, gradients(ins, out, S), gradients(ref, ref_out, ref_S),
                             [t for t in ins if t is not None]):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert_close(a, b, 2 * tol, f"d{name}")


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 130])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_the_recurrence_in_float64(implementation, T, causal):
    assert_matches_reference(*make(T=T), causal, 1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_every_gradient_matches_the_recurrence(implementation, dtype, causal):
    assert_matches_reference(*make(T=97, dtype=dtype), causal, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunks_fading_past_the_split_take_exact_pair_sums(implementation, dtype):
    """Gates of −U(0, 3) per token: a 64-row chunk spans ~e^96 in a channel, past the split's
    e^80 (CPU kernel: exact pair sums); one channel closing at −40 per token underflows its
    factors to 0 exactly. Forward and backward stay finite and equal the recurrence."""
    q, k, v, beta, gate, S0 = make(T=150, dtype=dtype, strength=3.0)
    gate[..., 2] = -40.0
    assert_matches_reference(q, k, v, beta, gate, S0, True, TOL[dtype])


def test_equal_gates_in_every_channel_equal_the_per_token_gate(implementation):
    q, k, v, beta, gate, S0 = make(T=200, dtype=torch.float32)
    per_token = gate[..., 0]
    ins, ins_token = leaves(q, k, v, beta, per_token.unsqueeze(-1).expand(gate.shape).contiguous(), S0), \
        leaves(q, k, v, beta, per_token, S0)
    out, S = linattn.delta_rule_attention(*ins[:4], gate=ins[4], initial_state=ins[5], output_final_state=True)
    out_t, S_t = linattn.delta_rule_attention(*ins_token[:4], gate=ins_token[4], initial_state=ins_token[5],
                                              output_final_state=True)
    assert_close(out, out_t, 1e-5, "out")
    assert_close(S, S_t, 1e-5, "state")
    grads, grads_t = gradients(ins, out, S), gradients(ins_token, out_t, S_t)
    for name, a, b in zip(("q", "k", "v", "beta"), grads[:4], grads_t[:4]):
        assert_close(a, b, 1e-4, f"d{name}")
    assert_close(grads[4].sum(-1), grads_t[4], 1e-4, "dgate summed over the channels")
    assert_close(grads[5], grads_t[5], 1e-4, "dinitial_state")


def test_packed_sequences_equal_a_loop_over_them(implementation):
    g = torch.Generator().manual_seed(4)
    lengths, H, dk, dv = (5, 0, 64, 71, 1), 2, 6, 5
    total = sum(lengths)
    q, k = (torch.randn(1, H, total, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, H, total, dv, generator=g, dtype=torch.float64)
    beta = torch.rand(1, H, total, generator=g, dtype=torch.float64)
    gate = -torch.rand(1, H, total, dk, generator=g, dtype=torch.float64) * 0.5
    S0 = torch.randn(len(lengths), H, dk, dv, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ins = leaves(q, k, v, beta, gate, S0)
    out, S = linattn.delta_rule_attention(*ins[:4], gate=ins[4], initial_state=ins[5], cu_seqlens=cu,
                                          output_final_state=True)
    (out.sum() + S.square().sum()).backward()
    loop = leaves(q, k, v, beta, gate, S0)
    outs, states = [], []
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        o, s = linattn.delta_rule_attention(*(t[:, :, a:b] for t in loop[:4]), gate=loop[4][:, :, a:b],
                                            initial_state=loop[5][n:n + 1], output_final_state=True)
        outs.append(o)
        states.append(s)
    (torch.cat(outs, 2).sum() + torch.cat(states, 0).square().sum()).backward()
    assert_close(out, torch.cat(outs, 2), 1e-12, "out")
    assert_close(S, torch.cat(states, 0), 1e-12, "states")
    for name, a, b in zip(("q", "k", "v", "beta", "gate", "initial_state"), ins, loop):
        assert_close(a.grad, b.grad, 1e-12, f"d{name}")


def test_decoding_steps_equal_the_chunked_forward(implementation):
    q, k, v, beta, gate, S0 = make(T=70, dtype=torch.float32)
    out, S = linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)
    state = S0
    for t in range(q.shape[2]):
        o_t, state = linattn.delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], state,
                                             gate=gate[:, :, t])
        assert_close(o_t, out[:, :, t], 1e-5, f"step {t}")
    assert_close(state, S, 1e-5, "state")


def step_by_formula(q, k, v, beta, gate, state, scale):
    """S' = Diag(e^g) S, S'' = S' + β k (v − S'ᵀk)ᵀ, out = scale S''ᵀq, in float64."""
    q, k, v, beta, S = (t.double() for t in (q, k, v, beta, state))
    S = S * gate.double().exp()[..., None]
    predicted = torch.einsum("bhr,bhrc->bhc", k, S)
    S_new = S + k[..., :, None] * (beta[..., None] * (v - predicted))[..., None, :]
    return scale * torch.einsum("bhr,bhrc->bhc", q, S_new), S_new


@pytest.mark.parametrize("op", ["delta_rule_step", "delta_rule_step_fused", "_delta_rule_step_emulated"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_every_step_implementation_equals_the_formula(op, dtype):
    """The differentiable ATen step, the CPU step kernel and the CUDA step's column program (its CPU
    emulation; no float64 there), on strided inputs."""
    if op == "_delta_rule_step_emulated" and dtype == torch.float64:
        pytest.skip("the CUDA step kernel takes 16- and 32-bit inputs")
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(3, 5, 2, 33, generator=g, dtype=torch.float64).transpose(1, 2)[:, :, 1] for _ in range(2))
    v = torch.randn(3, 2, 40, generator=g, dtype=torch.float64)[..., ::2]
    q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(3, 2, generator=g, dtype=torch.float64)
    gate = -torch.rand(3, 2, 33, generator=g, dtype=torch.float64) * 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = torch.randn(3, 2, 33, 20, generator=g, dtype=torch.float64).to(acc)
    args = (q.to(dtype), k.to(dtype), v.to(dtype), beta, gate, state, 0.7)
    out, S = getattr(torch.ops.linattn, op)(*args)
    ref_out, ref_S = step_by_formula(*args)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert out.dtype == dtype and S.dtype == acc
    assert_close(out, ref_out, tol, "out")
    assert_close(S, ref_S, tol if dtype == torch.float64 else 1e-6, "state")


def test_decoding_step_is_differentiable_in_the_gate():
    q, k, v, beta, gate, S0 = make(B=1, T=1)
    args = leaves(q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], gate[:, :, 0], S0)
    assert torch.autograd.gradcheck(lambda q, k, v, b, g, s: linattn.delta_rule_step(q, k, v, b, s, gate=g), args)


def test_tensor_core_operator_hands_float32_per_channel_gates_to_the_other_path():
    """delta_rule_fwd_fused / _bwd_fused (here their CPU emulation) take 16-bit inputs (per-channel
    gates too: test_delta_rule_tensor_core_channel_gates.py); float32 runs delta_rule_fwd / _bwd,
    with the same results."""
    q, k, v, beta, gate, S0 = make(B=1, H=2, T=100, dk=16, dv=16, dtype=torch.float32)
    args = (q, k, v, beta, gate, S0, None, True, 0.25, True)
    torch.ops.linattn._reset_warp_emulation_counters()
    fused = torch.ops.linattn.delta_rule_fwd_fused(*args)
    plain = torch.ops.linattn.delta_rule_fwd(*args)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    grad_out = torch.randn_like(fused[0])
    bwd = (grad_out, None, *args[:9], True)
    assert all(torch.equal(a, b) for a, b in zip(torch.ops.linattn.delta_rule_bwd_fused(*bwd),
                                                  torch.ops.linattn.delta_rule_bwd(*bwd)))
    assert int(torch.ops.linattn._warp_emulation_counters()[0]) == 0


def test_gradcheck(implementation):
    args = leaves(*make(B=1, H=1, T=9, dk=3, dv=2, strength=1.0))

    def f(q, k, v, beta, gate, S0):
        return linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)

    assert torch.autograd.gradcheck(f, args)


def test_opcheck_of_the_step_kernel():
    q, k, v, beta, gate, S0 = make(dtype=torch.float32)
    step = (q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], gate[:, :, 0], S0, 0.5)
    torch.library.opcheck(torch.ops.linattn.delta_rule_step_fused.default, step)


def test_matches_flash_linear_attention_naive_kda():
    naive = pytest.importorskip("fla.ops.kda.naive")
    q, k, v, beta, gate, S0 = make(B=2, H=3, T=100, dk=16, dv=8, dtype=torch.float32)
    qn, kn = l2_normalize(q), l2_normalize(k)
    ours, S = linattn.delta_rule_attention(qn, kn, v, beta, gate=gate, initial_state=S0, normalize_qk=False,
                                           output_final_state=True)
    bthd = lambda x: x.transpose(1, 2)  # fla takes (B, T, H, ·)
    theirs, S_theirs = naive.naive_recurrent_kda(bthd(qn), bthd(kn), bthd(v), bthd(gate), bthd(beta),
                                                 initial_state=S0, output_final_state=True)
    assert_close(ours, bthd(theirs), 1e-5, "KDA out")
    assert_close(S, S_theirs, 1e-5, "KDA state")


def test_bad_gate_shapes_raise_naming_them(implementation):
    q, k, v, beta, gate, S0 = make(T=70)
    with pytest.raises(RuntimeError, match=r"log_gate must have shape \[2, 2, 70, 6\] \(B, H, T, dk\)"):
        linattn.delta_rule_attention(q, k, v, beta, gate=gate[..., :5])
    with pytest.raises(RuntimeError, match=r"log_gate must have shape \[2, 2, 6\] \(B, H, dk\)"):
        linattn.delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], gate=gate[:, :, 0, :5])


@needs_gpu
@pytest.mark.parametrize("backend", ["generic", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tensors_match_the_recurrence(backend, dtype):
    """On a GPU: per-channel gates under either CUDA backend (the fused one runs bf16 on the tensor
    cores, float32 on the device-generic path), forward and backward, T = 200 (four chunks), with
    states."""
    q, k, v, beta, gate, S0 = (t.cuda() for t in make(B=2, H=3, T=200, dk=64, dv=32, dtype=dtype))
    previous = linattn.cuda_backend()
    linattn.set_cuda_backend(backend)
    try:
        assert_matches_reference(q, k, v, beta, gate, S0, True, TOL[dtype])
    finally:
        linattn.set_cuda_backend(previous)
