"""Property-based fuzzing of the tensor-core kernels' sequence split (csrc/linear_attention/tensor_core/
plan.h: too few (batch or sequence, head, value tile) blocks for the GPU's SMs cut each sequence into
segments of whole chunks, the passes starting from states summed per segment) through their CPU
emulation, which stands for an H100's 132 SMs: every feature map, normalized or not, causal or not
(T_q ≠ T_k), no fading / a per-head decay / log-gates per token or per channel, key padding, initial
states and packed sequences (cu_seqlens), at lengths of 1024-1800 rows, where one to four segments
of 512 or more rows each, the last one ragged, are cut. Forward (out, final state) and every gradient
against the float64 reference, and the forward against the same call on one emulated SM (no split),
which also shows that the split ran: it writes per-segment states the whole run does not. The
split's paths are thinner in the other tests than the whole ones (one such case once returned NaN);
LINATTN_FUZZ_EXAMPLES scales the example count, as in test_fuzz.py."""
import os

import pytest
import torch

import linattn
from linattn import ops, reference
from tensor_core_fuzz_checks import close, gate_terms_scale, gradient_scales, output_scales

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("LINATTN_FUZZ_EXAMPLES", "300")) // 10,
    deadline=None,
    derandomize=True,
    # (monkeypatch sets the emulated SM count before each call, not once per test.)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
# As test_tensor_core_fading_fuzz.py's, gradients twice that.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
SEGMENT = 512  # plan.h's kMinimumSegment: a sequence of rows >= 2 · SEGMENT is split
# Around the segment lengths the plan picks (multiples of the 64-row chunk) and their ragged ends.
LENGTHS = st.one_of(st.sampled_from([1024, 1025, 1087, 1088, 1089, 1152, 1535, 1536, 1537]), st.integers(1024, 1800))
FEATURES = st.one_of(st.sampled_from([1, 8, 64, 100, 128]), st.integers(1, 128))


@st.composite
def cases(draw):
    # Normalized outputs with the elu map only, and at least 8 features (test_tensor_core_fading_fuzz.py).
    form = draw(st.sampled_from(["elu", "elu-unnormalized", "identity", "relu"]))
    causal, packed = draw(st.booleans()), draw(st.booleans())
    fade = draw(st.sampled_from(["none", "decay", "token", "channel"])) if causal else "none"
    m = draw(FEATURES)
    if form == "elu":
        m = max(m, 8)
    # (Per-channel fading's dense float64 reference holds (B, H, T, T, m) weights: kept small.)
    one_head = fade == "channel"
    if one_head:
        m = min(m, 12)
    total = draw(LENGTHS)
    starts = []
    if packed:
        # One to three sequences. packed_split_for cuts when the rows average 2 · SEGMENT a
        # sequence: mostly that many.
        sequences = draw(st.integers(1, 3))
        total = draw(st.one_of(LENGTHS, st.integers(2 * SEGMENT * sequences, 2 * SEGMENT * sequences + 600)))
        starts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=sequences - 1, max_size=sequences - 1,
                                      unique=True)))
        if one_head:
            total = min(total, 1800)  # (the reference's size)
            starts = [x for x in starts if x < total]
    k_len = total if causal or packed else draw(st.one_of(st.just(total), LENGTHS))
    B = 1 if packed or one_head else draw(st.integers(1, 2))
    return dict(B=B, H=1 if one_head else draw(st.integers(1, 2)), T=total, k_len=k_len, packed=packed, starts=starts,
                m=m, dv=draw(st.integers(1, 150)), form=form, causal=causal, fade=fade,
                strength=draw(st.sampled_from([0.0, 0.02, 1.0])),
                mask=not packed and draw(st.booleans()), state=draw(st.booleans()),
                state_size=draw(st.sampled_from([1.0, 1e3, 1e5])) if form == "elu" else 1.0,
                seed=draw(st.integers(0, 2 ** 16)))


def _run(q, k, v, gate, decay, state, sms, monkeypatch, **options):
    """The fused call emulating `sms` SMs: (out, (S, z)), and the global bytes its forward wrote."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", str(sms))
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        result = linattn.linear_attention(q, k, v, gate=gate, decay=decay, initial_state=state,
                                          output_final_state=True, **options)
    counters = torch.ops.linattn._warp_emulation_counters().tolist()
    assert counters[0] > 0, "the tensor-core forward did not run"
    return result, counters[5]


def _reference(bounds, causal, log_f, options):
    """The float64 reference as attend(q, k, v, initial_state, normalize), sequence by sequence for
    packed rows (`bounds`: each sequence's first and end row; states one per sequence)."""

    def one(q, k, v, log_f, initial_state, normalize, mask):
        where = dict(feature_map=options["feature_map"], normalize=normalize, key_padding_mask=mask,
                     initial_state=initial_state)
        if log_f is None:
            return reference.linear_attention(q, k, v, causal=causal, **where)
        return reference.decayed_linear_attention(q, k, v, log_f, **where)

    def attend(q, k, v, initial_state, normalize):
        if bounds is None:
            return one(q, k, v, log_f, initial_state, normalize, options.get("key_padding_mask"))
        outs, states = [], []
        for n, (a, b) in enumerate(bounds):
            state = None if initial_state is None else tuple(t[n:n + 1] for t in initial_state)
            out, (S, z) = one(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None if log_f is None else log_f[:, :, a:b],
                              state, normalize, None)
            outs.append(out)
            states.append((S, z))
        return torch.cat(outs, 2), tuple(torch.cat(parts, 0) for parts in zip(*states))

    return attend


@FUZZ
@given(cases(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_split_tensor_cores_match_the_reference(monkeypatch, c, dtype):
    B, H, T, Tk, m, dv = c["B"], c["H"], c["T"], c["k_len"], c["m"], c["dv"]
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(B, H, T, m, generator=g).to(dtype)
    k = torch.randn(B, H, Tk, m, generator=g).to(dtype)
    v = torch.randn(B, H, Tk, dv, generator=g).to(dtype)
    edges = [0, *c["starts"], T]
    bounds = list(zip(edges[:-1], edges[1:])) if c["packed"] else None
    options = dict(feature_map=c["form"].split("-")[0], normalize=c["form"] == "elu", causal=c["causal"])
    if bounds is not None:
        options["cu_seqlens"] = torch.tensor(edges, dtype=torch.int32)
    elif c["mask"]:
        options["key_padding_mask"] = torch.rand(B, Tk, generator=g) < 0.2
    gate = decay = None
    if c["fade"] in ("token", "channel"):
        gate = -torch.rand(B, H, T, *((m,) if c["fade"] == "channel" else ()), generator=g) * c["strength"]
    elif c["fade"] == "decay":
        decay = torch.rand(H, generator=g) * 0.1 + 0.9
    state = None
    if c["state"]:
        n, size = len(bounds) if bounds is not None else B, c["state_size"]
        state = (torch.randn(n, H, m, dv, generator=g) * size, (torch.rand(n, H, m, generator=g) + 1) * size)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if gate is not None:
        leaves.append(gate.clone().requires_grad_())
    (out, (S, z)), split_written = _run(*leaves[:3], leaves[3] if gate is not None else None, decay, state, 132,
                                        monkeypatch, **options)
    with torch.no_grad():
        (whole, (whole_S, whole_z)), whole_written = _run(q, k, v, gate, decay, state, 1, monkeypatch, **options)
    if max(T, Tk) >= 2 * SEGMENT * (len(bounds) if bounds is not None else 1):
        assert split_written > whole_written, "the sequence split did not run (no segment states written)"

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    # (B, H, T[, m]) log factors: the gate, or log γ of the decay per head.
    log_f = ref_leaves[3] if gate is not None else None
    if decay is not None:
        log_f = decay.double().log().view(1, -1, 1).expand(B, H, T)
    ref_state = None if state is None else tuple(t.double() for t in state)
    ref, (ref_S, ref_z) = _reference(bounds, c["causal"], log_f, options)(*ref_leaves[:3], ref_state,
                                                                           options["normalize"])
    attend = _reference(bounds, c["causal"], None if log_f is None else log_f.detach(), options)

    tol = TOL[dtype]
    signless = options["feature_map"] == "identity"
    sizes = output_scales(attend, q, k, v, ref_state, signless, options["normalize"])
    for name, got, expected, size in zip(("out", "final S", "final z"), (out, S, z), (ref, ref_S, ref_z), sizes):
        close(got.detach(), expected.detach(), tol, name, size)
    # The split against the whole run: the same sums in another order.
    for name, a, b, size in zip(("out", "final S", "final z"), (out, S, z), (whole, whole_S, whole_z), sizes):
        close(a.detach(), b.double(), tol, f"split against whole: {name}", size)

    w = torch.Generator().manual_seed(c["seed"] + 1)
    weights = [torch.randn(t.shape, generator=w, dtype=torch.float64) for t in (ref, ref_S, ref_z)]

    def loss(*results):
        return sum((r.double() * x).sum() for r, x in zip(results, weights))

    monkeypatch.setenv("LINATTN_EMULATED_SMS", "132")
    torch.ops.linattn._reset_warp_emulation_counters()
    grads = torch.autograd.grad(loss(out, S, z), leaves)
    assert torch.ops.linattn._warp_emulation_counters()[0] > 0, "the tensor-core backward did not run"
    ref_grads = torch.autograd.grad(loss(ref, ref_S, ref_z), ref_leaves)
    scales = gradient_scales(attend, q, k, v, ref_state, weights, signless, options["normalize"])
    for name, a, b, scale in zip(("q", "k", "v"), grads, ref_grads, scales):
        close(a, b, 2 * tol, f"grad {name}", scale)
    if gate is not None:
        final_terms = (weights[1] * ref_S.detach()).abs().sum(-1) + (weights[2] * ref_z.detach()).abs()
        squares = 0.0
        for n, (a, b) in enumerate(bounds or [(0, T)]):
            rows = slice(n, n + 1) if bounds is not None else slice(None)
            squares += gate_terms_scale(q[:, :, a:b], k[:, :, a:b], ref_grads[0][:, :, a:b], ref_grads[1][:, :, a:b],
                                        final_terms[rows], c["fade"] == "channel") ** 2
        close(grads[3], ref_grads[3], 2 * tol, "grad gate", squares ** 0.5)
