"""Gates per channel (GLA: a log-gate per token and feature channel, (B, H, T, m)) on linear
attention's tensor-core kernels: the kChannels instances of csrc/linear_attention/tensor_core/
forward.h and backward.h (the chunk's cumulative log-gates a matrix, the factors inside the products
as operand factors, pair weights by split mma between 16-row blocks and in fp32 within them:
common/warp/gated_pairs.h; dL/dc per channel from the two passes' terms).

linear_attn_fwd_fused / _bwd_fused on CPU tensors run them through the warp-operation layer's
emulation; each test counts the mma instructions the emulation executed, so a test cannot pass on
another path. Oracle: the float64 dense reference (reference.decayed_linear_attention) and autograd
through it."""

import pytest
import torch

import linattn
from linattn import ops, reference
from conftest import assert_close

FWD = torch.ops.linattn.linear_attn_fwd_fused.default
BWD = torch.ops.linattn.linear_attn_bwd_fused.default
HALF_TYPES = [torch.bfloat16, torch.float16]
# As the per-token fading instance's (test_tensor_core_forward.py), with one more 16-bit rounding
# of φ(q), φ(k) and their pair factors inside the products.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
ELU, IDENTITY = 1, 0
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mma_count():
    return int(torch.ops.linattn._warp_emulation_counters()[0])


def make(B, H, T, m, dv, dtype, seed=0, strength=0.3):
    """q, k, v of `dtype` and per-channel log-gates −U(0, strength), fp32."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, m, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    gate = -torch.rand(B, H, T, m, generator=g) * strength
    return q, k, v, gate


def strong_gates(B, T, H=2, m=32):
    """(B, H, T, m) log-gates, each channel of a head one of three kinds: closing by up to e^-40 a
    token, barely fading (-0.05), never fading."""
    g = torch.Generator().manual_seed(6)
    kind = torch.randint(0, 3, (B, H, 1, m), generator=g)
    return torch.where(kind == 0, -40.0 * torch.rand(B, H, T, m, generator=g),
                       torch.where(kind == 1, -0.05 * torch.rand(B, H, T, m, generator=g), torch.zeros(B, H, T, m)))


def fused(q, k, v, gate, **options):
    """linear_attention under the fused operators, asserting that the tensor cores ran its forward."""
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        result = linattn.linear_attention(q, k, v, causal=True, gate=gate, output_final_state=True, **options)
    assert mma_count() > 0, "the tensor-core forward did not run"
    return result


def check(q, k, v, gate, tol, decay=None, initial_state=None, key_padding_mask=None, **options):
    out, (S, z) = fused(q, k, v, gate, decay=decay, initial_state=initial_state, key_padding_mask=key_padding_mask,
                        **options)
    log_f = gate.double()
    if decay is not None:
        log_f = log_f + decay.double().log().view(1, -1, 1, 1)
    state = None if initial_state is None else tuple(t.double() for t in initial_state)
    ref, (ref_S, ref_z) = reference.decayed_linear_attention(q.double(), k.double(), v.double(), log_f,
                                                             initial_state=state, key_padding_mask=key_padding_mask,
                                                             **options)
    assert out.dtype == q.dtype
    assert_close(out, ref, tol, "out")
    assert_close(S, ref_S, tol, "final S")
    assert_close(z, ref_z, tol, "final z")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("T", [1, 17, 64, 65, 200])
def test_matches_reference_around_the_chunk(dtype, T):
    check(*make(2, 3, T, 32, 24, dtype, seed=T), TOL[dtype])


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("m, dv", [(8, 8), (64, 64), (100, 33), (128, 128), (48, 160)])
def test_head_dims_and_value_tiles(dtype, m, dv):
    """Feature dims 8 .. 128 (odd widths padded with zero columns whose G is 0), one or two value
    tiles (dv 160: two 128-column tiles, each with the normalizer)."""
    check(*make(1, 2, 130, m, dv, dtype, seed=m + dv), TOL[dtype])


@pytest.mark.parametrize("feature_map, normalize", [("elu", True), ("relu", True), ("elu", False),
                                                    ("identity", False)])
def test_feature_maps_normalizer_padding_decay_and_state(feature_map, normalize):
    """φ applied as rows land, the per-channel gates on φ's channels; key padding, a per-head decay
    folded into the gates and an initial state (S0, z0)."""
    q, k, v, gate = make(2, 3, 150, 32, 24, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 150, generator=g) < 0.2
    state = (torch.randn(2, 3, 32, 24, generator=g), torch.rand(2, 3, 32, generator=g) + 1)
    decay = torch.tensor([1.0, 0.97, 0.6])
    check(q, k, v, gate, TOL[torch.bfloat16], decay=decay, initial_state=state, key_padding_mask=mask,
          feature_map=feature_map, normalize=normalize)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_strong_gates_stay_finite_and_exact(dtype):
    """Channels closing by up to e^-40 a token beside channels that barely fade, and some never
    fading: every factor inside a product stays <= 1 (the split through the later block's first
    row, exact pair sums within a block), so nothing overflows and the outputs match."""
    q, k, v, _ = make(2, 2, 200, 32, 24, dtype, seed=5)
    check(q, k, v, strong_gates(2, 200), TOL[dtype])


def test_equal_channels_match_the_per_token_instance():
    """The same gate in every channel is the per-token fading state: the two instances agree to
    their roundings."""
    q, k, v, gate = make(2, 2, 150, 32, 24, torch.bfloat16, seed=7)
    per_token = gate[..., 0]
    channels = per_token.unsqueeze(-1).expand_as(gate).contiguous()
    out, (S, z) = fused(q, k, v, channels)
    with ops.fused_implementation():
        expected, (S_e, z_e) = linattn.linear_attention(q, k, v, causal=True, gate=per_token, output_final_state=True)
    assert_close(out, expected.double(), 1e-2, "out")
    assert_close(S, S_e.double(), 1e-2, "final S")
    assert_close(z, z_e.double(), 1e-2, "final z")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_later_value_never_reaches_earlier_rows(bad):
    """Rows before a key whose value holds Inf or NaN never see it (the exact diagonal path), at
    both ends of a 16-row block and of the chunk, under gates per channel; the rows from it on are
    not finite in its column only. (The dense reference would spread 0 · NaN to every row, so the
    rows before the key are checked against the reference on those rows alone.)"""
    q, k, v, gate = make(1, 2, 150, 32, 24, torch.bfloat16, seed=12)
    for key in (5, 16, 63, 64, 100):
        v_bad = v.clone()
        v_bad[0, 1, key, 7] = bad
        out = fused(q, k, v_bad, gate)[0]
        before = [t[:, :, :key].double() for t in (q, k, v, gate)]
        ref = reference.decayed_linear_attention(*before)[0]
        assert_close(out[:, :, :key], ref, TOL[torch.bfloat16], "rows before the key")
        finite = torch.ones_like(out, dtype=torch.bool)
        finite[0, 1, key:, 7] = False
        assert torch.equal(torch.isfinite(out), finite)


def test_packed_sequences_equal_each_sequence_alone():
    """Packed sequences (cu_seqlens, states per sequence): out and the final states equal, bit for
    bit, those of one call per sequence (the chunk loop and G restart at each sequence's start)."""
    offsets = [0, 5, 5, 70, 200]
    q, k, v, gate = make(1, 2, 200, 32, 24, torch.bfloat16, seed=8)
    cu = torch.tensor(offsets, dtype=torch.int32)
    out, (S, z) = fused(q, k, v, gate, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        if a == b:
            assert torch.equal(S[n], torch.zeros_like(S[n])) and torch.equal(z[n], torch.zeros_like(z[n]))
            continue
        rows = [t[:, :, a:b] for t in (q, k, v, gate)]
        alone, (S_a, z_a) = fused(*rows)
        assert torch.equal(out[:, :, a:b], alone), f"sequence {n}"
        assert torch.equal(S[n:n + 1], S_a) and torch.equal(z[n:n + 1], z_a), f"sequence {n} state"


@pytest.mark.parametrize("initial", [False, True])
def test_sequence_split_into_segments(monkeypatch, initial):
    """One long sequence split into segments for 132 SMs: each segment's state sums fade channel by
    channel within it (the kernel) and the starts are a scan in which a state's row c fades by the
    segment's total of channel c (plan.h, segment_fades); against the reference and the unsplit
    kernel (2 SMs)."""
    B, H, T, m, dv = 1, 2, 1700, 32, 24
    q, k, v, gate = make(B, H, T, m, dv, torch.bfloat16, seed=12, strength=0.05)
    g = torch.Generator().manual_seed(13)
    state = (torch.randn(B, H, m, dv, generator=g), torch.rand(B, H, m, generator=g) + 1) if initial else None
    results = {}
    for sms in ("132", "2"):
        monkeypatch.setenv("LINATTN_EMULATED_SMS", sms)
        results[sms] = fused(q, k, v, gate, initial_state=state)
    ref_state = None if state is None else tuple(t.double() for t in state)
    ref, (ref_S, ref_z) = reference.decayed_linear_attention(q.double(), k.double(), v.double(), gate.double(),
                                                             initial_state=ref_state)
    out, (S, z) = results["132"]
    assert_close(out, ref, TOL[torch.bfloat16], "out")
    assert_close(S, ref_S, TOL[torch.bfloat16], "final S")
    assert_close(z, ref_z, TOL[torch.bfloat16], "final z")
    assert_close(out, results["2"][0].double(), TOL[torch.bfloat16], "split vs whole")


def test_packed_split_fades_per_sequence(monkeypatch):
    """The split of packed sequences: each sequence's segment fades come from differences of a
    running sum at its own bounds, per channel."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "132")
    offsets = [0, 700, 1300]
    q, k, v, gate = make(1, 2, 1300, 32, 24, torch.bfloat16, seed=14, strength=0.05)
    out, (S, z) = fused(q, k, v, gate, cu_seqlens=torch.tensor(offsets, dtype=torch.int32))
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        rows = [t[:, :, a:b].double() for t in (q, k, v, gate)]
        ref, (ref_S, ref_z) = reference.decayed_linear_attention(*rows)
        assert_close(out[:, :, a:b], ref, TOL[torch.bfloat16], f"sequence {n}")
        assert_close(S[n:n + 1], ref_S, TOL[torch.bfloat16], f"sequence {n} S")


def gradients(q, k, v, gate, decay=None, initial_state=None, seed=0, fused_backend=True, **options):
    """out, the final state and the gradients of q, k, v, the gate (and decay, S0, z0 where given) of
    a random linear function of out and the final state: under the fused operators (asserting that
    the tensor-core backward ran), or through the float64 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gate)]
    extra = [t.detach().clone().requires_grad_() for t in ((decay,) if decay is not None else ())]
    state = None if initial_state is None else tuple(t.detach().clone().requires_grad_() for t in initial_state)
    g = torch.Generator().manual_seed(seed)
    if fused_backend:
        with ops.fused_implementation():
            out, (S, z) = linattn.linear_attention(*leaves[:3], causal=True, gate=leaves[3],
                                                   decay=extra[0] if extra else None, initial_state=state,
                                                   output_final_state=True, **options)
    else:
        log_f = leaves[3]
        if extra:
            log_f = log_f + extra[0].log().view(1, -1, 1, 1)
        out, (S, z) = reference.decayed_linear_attention(*leaves[:3], log_f, initial_state=state, **options)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, S, z)]
    loss = sum((t.double() * w).sum() for t, w in zip((out, S, z), weights))
    inputs = leaves + extra + (list(state) if state is not None else [])
    torch.ops.linattn._reset_warp_emulation_counters()
    grads = torch.autograd.grad(loss, inputs)
    if fused_backend:
        assert mma_count() > 0, "the tensor-core backward did not run"
    return grads


def double(*tensors):
    return [None if t is None else t.double() for t in tensors]


def check_gradients(q, k, v, gate, tol, decay=None, initial_state=None, **options):
    ours = gradients(q, k, v, gate, decay, initial_state, **options)
    state = None if initial_state is None else tuple(double(*initial_state))
    theirs = gradients(*double(q, k, v, gate), None if decay is None else decay.double(), state,
                       fused_backend=False, **options)
    names = ["q", "k", "v", "gate"] + (["decay"] if decay is not None else []) + (["S0", "z0"] if state else [])
    for name, a, b in zip(names, ours, theirs):
        assert_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("T", [1, 17, 64, 65, 150])
def test_gradients_around_the_chunk(dtype, T):
    check_gradients(*make(2, 2, T, 32, 24, dtype, seed=T), 2 * TOL[dtype])


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("m, dv", [(8, 8), (64, 64), (100, 33), (128, 128), (48, 160)])
def test_gradients_head_dims_and_value_tiles(dtype, m, dv):
    """Feature dims up to 128; value columns in tiles of 64 (dv > 64: dq, dk and dL/dc summed over
    the tiles)."""
    check_gradients(*make(1, 2, 100, m, dv, dtype, seed=m + dv), 2 * TOL[dtype])


@pytest.mark.parametrize("feature_map, normalize", [("elu", True), ("relu", True), ("elu", False),
                                                    ("identity", False)])
def test_gradients_feature_maps_padding_decay_and_state(feature_map, normalize):
    """φ' on dq and dk, key padding (0 gradients for padded keys), a per-head decay folded into the
    gates (its gradient too) and an initial state (dS0, dz0)."""
    q, k, v, gate = make(2, 3, 100, 32, 24, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 100, generator=g) < 0.2
    state = (torch.randn(2, 3, 32, 24, generator=g), torch.rand(2, 3, 32, generator=g) + 1)
    decay = torch.tensor([1.0, 0.97, 0.6])
    check_gradients(q, k, v, gate, 2 * TOL[torch.bfloat16], decay=decay, initial_state=state, key_padding_mask=mask,
                    feature_map=feature_map, normalize=normalize)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_gradients_under_strong_gates(dtype):
    """Channels closing by up to e^-40 a token beside channels that barely fade or never do: every
    factor of the backward's products stays <= 1 (split through a reference row between the blocks,
    exact within them), so nothing overflows and every gradient matches."""
    q, k, v, _ = make(1, 2, 150, 32, 24, dtype, seed=5)
    check_gradients(q, k, v, strong_gates(1, 150), 2 * TOL[dtype])


def test_packed_gradients_equal_each_sequence_alone():
    """Packed sequences: dq, dk, dv equal one call per sequence bit for bit; the gate's gradient
    (its reverse cumulative sum runs per segment of the packing in one, per call in the other) to
    fp32 rounding."""
    offsets = [0, 5, 70, 200]
    q, k, v, gate = make(1, 2, 200, 32, 24, torch.bfloat16, seed=8)
    g = torch.Generator().manual_seed(9)
    cot = torch.randn(1, 2, 200, 24, generator=g).bfloat16()

    def run(rows, cu=None):
        leaves = [t.clone().requires_grad_() for t in rows]
        with ops.fused_implementation():
            out = linattn.linear_attention(*leaves[:3], causal=True, gate=leaves[3], cu_seqlens=cu)
        return torch.autograd.grad(out, leaves, cot[:, :, :out.shape[2]] if cu is None else cot)

    packed = run((q, k, v, gate), torch.tensor(offsets, dtype=torch.int32))
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        rows = [t[:, :, a:b] for t in (q, k, v, gate)]
        cot_rows = cot[:, :, a:b]
        leaves = [t.clone().requires_grad_() for t in rows]
        with ops.fused_implementation():
            out = linattn.linear_attention(*leaves[:3], causal=True, gate=leaves[3])
        alone = torch.autograd.grad(out, leaves, cot_rows)
        for name, x, y in zip(("q", "k", "v"), packed, alone):
            assert torch.equal(x[:, :, a:b], y), f"sequence {n} grad {name}"
        assert_close(packed[3][:, :, a:b], alone[3].double(), 1e-5, f"sequence {n} grad gate")


def test_gradients_split_into_segments(monkeypatch):
    """One long sequence split into segments for 132 SMs in the backward too (the query and key-value
    passes per segment from states scanned over segments, fading channel by channel)."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "132")
    q, k, v, gate = make(1, 1, 1200, 32, 24, torch.bfloat16, seed=12, strength=0.05)
    g = torch.Generator().manual_seed(13)
    state = (torch.randn(1, 1, 32, 24, generator=g), torch.rand(1, 1, 32, generator=g) + 1)
    check_gradients(q, k, v, gate, 2 * TOL[torch.bfloat16], initial_state=state)


def test_opcheck_and_compile():
    """opcheck of both fused operators with (B, H, T, m) log factors; torch.compile(fullgraph=True)
    of a training step equal to eager, output and gradients."""
    q, k, v, gate = make(1, 2, 90, 32, 24, torch.bfloat16, seed=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]

    def step(*t):
        out = linattn.linear_attention(*t[:3], causal=True, gate=t[3])
        return out, torch.autograd.grad(out.float().square().sum(), t)

    with ops.fused_implementation():
        eager = step(*leaves)
        compiled = torch.compile(lambda *t: linattn.linear_attention(*t[:3], causal=True, gate=t[3]), fullgraph=True)
        out = compiled(*leaves)
        assert torch.equal(out, eager[0])
        for a, b in zip(torch.autograd.grad(out.float().square().sum(), leaves), eager[1]):
            assert torch.equal(a, b)
    log_decay = gate.contiguous()
    torch.library.opcheck(FWD, (q, k, v, None, None, ELU, True, True, 1e-6, log_decay))
    out, state, normalizer = FWD(q, k, v, None, None, ELU, True, True, 1e-6, log_decay)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    torch.library.opcheck(BWD, (grad, None, q, k, v, out, normalizer, None, None, ELU, True, True, None, log_decay))


def test_wide_features_fall_back_to_the_device_kernel():
    """Feature dims above 128 (G would not fit beside a 256-wide chunk) leave gates per channel to the
    device's own kernel (here the CPU's; on a GPU the device-generic one): no mma, and the results
    against the reference."""
    q, k, v, gate = make(1, 1, 70, 160, 16, torch.bfloat16, seed=9)
    torch.ops.linattn._reset_warp_emulation_counters()
    out, state, _ = FWD(q, k, v, None, None, ELU, True, True, 1e-6, gate)
    assert mma_count() == 0
    ref, (ref_S, _) = reference.decayed_linear_attention(q.double(), k.double(), v.double(), gate.double())
    assert_close(out, ref, TOL[torch.bfloat16], "out")
    assert_close(state[..., :16], ref_S, TOL[torch.bfloat16], "final S")


def test_shared_memory_of_the_instances():
    """G (64 rows of DK + 4 fp32) and the diagonal blocks' pair weights (64 × 16 fp32) beside the
    per-token layouts: the forward at DK = DV = 128 within an H100 block's 227 KiB; the backward's
    128 x 128 not (so it takes 64-column value tiles), its 128 x 64 within."""
    extra = 64 * 132 * 4 + 64 * 16 * 4
    shared = torch.ops.linattn._tensor_core_shared_bytes
    assert shared(128, 128, False, True) - shared(128, 128) == extra
    assert shared(128, 128, False, True) <= 227 * 1024
    assert shared(128, 128, True, True) - shared(128, 128, True) == extra
    assert shared(128, 128, True, True) > 227 * 1024 >= shared(128, 64, True, True)


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("T, m, dv", [(1, 32, 24), (200, 64, 64), (1000, 128, 128), (333, 100, 160), (5000, 64, 64)])
def test_cuda_kernel_matches_reference(dtype, T, m, dv):
    """The CUDA kernel (B·H = 1 at T = 5000 takes the sequence split)."""
    B, H = (1, 1) if T == 5000 else (2, 3)
    q, k, v, gate = make(B, H, T, m, dv, dtype, seed=T)
    out, state, _ = FWD(q.cuda(), k.cuda(), v.cuda(), None, None, ELU, True, True, 1e-6, gate.cuda())
    ref, (ref_S, ref_z) = reference.decayed_linear_attention(q.double(), k.double(), v.double(), gate.double())
    assert_close(out.cpu(), ref, TOL[dtype], "out")
    assert_close(state[..., :dv].cpu(), ref_S, TOL[dtype], "final S")
    assert_close(state[..., dv].cpu(), ref_z, TOL[dtype], "final z")


@needs_gpu
def test_cuda_kernel_equals_emulation():
    """The GPU and its CPU emulation run the same kernel source: equal up to the order of the fp32
    additions inside an mma and the device's fast exponential."""
    q, k, v, gate = make(2, 4, 333, 64, 48, torch.bfloat16, seed=21)
    args = (None, None, ELU, True, True, 1e-6)
    gpu = FWD(q.cuda(), k.cuda(), v.cuda(), *args, gate.cuda())
    cpu = FWD(q, k, v, *args, gate)
    for a, b in zip(gpu, cpu):
        assert_close(a.cpu(), b.double(), 1e-2, "GPU vs emulation")
