"""The tensor-core backward of a fading state (decay and gates; csrc/linear_attention/tensor_core/
backward.h): linear_attn_bwd_fused with log_decay runs both passes with the forward's weights —
e^(b_i − b_j) on a chunk's pairs, e^(b_i) on the earlier chunks' state, e^(b_last − b_j) on what key j
adds — and writes each row's φ(q)·dφ(q) and φ(k)·dφ(k), from which dL/dc (c = the cumulative log
factors) and then the gradients of decay and gate follow. On CPU tensors through the warp-operation
layer's emulation; every test counts the mma instructions the backward executed, so it cannot pass
on the device-generic fading backward, which the fused operators run where the tensor cores do not
take a call."""
import pytest
import torch

import linattn
from linattn import ops
from conftest import TOLERANCE, assert_close, fading_extremes, gated_inputs, gated_reference, log_factors

FWD = torch.ops.linattn.linear_attn_fwd_fused.default
BWD = torch.ops.linattn.linear_attn_bwd_fused.default
BWD_GENERIC = torch.ops.linattn.linear_attn_bwd.default
HALF_TYPES = [torch.bfloat16, torch.float16]
ELU = 1
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NAMES = ("q", "k", "v", "decay", "gate", "S0", "z0")


def backward_mma():
    return torch.ops.linattn._warp_emulation_counters().tolist()[0]


def cotangents(B, H, T, m, dv, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, dv, generator=g, dtype=torch.float64), torch.randn(B, H, m, dv, generator=g,
            dtype=torch.float64), torch.randn(B, H, m, generator=g, dtype=torch.float64))


def loss_of(out, S, z, grad_out, grad_S, grad_z):
    return (out.double() * grad_out).sum() + (S.double() * grad_S).sum() + (z.double() * grad_z).sum()


def gradients(q, k, v, decay, gate, initial_state=None, seed=1, expect_tensor_cores=True, **options):
    """Gradients of a random linear function of out and the final state (S, z) for every input,
    through the fused operators (on the inputs' device), and the same in float64 through the
    reference (on the CPU)."""
    B, H, T, m = q.shape
    dv = v.shape[-1]
    cot = cotangents(B, H, T, m, dv, seed)
    device_cot = [c.to(q.device) for c in cot]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, decay, gate)]
    state = None
    if initial_state is not None:
        state = tuple(t.clone().requires_grad_() for t in initial_state)
        leaves += list(state)
    with ops.fused_implementation():
        out, (S, z) = linattn.linear_attention(*leaves[:3], causal=True, decay=leaves[3], gate=leaves[4],
                                               initial_state=state, output_final_state=True, **options)
        torch.ops.linattn._reset_warp_emulation_counters()
        grads = torch.autograd.grad(loss_of(out, S, z, *device_cot), leaves)
    if q.device.type == "cpu":  # (the counters are the emulation's)
        ran = backward_mma() > 0
        assert ran == expect_tensor_cores, "the tensor-core backward did not run" if expect_tensor_cores else "it ran"
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref_state = tuple(ref_leaves[5:]) if initial_state is not None else None
    ref_options = {key: val.cpu() if torch.is_tensor(val) else val for key, val in options.items()}
    ref, (ref_S, ref_z) = gated_reference(*ref_leaves[:5], initial_state=ref_state, **ref_options)
    ref_grads = torch.autograd.grad(loss_of(ref, ref_S, ref_z, *cot), ref_leaves)
    return grads, ref_grads


def check(grads, ref_grads, tol):
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close(got.cpu(), want, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("T", [1, 17, 64, 65, 200])
@pytest.mark.parametrize("m, dv", [(32, 24), (128, 128), (100, 33)])
def test_matches_reference_around_the_chunk(dtype, T, m, dv):
    """Every gradient (q, k, v, decay, gate) against the float64 reference, with a cotangent of the
    final state (its ⟨dS_N, S_N⟩ term of dL/dc at the last row), at odd lengths around the chunk and
    head dims from 24 to 128."""
    q, k, v, decay, gate = gated_inputs(1, 2, T, m, dv, dtype, seed=T + m)
    check(*gradients(q, k, v, decay, gate, seed=T), 2 * TOLERANCE[dtype])


@pytest.mark.parametrize("strength", [0.0, 30.0])
@pytest.mark.parametrize("feature_map, normalize", [("elu", True), ("identity", False), ("relu", True)])
def test_feature_maps_padding_and_initial_state(strength, feature_map, normalize):
    """No fading (log factors 0) and a state that forgets within a token, under each feature map
    (unnormalized, φ(q)·dφ(q) carries the whole query side of dL/dc; normalized, it is nearly 0),
    with padded keys and an initial state whose gradients are checked too."""
    q, k, v, decay, gate, mask, state = fading_extremes(64, 48, strength)
    grads, ref = gradients(q, k, v, decay, gate, initial_state=state, key_padding_mask=mask, feature_map=feature_map,
                           normalize=normalize)
    check(grads, ref, 2 * TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("initial", [False, True])
def test_sequence_split(monkeypatch, initial):
    """One long sequence split into segments for 16 SMs (B·H = 2, T = 1600: three): the query pass
    starts each segment from the forward's per-segment sums scanned with fading, the key-value sums
    run backwards in time (faded to their segment's start) and are scanned the other way from dS_N;
    against the reference and against the unsplit run (2 SMs)."""
    B, H, T, m, dv = 1, 2, 1600, 32, 24
    q, k, v, decay, gate = gated_inputs(B, H, T, m, dv, torch.bfloat16, seed=12, strength=0.2)
    g = torch.Generator().manual_seed(13)
    state = (torch.randn(B, H, m, dv, generator=g), torch.rand(B, H, m, generator=g) + 1) if initial else None
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 560:600] = True
    results = {}
    for sms in ("16", "2"):
        monkeypatch.setenv("LINATTN_EMULATED_SMS", sms)
        results[sms] = gradients(q, k, v, decay, gate, initial_state=state, key_padding_mask=mask)
    check(*results["16"], 2 * TOLERANCE[torch.bfloat16])
    for name, split, whole in zip(NAMES, results["16"][0], results["2"][0]):
        assert_close(split, whole.double(), TOLERANCE[torch.bfloat16], f"grad {name}: split vs whole")


def test_equals_the_cpu_kernel_and_falls_back():
    """The operator's five gradients (dL/dc the fifth) against linear_attn_bwd on the same inputs
    (the CPU kernel, float32 arithmetic), and a call the tensor cores do not take (feature dim 264)
    runs that operator instead and still matches the reference."""
    B, H, T, m, dv = 1, 2, 130, 48, 40
    q, k, v, decay, gate = gated_inputs(B, H, T, m, dv, torch.bfloat16, seed=21)
    log_decay = log_factors(decay, gate, B, H, T).float()
    out, state, den = FWD(q, k, v, None, None, ELU, True, True, 1e-6, log_decay, None)
    grad_out, grad_S, grad_z = cotangents(B, H, T, m, dv, seed=2)
    grad_state = torch.cat([grad_S, grad_z.unsqueeze(-1)], -1).float()
    args = (grad_out.to(q.dtype), grad_state, q, k, v, out, den, None, None, ELU, True, True, None, log_decay, None)
    torch.ops.linattn._reset_warp_emulation_counters()
    fused = BWD(*args)
    assert backward_mma() > 0, "the tensor-core backward did not run"
    kernel = BWD_GENERIC(*args)
    for name, a, b in zip(("dq", "dk", "dv", "dS0", "dL/dc"), fused, kernel):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b.double(), TOLERANCE[torch.bfloat16], name)
    q, k, v, decay, gate = gated_inputs(1, 2, 40, 264, 16, torch.bfloat16, seed=22)
    check(*gradients(q, k, v, decay, gate, expect_tensor_cores=False), 2 * TOLERANCE[torch.bfloat16])


def test_opcheck_and_compile():
    """opcheck of the backward operator with log_decay and a final state's cotangent, and the
    gradients of torch.compile(fullgraph=True) equal to eager's: bit for bit for q, k, v; for decay
    and gate to fp32 rounding (autograd's reverse cumulative sum of dL/dc and the reductions to a
    decay per head are ATen ops outside the operator, which inductor fuses in another order)."""
    B, H, T, m, dv = 1, 2, 70, 32, 32
    q, k, v, decay, gate = gated_inputs(B, H, T, m, dv, torch.bfloat16, seed=8)
    log_decay = log_factors(decay, gate, B, H, T).float()
    with ops.fused_implementation():
        out, state, den = FWD(q, k, v, None, None, ELU, True, True, 1e-6, log_decay, None)
        grad_state = torch.randn(B, H, m, dv + 1)
        torch.library.opcheck(BWD, (out.clone(), grad_state, q, k, v, out, den, None, None, ELU, True, True, None,
                                    log_decay, None))
        leaves = [t.clone().requires_grad_() for t in (q, k, v, decay, gate)]

        def loss(*t):
            return linattn.linear_attention(*t[:3], causal=True, decay=t[3], gate=t[4]).float().square().sum()

        eager = torch.autograd.grad(loss(*leaves), leaves)
        compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for name, a, b in zip(NAMES, compiled, eager):
        if name in ("q", "k", "v"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("m, dv, T", [(64, 64, 1000), (128, 128, 777), (100, 33, 130)])
def test_cuda_kernels_match_reference(dtype, m, dv, T):
    """On the GPU: every gradient (q, k, v, decay, gate, the initial state) against the float64
    reference, with padded keys; B·H = 2 splits the longer sequences into segments on a GPU of
    many SMs."""
    B, H = 1, 2
    q, k, v, decay, gate = gated_inputs(B, H, T, m, dv, dtype, seed=T, strength=0.3)
    g = torch.Generator().manual_seed(T)
    state = (torch.randn(B, H, m, dv, generator=g).cuda(), (torch.rand(B, H, m, generator=g) + 1).cuda())
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, T // 3:T // 3 + 20] = True
    cuda = [t.cuda() for t in (q, k, v, decay, gate)]
    grads, ref = gradients(*cuda, initial_state=state, key_padding_mask=mask.cuda())
    check(grads, ref, 2 * TOLERANCE[dtype])
