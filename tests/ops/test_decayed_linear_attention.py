"""linear_attention(..., causal=True, decay=, gate=): a fading state (RetNet/Lightning decay,
Mamba-2/simple-GLA gates), docs/methods.md §1. The CPU kernel and the device-generic path (what
CUDA tensors run, exercised here on CPU tensors) against the float64 dense reference
(reference.decayed_linear_attention) forward and backward (decay and gate gradients too), at
odd lengths across chunk boundaries, every dtype; against the token-by-token step; opcheck,
compile, long sequences without overflow, and clear errors."""
import contextlib

import pytest
import torch

import linattn
from linattn import ops, reference
from conftest import assert_same_gradients, log_factors

IMPLEMENTATIONS = {"fused": contextlib.nullcontext, "generic": ops.generic_implementation}

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}


def make(B=2, H=3, T=70, D=6, dv=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    decay = torch.tensor([1.0, 0.97, 0.6][:H], dtype=dtype)
    gate = (-torch.rand(B, H, T, generator=g) * 0.5).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = (torch.randn(B, H, D, dv, generator=g).to(acc), (torch.rand(B, H, D, generator=g) + 1).to(acc))
    mask = torch.rand(B, T, generator=g) < 0.15
    return q, k, v, decay, gate, state, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["decay", "gate", "both"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_and_state_match_reference(dtype, kind, T, impl):
    q, k, v, decay, gate, state, mask = make(T=T, dtype=dtype)
    decay = decay if kind != "gate" else None
    gate = gate if kind != "decay" else None
    with IMPLEMENTATIONS[impl]():
        out, (S, z) = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate, initial_state=state,
                                               key_padding_mask=mask, output_final_state=True)
    assert out.dtype == dtype
    expected, (S_e, z_e) = reference.decayed_linear_attention(q, k, v, log_factors(decay, gate, 2, 3, T),
                                                              initial_state=state, key_padding_mask=mask)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(S.double(), S_e, rtol=tol, atol=tol)
    torch.testing.assert_close(z.double(), z_e, rtol=tol, atol=tol)


@pytest.mark.parametrize("feature_map,normalize", [("elu", True), ("relu", True), ("identity", False), ("elu", False)])
@pytest.mark.parametrize("T", [5, 130])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_gradients_match_reference(feature_map, normalize, T, impl, per_channel):
    q, k, v, decay, gate, state, mask = make(T=T, dtype=torch.float64)
    if per_channel:  # GLA: one log-gate per feature channel (test_channel_gates.py has the rest)
        gate = -torch.rand(*gate.shape, q.shape[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, decay, gate, state[0], state[1])]

    def ours(q, k, v, decay, gate, S0, z0):
        out, (S, z) = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate, initial_state=(S0, z0),
                                               key_padding_mask=mask, feature_map=feature_map, normalize=normalize,
                                               output_final_state=True)
        return out, S, z

    def theirs(q, k, v, decay, gate, S0, z0):
        out, (S, z) = reference.decayed_linear_attention(q, k, v, log_factors(decay, gate, 2, 3, T),
                                                         feature_map=feature_map, normalize=normalize,
                                                         initial_state=(S0, z0), key_padding_mask=mask)
        return out, S, z

    with IMPLEMENTATIONS[impl]():
        assert_same_gradients(ours, theirs, inputs, ("q", "k", "v", "decay", "gate", "S0", "z0"))


def test_gradcheck():
    q, k, v, _, gate, state, mask = make(B=1, H=2, T=70, D=3, dv=2, dtype=torch.float64)
    decay = torch.tensor([0.9, 0.7], dtype=torch.float64)  # inside (0, 1) under gradcheck's nudges
    inputs = [t.clone().requires_grad_() for t in (q, k, v, decay, gate, state[0], state[1])]

    def fn(q, k, v, decay, gate, S0, z0):
        out, (S, z) = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate, initial_state=(S0, z0),
                                               output_final_state=True)
        return out, S, z

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
def test_equals_token_by_token_step(dtype, per_channel):
    q, k, v, decay, gate, state, _ = make(T=40, dtype=dtype)
    if per_channel:  # GLA: the step's gate is (B, H, m)
        gate = (-torch.rand(*gate.shape, q.shape[-1], generator=torch.Generator().manual_seed(3)) * 0.5).to(dtype)
    whole, (S_w, z_w) = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate, initial_state=state,
                                                 output_final_state=True)
    step_state, outs = state, []
    for t in range(40):
        out, step_state = linattn.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], step_state, decay=decay,
                                                        gate=gate[:, :, t])
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 2).float(), whole.float(), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(step_state[0], S_w, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(step_state[1], z_w, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_long_sequence_strong_gates_stay_finite(dtype):
    # c = cumsum(gate) reaches about −16000 here: exponentiating −c would overflow any dtype.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 16384, 8, generator=g).to(dtype) for _ in range(3))
    gate = torch.full((1, 2, 16384), -1.0, dtype=dtype)
    out = linattn.linear_attention(q, k, v, causal=True, gate=gate)
    assert torch.isfinite(out).all()
    tail = slice(16000, 16100)  # far from the start, rows depend on the last few keys only
    expected, _ = reference.decayed_linear_attention(q[:, :, 15900:16100], k[:, :, 15900:16100], v[:, :, 15900:16100],
                                                     gate[:, :, 15900:16100].double())
    torch.testing.assert_close(out[:, :, tail].double(), expected[:, :, 100:], rtol=5e-2, atol=5e-2)


def test_opcheck():
    q, k, v, decay, gate, state, mask = make(T=70)
    log_decay = (decay.log().view(1, 3, 1) + gate).float().contiguous()
    initial = torch.cat([state[0], state[1].unsqueeze(-1)], -1)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), initial, mask, 1, True, True, 1e-6,
            log_decay.requires_grad_())
    torch.library.opcheck(torch.ops.linattn.linear_attn_fwd.default, args)


def test_compile_fullgraph_equals_eager():
    q, k, v, decay, gate, state, _ = make(T=70)

    def fn(q, k, v, gate):
        return linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v, gate), fn(q, k, v, gate))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(causal=False, decay=torch.ones(3)), ValueError, "causal=True"),
    (dict(causal=True, decay=torch.tensor([1.0, 0.0, 0.5])), ValueError, "decay must lie in (0, 1]"),
    (dict(causal=True, decay=torch.ones(2)), ValueError, "decay must have shape (3,)"),
    (dict(causal=True, gate=torch.ones(2, 3, 9)), ValueError, "must be <= 0"),
    (dict(causal=True, gate=torch.zeros(2, 3)), ValueError, "gate must be a 3-D tensor"),
    (dict(causal=True, gate=torch.zeros(2, 3, 8)), ValueError, "gate must have shape (2, 3, 9)"),
])
def test_errors_name_the_argument(kwargs, error, message):
    q, k, v, *_ = make(T=9)
    with pytest.raises(error) as info:
        linattn.linear_attention(q, k, v, **kwargs)
    assert message in str(info.value)


def test_meta_tensors_take_the_generic_path():
    q, k, v = (torch.empty(2, 3, 100, 4, device="meta") for _ in range(3))
    out, (S, z) = linattn.linear_attention(q, k, v, causal=True, decay=torch.full((3,), 0.9, device="meta"),
                                           gate=torch.zeros(2, 3, 100, device="meta"), output_final_state=True)
    assert out.shape == (2, 3, 100, 4) and S.shape == (2, 3, 4, 4) and z.shape == (2, 3, 4)


def test_generic_path_compiles():
    q, k, v, decay, gate, state, _ = make(T=70)

    def fn(q, k, v, gate):
        with ops.generic_implementation():
            return linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v, gate), fn(q, k, v, gate))
