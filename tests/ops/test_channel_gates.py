"""linear_attention(..., causal=True, gate=(B, H, T, m)): one log-gate per token and feature channel
(GLA), docs/methods.md §1. The CPU kernel (chunk_kernel.h: the pairs' weights split through each
channel's midpoint, exact pair sums where a chunk fades too far) and the device-generic formulation
every other device runs (fading_generic.cpp: the chunk's pairs in halves), both checked on CPU tensors
against the float64 dense reference (reference.decayed_linear_attention) at odd sizes across chunk
boundaries, in every dtype; against the per-token gates' kernel (equal gates in every channel),
per-sequence calls of a packing and flash-linear-attention's reference; one sequence split over the
threads; gradcheck, opcheck, compile, gates strong enough to overflow any factorization through a
chunk start (forward and backward), and clear errors. The gradients of every input against the
reference and the token-by-token step are in test_decayed_linear_attention.py, with the per-token
gates'."""
import contextlib

import pytest
import torch

import linattn
from linattn import ops, reference

IMPLEMENTATIONS = {"kernel": contextlib.nullcontext, "generic": ops.generic_implementation}

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}


def make(B=2, H=3, T=70, D=6, dv=5, dtype=torch.float32, seed=0, strength=0.5):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    gate = (-torch.rand(B, H, T, D, generator=g) * strength).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = (torch.randn(B, H, D, dv, generator=g).to(acc), (torch.rand(B, H, D, generator=g) + 1).to(acc))
    mask = torch.rand(B, T, generator=g) < 0.15
    return q, k, v, gate, state, mask


def log_factors(decay, gate):
    """float64 (B, H, T, m) log factors: log γ per head plus the per-channel gates."""
    log_f = gate.double()
    return log_f if decay is None else log_f + decay.double().log().view(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_and_state_match_reference(dtype, T, with_decay, impl):
    q, k, v, gate, state, mask = make(T=T, dtype=dtype)
    decay = torch.tensor([1.0, 0.97, 0.6], dtype=dtype) if with_decay else None
    with IMPLEMENTATIONS[impl]():
        out, (S, z) = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate, initial_state=state,
                                               key_padding_mask=mask, output_final_state=True)
    assert out.dtype == dtype
    expected, (S_e, z_e) = reference.decayed_linear_attention(q, k, v, log_factors(decay, gate),
                                                              initial_state=state, key_padding_mask=mask)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(S.double(), S_e, rtol=tol, atol=tol)
    torch.testing.assert_close(z.double(), z_e, rtol=tol, atol=tol)


def test_feature_map_changing_the_width():
    # A callable map doubles the width: the gate has one entry per feature, m = 2D.
    q, k, v, _, state, _ = make(T=77)
    gate = -torch.rand(2, 3, 77, 12, generator=torch.Generator().manual_seed(3))

    def phi(x):
        return torch.cat([torch.relu(x), torch.relu(-x)], -1) + 0.1

    out = linattn.linear_attention(q, k, v, causal=True, gate=gate, feature_map=phi)
    expected, _ = reference.decayed_linear_attention(q, k, v, gate.double(), feature_map=phi)
    torch.testing.assert_close(out.double(), expected, rtol=3e-5, atol=3e-5)


def test_gradcheck():
    q, k, v, gate, state, _ = make(B=1, H=2, T=70, D=3, dv=2, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, gate, state[0], state[1])]

    def fn(q, k, v, gate, S0, z0):
        out, (S, z) = linattn.linear_attention(q, k, v, causal=True, gate=gate, initial_state=(S0, z0),
                                               output_final_state=True)
        return out, S, z

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("T", [200, 4100, 16500])  # chunks of 64, 128 and 256 rows
def test_equal_channels_equal_the_per_token_kernel(T):
    # The same gate in every channel is a per-token gate: the CPU kernel's chunked scan, a separate
    # implementation, must agree (forward, state, and the gate's gradient summed over channels).
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, T, 4, generator=g) for _ in range(2))
    v = torch.randn(1, 2, T, 3, generator=g)
    gate = -torch.rand(1, 2, T, generator=g) * 0.05
    per_token = gate.clone().requires_grad_()
    per_channel = gate.unsqueeze(-1).expand(1, 2, T, 4).clone().requires_grad_()
    a, (S_a, _) = linattn.linear_attention(q, k, v, causal=True, gate=per_token, output_final_state=True)
    b, (S_b, _) = linattn.linear_attention(q, k, v, causal=True, gate=per_channel, output_final_state=True)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S_b, S_a, rtol=1e-4, atol=1e-4)
    weights = torch.randn(a.shape, generator=g)
    (d_token,) = torch.autograd.grad((a * weights).sum(), per_token)
    (d_channel,) = torch.autograd.grad((b * weights).sum(), per_channel)
    torch.testing.assert_close(d_channel.sum(-1), d_token, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_strong_gates_stay_finite_and_exact(impl):
    # Channels closing by up to e^-40 per token inside a chunk (e^{b_first − b_last} would be e^2500)
    # next to channels that barely fade: no factorization through one reference row survives this.
    # The chunks of the first 64 tokens fade gently (the kernel's split products), the others hard
    # (its exact pair sums); the generic formulation's halves take both.
    q, k, v, _, state, _ = make(T=200, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    strong = (torch.rand(2, 3, 1, 6, generator=g) < 0.5) & (torch.arange(200) >= 64)[:, None]
    gate = torch.where(strong, -40.0 * torch.rand(2, 3, 200, 6, generator=g),
                       -0.2 * torch.rand(2, 3, 200, 6, generator=g)).double()
    inputs = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    weights = torch.randn(2, 3, 200, 5, generator=g, dtype=torch.float64)
    expected, (S_e, _) = reference.decayed_linear_attention(*inputs, initial_state=state)
    expected_grads = torch.autograd.grad((expected * weights).sum() + S_e.sum(), inputs)
    for dtype in (torch.float64, torch.float32):
        cast = [t.detach().to(dtype).requires_grad_() for t in inputs]
        with IMPLEMENTATIONS[impl]():
            out, (S, _) = linattn.linear_attention(*cast[:3], causal=True, gate=cast[3],
                                                   initial_state=tuple(s.to(dtype) for s in state),
                                                   output_final_state=True)
            grads = torch.autograd.grad((out * weights.to(dtype)).sum() + S.sum(), cast)
        tol = TOL[dtype]
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(S.double(), S_e, rtol=tol, atol=tol)
        for name, x, y in zip(("q", "k", "v", "gate"), grads, expected_grads):
            torch.testing.assert_close(x.double(), y, rtol=100 * tol, atol=100 * tol,
                                       msg=lambda m, name=name: f"{dtype} d{name}: {m}")


def test_one_sequence_split_over_the_threads():
    # B·H = 1 below the thread count: the kernel cuts the sequence into segments whose states are
    # carried across, faded channel by channel.
    g = torch.Generator().manual_seed(12)
    q, k = (torch.randn(1, 1, 1500, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 1, 1500, 4, generator=g, dtype=torch.float64)
    gate = -torch.rand(1, 1, 1500, 8, generator=g, dtype=torch.float64) * 0.05
    inputs = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out, (S, _) = linattn.linear_attention(*inputs[:3], causal=True, gate=inputs[3], output_final_state=True)
        grads = torch.autograd.grad(out.sum() + S.sum(), inputs)
    finally:
        torch.set_num_threads(threads)
    with ops.generic_implementation():
        out_g, (S_g, _) = linattn.linear_attention(*inputs[:3], causal=True, gate=inputs[3], output_final_state=True)
        grads_g = torch.autograd.grad(out_g.sum() + S_g.sum(), inputs)
    torch.testing.assert_close(out, out_g)
    torch.testing.assert_close(S, S_g)
    for x, y in zip(grads, grads_g):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("op", ["linear_attn_step", "linear_attn_step_generic"])
def test_step_gradients_and_opcheck(op):
    g = torch.Generator().manual_seed(6)
    q, k = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    S, z = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64), torch.rand(2, 3, 4, generator=g).double() + 1
    factor = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 0.5 + 0.4
    step = getattr(torch.ops.linattn, op)
    inputs = [t.requires_grad_() for t in (q, k, v, S, z, factor)]
    assert torch.autograd.gradcheck(lambda *x: step(*x, 1, True, 1e-6), inputs)
    torch.library.opcheck(step.default, (*inputs, 1, True, 1e-6))


@pytest.mark.parametrize("causal_states", [False, True])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("offsets", [[0, 5, 5, 70, 133], [0] + list(range(3, 300, 3))])  # few long, many short
def test_packed_sequences_equal_per_sequence_calls(causal_states, impl, offsets):
    total, H, D, dv = offsets[-1], 2, 4, 3
    g = torch.Generator().manual_seed(8)
    q, k = (torch.randn(1, H, total, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, H, total, dv, generator=g, dtype=torch.float64)
    gate = -torch.rand(1, H, total, D, generator=g, dtype=torch.float64)
    N = len(offsets) - 1
    state = (torch.randn(N, H, D, dv, generator=g, dtype=torch.float64),
             torch.rand(N, H, D, generator=g, dtype=torch.float64) + 1) if causal_states else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    cu = torch.tensor(offsets, dtype=torch.int32)
    with IMPLEMENTATIONS[impl]():
        out, (S, z) = linattn.linear_attention(*leaves[:3], causal=True, gate=leaves[3], cu_seqlens=cu,
                                               initial_state=state, output_final_state=True)
        weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((out * weights).sum() + S.sum() + z.sum(), leaves)
    alone = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    loss = 0
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        init = None if state is None else (state[0][n:n + 1], state[1][n:n + 1])
        o, (S_n, z_n) = linattn.linear_attention(*(t[:, :, a:b] for t in alone[:3]), causal=True,
                                                 gate=alone[3][:, :, a:b], initial_state=init, output_final_state=True)
        torch.testing.assert_close(out[:, :, a:b], o)
        torch.testing.assert_close(S[n:n + 1], S_n)
        torch.testing.assert_close(z[n:n + 1], z_n)
        loss = loss + (o * weights[:, :, a:b]).sum() + S_n.sum() + z_n.sum()
    expected = torch.autograd.grad(loss, alone)
    for name, x, y in zip(("q", "k", "v", "gate"), grads, expected):
        torch.testing.assert_close(x, y, msg=lambda m, name=name: f"d{name}: {m}")


def test_opcheck():
    q, k, v, gate, state, mask = make(T=70)
    initial = torch.cat([state[0], state[1].unsqueeze(-1)], -1)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), initial, mask, 1, True, True, 1e-6,
            gate.contiguous().requires_grad_())
    torch.library.opcheck(torch.ops.linattn.linear_attn_fwd.default, args)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    packed = (q[:1].detach().requires_grad_(), k[:1].detach().requires_grad_(), v[:1].detach().requires_grad_(),
              None, None, 1, True, True, 1e-6, gate[:1].detach().contiguous().requires_grad_(), cu)
    torch.library.opcheck(torch.ops.linattn.linear_attn_fwd.default, packed)


def test_compile_fullgraph_equals_eager():
    q, k, v, gate, state, _ = make(T=70)

    def fn(q, k, v, gate):
        out, (S, _) = linattn.linear_attention(q, k, v, causal=True, gate=gate, initial_state=state,
                                               output_final_state=True)
        return out, S

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for T in (70, 45):
        args = (q[:, :, :T], k[:, :, :T], v[:, :, :T], gate[:, :, :T])
        for x, y in zip(compiled(*args), fn(*args)):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("kwargs,message", [
    (dict(causal=True, gate=torch.zeros(2, 3, 9, 5)), "gate must have shape (2, 3, 9, 6) (B, H, T, m)"),
    (dict(causal=True, gate=torch.full((2, 3, 9, 6), 0.5)), "must be <= 0"),
    (dict(causal=False, gate=torch.zeros(2, 3, 9, 6)), "causal=True"),
    (dict(causal=True, gate=torch.zeros(2, 3, 9, 6, 1)), "gate must be a 3-D tensor"),
])
def test_errors_name_the_argument(kwargs, message):
    q, k, v, *_ = make(T=9)
    with pytest.raises(ValueError) as info:
        linattn.linear_attention(q, k, v, **kwargs)
    assert message in str(info.value)


def test_step_errors_name_the_argument():
    q, k, v, *_ = make(T=1)
    with pytest.raises(ValueError, match=r"gate must have shape \(2, 3, 6\) \(B, H, m\)"):
        linattn.linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], gate=torch.zeros(2, 3, 5))
    factor = torch.ones(2, 3, 5)
    S, z = torch.zeros(2, 3, 6, 5), torch.zeros(2, 3, 6)
    with pytest.raises(RuntimeError, match=r"factor must have shape \[2, 3, 6\] \(B, H, m\)"):
        torch.ops.linattn.linear_attn_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], S, z, factor, 1, True, 1e-6)


def test_operator_refuses_a_gate_of_the_wrong_width():
    q, k, v, gate, *_ = make(T=9)
    with pytest.raises(RuntimeError, match=r"log_decay must have shape \[2, 3, 9, 6\] \(B, H, T, m\)"):
        torch.ops.linattn.linear_attn_fwd(q, k, v, None, None, 1, True, True, 1e-6, gate[..., :5].contiguous())


def test_meta_tensors():
    q, k, v = (torch.empty(2, 3, 100, 4, device="meta") for _ in range(3))
    out, (S, z) = linattn.linear_attention(q, k, v, causal=True, gate=torch.zeros(2, 3, 100, 4, device="meta"),
                                           output_final_state=True)
    assert out.shape == (2, 3, 100, 4) and S.shape == (2, 3, 4, 4) and z.shape == (2, 3, 4)


def test_matches_flash_linear_attention_reference_function():
    # flash-linear-attention's naive_recurrent_gla, a token-by-token loop over (B, T, H, D) inputs with
    # the scale D^-1/2 on q and no normalizer, as an independent oracle (state included).
    naive = pytest.importorskip("fla.ops.gla.naive")
    g = torch.Generator().manual_seed(11)
    B, T, H, D, dv = 2, 75, 3, 8, 5
    q, k = (torch.randn(B, T, H, D, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, dv, generator=g)
    gk = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, generator=g)) / 4
    h0 = torch.randn(B, H, D, dv, generator=g)
    expected, h = naive.naive_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    heads = [t.transpose(1, 2) for t in (q * D ** -0.5, k, v, gk)]  # (B, H, T, ·) strided views
    out, (S, _) = linattn.linear_attention(*heads[:3], causal=True, gate=heads[3], feature_map="identity",
                                           normalize=False, initial_state=(h0, torch.zeros(B, H, D)),
                                           output_final_state=True)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S, h, rtol=1e-4, atol=1e-4)


def test_fused_backend_runs_the_tensor_cores():
    # The fused operators (here their CPU emulation, what CUDA tensors run under
    # set_cuda_backend("fused")) run the tensor cores' instances for gates per channel, forward and
    # backward (test_tensor_core_channel_gates.py), agreeing with the device-generic kernel.
    q, k, v, gate, state, _ = make(T=70, dtype=torch.bfloat16)
    log_decay = gate.float().contiguous()
    args = (q, k, v, None, None, 1, True, True, 1e-6, log_decay)
    torch.ops.linattn._reset_warp_emulation_counters()
    fused = torch.ops.linattn.linear_attn_fwd_fused(*args)
    assert torch.ops.linattn._warp_emulation_counters()[0] > 0, "the tensor-core forward did not run"
    generic = torch.ops.linattn.linear_attn_fwd_generic(*args)
    for x, y in zip(fused, generic):
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2)
    grad = torch.randn(q.shape[:3] + (5,), generator=torch.Generator().manual_seed(13)).to(q.dtype)
    back = (grad, None, q, k, v, fused[0], fused[2], None, None, 1, True, True, None, log_decay)
    torch.ops.linattn._reset_warp_emulation_counters()
    fused_grads = torch.ops.linattn.linear_attn_bwd_fused(*back)
    assert torch.ops.linattn._warp_emulation_counters()[0] > 0, "the tensor-core backward did not run"
    for x, y in zip(fused_grads, torch.ops.linattn.linear_attn_bwd_generic(*back)):
        if x is not None and x.numel():
            torch.testing.assert_close(x.float(), y.float(), rtol=3e-2, atol=3e-2)
