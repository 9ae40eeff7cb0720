"""Property-based fuzzing of linear attention's tensor-core kernels with a fading state (a log-gate per
token, or per feature channel: GLA) through their CPU emulation: random lengths around the chunk,
feature and value dims, gate strengths from none to a state that forgets within a token, a per-head
decay, key padding, initial states (normalized: up to 3e5, past float16's range) and feature maps;
forward (out, final state) and every gradient
(q, k, v, the gate) against the float64 reference, each example asserting that the tensor cores ran
both directions. LINATTN_FUZZ_EXAMPLES scales the example count, as in test_fuzz.py."""
import os

import pytest
import torch

import linattn
from linattn import ops, reference
from tensor_core_fuzz_checks import close, gate_terms_scale, gradient_scales, output_scales

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("LINATTN_FUZZ_EXAMPLES", "300")) // 6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# As test_tensor_core_channel_gates.py's, gradients twice that.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
LENGTHS = st.one_of(st.sampled_from([1, 16, 63, 64, 65, 128, 129]), st.integers(1, 140))
FEATURES = st.one_of(st.sampled_from([1, 8, 64, 100, 128]), st.integers(1, 128))


@st.composite
def cases(draw):
    # Normalized outputs with the elu map only, and at least 8 features: with fewer, the output
    # barely depends on q (one feature: not at all) and dq is rounding noise around 0.
    form = draw(st.sampled_from(["elu", "elu-unnormalized", "identity", "relu"]))
    m = draw(FEATURES)
    if form == "elu":
        m = max(m, 8)
    return dict(B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), T=draw(LENGTHS), m=m, dv=draw(st.integers(1, 80)),
                per_channel=draw(st.booleans()), strength=draw(st.sampled_from([0.0, 0.05, 1.0, 30.0])), form=form,
                decay=draw(st.booleans()), mask=draw(st.booleans()), state=draw(st.booleans()),
                state_size=draw(st.sampled_from([1.0, 1.0, 1e3, 3e5])), seed=draw(st.integers(0, 2 ** 16)))


def _mma():
    return int(torch.ops.linattn._warp_emulation_counters()[0])


@FUZZ
@given(cases(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_fading_tensor_cores_match_the_reference(c, dtype):
    # float16's range, not a defect (docs/guide/cuda.md, "The tensor-core backward"): a normalized
    # row whose own key is padded under gates of up to −30 a token sees its other keys at weights in
    # float16's subnormals (d near eps), whose scores then keep a few bits (out ~1e-2 off there);
    # bfloat16 has float32's exponent range.
    assume(not (dtype == torch.float16 and c["form"] == "elu" and c["mask"] and c["strength"] >= 30))
    B, H, T, m, dv = c["B"], c["H"], c["T"], c["m"], c["dv"]
    g = torch.Generator().manual_seed(c["seed"])
    q, k = (torch.randn(B, H, T, m, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    gate = -torch.rand(B, H, T, *((m,) if c["per_channel"] else ()), generator=g) * c["strength"]
    decay = torch.rand(H, generator=g) * 0.5 + 0.5 if c["decay"] else None
    mask = torch.rand(B, T, generator=g) < 0.2 if c["mask"] else None
    # (A state past float16's range: its 16-bit copies are scaled by a power of two, and d grows with
    # it, so G = g / d takes the rows' square-root scale. Normalized only: unnormalized outputs would
    # pass float16's range themselves.)
    big = c["state_size"] if c["form"] == "elu" else 1.0
    state = None
    if c["state"]:
        state = (torch.randn(B, H, m, dv, generator=g) * big, (torch.rand(B, H, m, generator=g) + 1) * big)
    feature_map = c["form"].split("-")[0]
    options = dict(feature_map=feature_map, normalize=c["form"] == "elu", key_padding_mask=mask)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        out, (S, z) = linattn.linear_attention(*leaves[:3], causal=True, gate=leaves[3], decay=decay,
                                               initial_state=state, output_final_state=True, **options)
    assert _mma() > 0, "the tensor-core forward did not run"

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, gate)]
    # (B, H, T[, m]) log factors: the gate plus log γ of the decay, per head.
    log_f = ref_leaves[3]
    if decay is not None:
        log_f = log_f + decay.double().log().view(1, -1, *([1] * (log_f.dim() - 2)))
    ref_state = None if state is None else tuple(t.double() for t in state)
    ref, (ref_S, ref_z) = reference.decayed_linear_attention(*ref_leaves[:3], log_f, initial_state=ref_state,
                                                             **options)
    tol = TOL[dtype]

    def attend(q, k, v, initial_state, normalize):
        return reference.decayed_linear_attention(q, k, v, log_f.detach(), initial_state=initial_state,
                                                  **{**options, "normalize": normalize})

    signless = feature_map == "identity"
    sizes = output_scales(attend, q, k, v, ref_state, signless, options["normalize"])
    for name, got, expected, size in zip(("out", "final S", "final z"), (out, S, z), (ref, ref_S, ref_z), sizes):
        close(got.detach(), expected.detach(), tol, name, size)

    w = torch.Generator().manual_seed(c["seed"] + 1)
    weights = [torch.randn(t.shape, generator=w, dtype=torch.float64) for t in (ref, ref_S, ref_z)]

    def loss(*results):
        return sum((r.double() * x).sum() for r, x in zip(results, weights))

    torch.ops.linattn._reset_warp_emulation_counters()
    grads = torch.autograd.grad(loss(out, S, z), leaves)
    assert _mma() > 0, "the tensor-core backward did not run"
    ref_grads = torch.autograd.grad(loss(ref, ref_S, ref_z), ref_leaves)
    scales = gradient_scales(attend, q, k, v, ref_state, weights, signless, options["normalize"])
    for name, a, b, scale in zip(("q", "k", "v"), grads, ref_grads, scales):
        close(a, b, 2 * tol, f"grad {name}", scale)
    final_terms = (weights[1] * ref_S.detach()).abs().sum(-1) + (weights[2] * ref_z.detach()).abs()
    scale = gate_terms_scale(q, k, ref_grads[0], ref_grads[1], final_terms, c["per_channel"])
    close(grads[3], ref_grads[3], 2 * tol, "grad gate", scale)
