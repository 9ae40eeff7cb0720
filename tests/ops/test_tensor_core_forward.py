"""The tensor-core forward of linear attention (csrc/linear_attention/tensor_core/forward.h).

linear_attn_fwd_fused runs it for bfloat16 and float16 inputs with head dims up to 128; on CPU
tensors through the warp-operation layer's emulation (every lane of every warp, ldmatrix and mma
with the PTX ISA's fragment layouts, cp.async landing only at its wait, shared memory starting as
NaN). Each test counts the mma instructions the emulation executed, so a test cannot pass on
another path. Figures of the static checks (traffic, bank conflicts) are printed by
benchmarks/bench_tensor_core.py; the thresholds the issue sets are asserted here."""

import pytest
import torch

import linattn
from linattn import ops, reference
from conftest import (TOLERANCE, assert_close, assert_tensor_cores_without_local_memory, compiled_kernel_rows,
                      fading_extremes, gated_inputs, gated_reference, log_factors)

FWD = torch.ops.linattn.linear_attn_fwd_fused.default
HALF_TYPES = [torch.bfloat16, torch.float16]
ELU = 1


def counters():
    names = ("mma", "ldmatrix_matrices", "ldmatrix_wavefronts", "shuffles", "read_bytes", "written_bytes")
    return dict(zip(names, torch.ops.linattn._warp_emulation_counters().tolist()))


def run(q, k, v, causal=True, initial_state=None, mask=None, feature_map=ELU, normalize=True):
    """The fused forward, asserting that the tensor cores' emulation ran it."""
    torch.ops.linattn._reset_warp_emulation_counters()
    result = FWD(q, k, v, initial_state, mask, feature_map, causal, normalize, 1e-6)
    assert counters()["mma"] > 0, "the tensor-core forward did not run"
    return result


def reference_forward(q, k, v, causal=True, initial_state=None, mask=None, feature_map="elu", normalize=True):
    state = None
    if initial_state is not None:
        state = (initial_state[..., :-1].double(), initial_state[..., -1].double())
    out, (S, z) = reference.linear_attention(q.double(), k.double(), v.double(), causal=causal, initial_state=state,
                                             key_padding_mask=mask, feature_map=feature_map, normalize=normalize)
    return out, S, z


def make(B, H, Tq, Tk, m, dv, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=torch.float64).mul(scale).to(dtype)
            for T, d in ((Tq, m), (Tk, m), (Tk, dv))]


def check(q, k, v, tol, **options):
    out, state, _ = run(q, k, v, **options)
    ref, S, z = reference_forward(q, k, v, **options)
    dv = v.shape[-1]
    assert out.dtype == q.dtype
    assert_close(out, ref, tol, "out")
    assert_close(state[..., :dv], S, tol, "final S")
    assert_close(state[..., dv], z, tol, "final z")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 15, 63, 64, 65, 128, 131, 200])
def test_matches_reference_around_the_chunk(dtype, causal, T):
    q, k, v = make(2, 3, T, T, 32, 48, dtype)
    check(q, k, v, TOLERANCE[dtype], causal=causal)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("m, dv", [(16, 16), (8, 24), (24, 40), (64, 64), (65, 63), (100, 70), (64, 128), (128, 64),
                                   (128, 128), (32, 200), (128, 256), (200, 72), (256, 256)])
@pytest.mark.parametrize("causal", [True, False])
def test_head_dims(dtype, m, dv, causal):
    q, k, v = make(1, 2, 77, 77, m, dv, dtype, seed=1, scale=0.5)
    check(q, k, v, TOLERANCE[dtype], causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map, normalize", [(1, True), (1, False), (2, True), (2, False), (0, False)])
def test_feature_maps_padding_and_state(causal, feature_map, normalize):
    dtype = torch.bfloat16
    q, k, v = make(2, 2, 100, 100, 24, 20, dtype, seed=5)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, 70:] = True
    mask[1, ::3] = True
    g = torch.Generator().manual_seed(3)
    state = torch.cat([torch.randn(2, 2, 24, 20, generator=g), torch.rand(2, 2, 24, 1, generator=g) * 2], -1)
    names = {0: "identity", 1: "elu", 2: "relu"}
    out, S, _ = run(q, k, v, causal=causal, initial_state=state, mask=mask, feature_map=feature_map,
                    normalize=normalize)
    ref, S_ref, z_ref = reference_forward(q, k, v, causal=causal, initial_state=state, mask=mask,
                                          feature_map=names[feature_map], normalize=normalize)
    assert_close(out, ref, TOLERANCE[dtype], "out")
    assert_close(S[..., :20], S_ref, TOLERANCE[dtype], "final S")
    assert_close(S[..., 20], z_ref, TOLERANCE[dtype], "final z")


def test_padded_keys_may_hold_inf_and_nan():
    """A padded key's row adds nothing, whatever it holds (its φ(k) and v rows are zeroed in
    shared memory, so no 0·Inf reaches an mma)."""
    q, k, v = make(1, 2, 90, 90, 32, 32, torch.bfloat16, seed=7)
    mask = torch.zeros(1, 90, dtype=torch.bool)
    mask[0, 10:80:7] = True
    clean = run(q, k, v, mask=mask)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, mask[0]] = float("inf")
    v2[:, :, mask[0]] = float("nan")
    dirty = run(q, k2, v2, mask=mask)[0]
    assert torch.equal(clean, dirty)


def test_cross_attention_lengths():
    for Tq, Tk in ((40, 150), (150, 3), (1, 64)):
        q, k, v = make(2, 2, Tq, Tk, 20, 12, torch.float16, seed=Tq)
        check(q, k, v, TOLERANCE[torch.float16], causal=False)


@pytest.mark.parametrize("causal", [True, False])
def test_strided_and_unaligned_rows(causal):
    """(B, T, H, D) layouts take 16-byte copies; a column-sliced v and a storage offset that
    breaks 16-byte alignment take element loads."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 70, 3, 32, generator=g).bfloat16().transpose(1, 2) for _ in range(2))
    v_wide = torch.randn(2, 3, 70, 40, generator=g).bfloat16()
    v = v_wide[..., 3:30]
    check(q, k, v, TOLERANCE[torch.bfloat16], causal=causal)
    flat = torch.randn(2 * 3 * 70 * 32 + 1, generator=g).bfloat16()
    q_unaligned = flat[1:].view(2, 3, 70, 32)
    check(q_unaligned, k.contiguous(), v.contiguous(), TOLERANCE[torch.bfloat16], causal=causal)


def test_offsets_past_2_to_the_31():
    """Element offsets are 64-bit: the second batch's rows start 2^31 + 64 elements after the
    first (a 4 GiB allocation of which only the used rows are touched)."""
    T, D = 70, 16
    stride_b = 2 ** 31 + 64
    storage = torch.empty(stride_b + T * D, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    views = []
    for _ in range(3):
        x = storage.as_strided((2, 1, T, D), (stride_b, T * D, D, 1))
        x[0].copy_(torch.randn(1, T, D, generator=g))
        x[1].copy_(torch.randn(1, T, D, generator=g))
        views.append(x.clone())  # the values, compact, for the reference
    # One storage for all three would alias them: q, k, v each get a storage of their own.
    inputs = []
    for compact in views:
        big = torch.empty(stride_b + T * D, dtype=torch.bfloat16)
        x = big.as_strided((2, 1, T, D), (stride_b, T * D, D, 1))
        x.copy_(compact)
        inputs.append(x)
    out = run(*inputs)[0]
    ref = reference_forward(*views)[0]
    assert_close(out, ref, TOLERANCE[torch.bfloat16], "out")


def test_equals_simt_kernels(monkeypatch):
    """LINATTN_TENSOR_CORES=0 keeps 16-bit inputs on the SIMT kernels: both agree to bf16 rounding."""
    q, k, v = make(2, 2, 150, 150, 64, 64, torch.bfloat16, seed=4)
    for causal in (True, False):
        tensor_core = run(q, k, v, causal=causal)
        monkeypatch.setenv("LINATTN_TENSOR_CORES", "0")
        torch.ops.linattn._reset_warp_emulation_counters()
        simt = FWD(q, k, v, None, None, ELU, causal, True, 1e-6)
        assert counters()["mma"] == 0
        monkeypatch.delenv("LINATTN_TENSOR_CORES")
        for a, b in zip(tensor_core, simt):
            assert_close(a, b.double(), 1e-2, "tensor cores vs SIMT")


def test_falls_back_when_shared_memory_is_small(monkeypatch):
    """A GPU whose blocks have less shared memory than the kernel's (sm_86: 99 KiB at D = 128)
    runs the SIMT kernels."""
    monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", str(99 * 1024))
    q, k, v = make(1, 1, 20, 20, 128, 128, torch.bfloat16)
    torch.ops.linattn._reset_warp_emulation_counters()
    FWD(q, k, v, None, None, ELU, True, True, 1e-6)
    assert counters()["mma"] == 0


def test_long_sequence_traffic_and_bank_conflicts(monkeypatch):
    """The issue's static figures for the causal forward at B=1 H=2 D=128 T=4096 bf16: global
    traffic at most 1.15x reading q, k, v and writing o once, and no ldmatrix bank conflicts
    (one block per (batch, head): a GPU with as many SMs as blocks, so no sequence split)."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "2")
    B, H, T, D = 1, 2, 4096, 128
    q, k, v = make(B, H, T, T, D, D, torch.bfloat16, seed=6, scale=0.3)
    run(q, k, v)
    c = counters()
    floor = 4 * B * H * T * D * 2
    traffic = c["read_bytes"] + c["written_bytes"]
    assert traffic <= 1.15 * floor, f"traffic {traffic / floor:.3f}x the floor"
    assert c["ldmatrix_wavefronts"] == c["ldmatrix_matrices"], "ldmatrix bank conflicts"


@pytest.mark.parametrize("causal", [True, False])
def test_autograd_opcheck_and_compile(causal):
    """The operator through linattn.linear_attention: gradients (the backward is the SIMT
    kernels'), opcheck, and torch.compile(fullgraph=True) equal to eager."""
    q, k, v = (t.requires_grad_() for t in make(1, 2, 70, 70, 32, 32, torch.bfloat16, seed=8))
    with ops.fused_implementation():
        out = linattn.linear_attention(q, k, v, causal=causal)
        out.float().square().sum().backward()
        compiled = torch.compile(lambda a, b, c: linattn.linear_attention(a, b, c, causal=causal), fullgraph=True)
        assert torch.equal(compiled(q, k, v), out)
    ref = reference.linear_attention(*(t.detach().double().requires_grad_() for t in (q, k, v)), causal=causal)[0]
    assert_close(out.detach(), ref.detach(), TOLERANCE[torch.bfloat16], "out")
    torch.library.opcheck(FWD, (q.detach(), k.detach(), v.detach(), None, None, ELU, causal, True, 1e-6))


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_later_value_never_reaches_earlier_rows(dtype, bad):
    """Causal: rows before a key whose value holds Inf or NaN never see it (the reference excludes
    masked pairs rather than multiplying them by 0), here at both ends of a 16-row block and of
    the chunk; rows from that key on see it, as in the reference."""
    q, k, v = make(1, 2, 150, 150, 32, 24, dtype, seed=12)
    for key in (5, 16, 63, 64, 100):
        v_bad = v.clone()
        v_bad[0, 1, key, 7] = bad
        out = run(q, k, v_bad)[0]
        ref = reference_forward(q, k, v_bad)[0]
        assert torch.isfinite(out[:, :, :key]).all()
        assert_close(out[:, :, :key], ref[:, :, :key], TOLERANCE[dtype], "rows before the key")
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref))


def test_cubins_hold_tensor_core_instructions_and_no_local_memory():
    """The compiled kernels (sm_80 and sm_90, every head-dim and dtype instance) use mma.sync
    (HMMA.16816.F32 in their SASS) and no local memory: no register spills, no stack."""
    # two architectures, two dtypes, five (DK, DV) instances plain and fading, and four (DK <= 128)
    # for gates per channel
    assert_tensor_cores_without_local_memory(compiled_kernel_rows("linear"), 2 * 2 * (5 * 2 + 4))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_state_and_mask", [False, True])
def test_sequence_split(monkeypatch, causal, with_state_and_mask):
    """Too few (batch, head) blocks for the GPU's SMs: the rows are cut into segments (state sums,
    their prefix, then each segment's outputs). Emulating 16 SMs, B·H = 2 and T = 1100 give two
    segments; the split reads K and V twice when causal, which the traffic shows."""
    q, k, v = make(1, 2, 1100, 1100, 32, 24, torch.bfloat16, seed=13)
    options = {"causal": causal}
    if with_state_and_mask:
        g = torch.Generator().manual_seed(4)
        options["initial_state"] = torch.cat([torch.randn(1, 2, 32, 24, generator=g),
                                              torch.rand(1, 2, 32, 1, generator=g)], -1)
        options["mask"] = torch.zeros(1, 1100, dtype=torch.bool)
        options["mask"][0, 500:700:3] = True
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "1")
    whole = run(q, k, v, **options)
    whole_read = counters()["read_bytes"]
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "16")
    split = run(q, k, v, **options)
    split_read = counters()["read_bytes"]
    kv_bytes = (k.numel() + v.numel()) * 2
    if causal:  # the states pass reads K and V once more
        assert split_read >= whole_read + kv_bytes
    else:  # the same rows, once each, and each segment reads the total state
        state_bytes = 2 * 2 * 32 * 25 * 4  # (heads, segments, m, dv + 1) in fp32
        assert whole_read <= split_read <= whole_read + state_bytes
    ref, S, z = reference_forward(q, k, v, **options)
    for name, (a, b) in {"out": (split[0], ref), "S": (split[1][..., :24], S), "z": (split[1][..., 24], z)}.items():
        assert_close(a, b, TOLERANCE[torch.bfloat16], name)
    assert_close(split[0], whole[0].double(), 1e-2, "split vs whole")


# --- On a GPU: the compiled kernel itself ----------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, H, T, m, dv", [(2, 3, 1, 32, 24), (2, 3, 131, 32, 24), (1, 2, 77, 128, 128),
                                            (4, 8, 300, 64, 64), (1, 1, 5000, 64, 64)])
def test_cuda_kernel_matches_reference(dtype, causal, B, H, T, m, dv):
    """The CUDA kernel (B·H = 1 at T = 5000 takes the sequence split), with padding and a state."""
    q, k, v = (t.cuda() for t in make(B, H, T, T, m, dv, dtype, seed=T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, T // 3:T // 2] = True
    g = torch.Generator().manual_seed(1)
    state = torch.cat([torch.randn(B, H, m, dv, generator=g), torch.rand(B, H, m, 1, generator=g)], -1)
    out, S, _ = FWD(q, k, v, state.cuda(), mask.cuda(), ELU, causal, True, 1e-6)
    ref, S_ref, z_ref = reference_forward(q.cpu(), k.cpu(), v.cpu(), causal=causal, initial_state=state, mask=mask)
    assert_close(out.cpu(), ref, TOLERANCE[dtype], "out")
    assert_close(S[..., :dv].cpu(), S_ref, TOLERANCE[dtype], "final S")
    assert_close(S[..., dv].cpu(), z_ref, TOLERANCE[dtype], "final z")


@needs_gpu
def test_cuda_kernel_equals_emulation():
    """The GPU and its CPU emulation run the same kernel source: equal up to the order of the fp32
    additions inside an mma."""
    q, k, v = make(2, 4, 333, 333, 64, 64, torch.bfloat16, seed=21)
    for causal in (True, False):
        gpu = FWD(q.cuda(), k.cuda(), v.cuda(), None, None, ELU, causal, True, 1e-6)
        cpu = FWD(q, k, v, None, None, ELU, causal, True, 1e-6)
        for a, b in zip(gpu, cpu):
            assert_close(a.cpu(), b.double(), 1e-2, "GPU vs emulation")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m, dv", [(48, 150), (160, 100)])
def test_value_tiles_with_state_and_padding(monkeypatch, causal, m, dv):
    """dv wider than a block's value tile (128 columns; 64 beside m > 128): a block per tile, each
    computing the normalizer, tile 0 writing it and z; with an initial state, padding, and the
    sequence split on top (16 emulated SMs)."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "16")
    q, k, v = make(1, 2, 1100, 1100, m, dv, torch.bfloat16, seed=14, scale=0.5)
    g = torch.Generator().manual_seed(5)
    state = torch.cat([torch.randn(1, 2, m, dv, generator=g), torch.rand(1, 2, m, 1, generator=g)], -1)
    mask = torch.zeros(1, 1100, dtype=torch.bool)
    mask[0, 300:900:5] = True
    out, S, _ = run(q, k, v, causal=causal, initial_state=state, mask=mask)
    ref, S_ref, z_ref = reference_forward(q, k, v, causal=causal, initial_state=state, mask=mask)
    assert_close(out, ref, TOLERANCE[torch.bfloat16], "out")
    assert_close(S[..., :dv], S_ref, TOLERANCE[torch.bfloat16], "final S")
    assert_close(S[..., dv], z_ref, TOLERANCE[torch.bfloat16], "final z")


@pytest.mark.parametrize("causal", [True, False])
def test_no_value_columns_still_write_z(causal):
    """dv = 0: no value tile, yet one block per (batch, head) writes the normalizer and z."""
    q, k, v = make(1, 2, 70, 70, 16, 0, torch.bfloat16, seed=15)
    out, S, den = run(q, k, v, causal=causal)
    ref, _, z = reference_forward(q, k, v, causal=causal)
    assert out.shape == ref.shape
    assert_close(S[..., 0], z, TOLERANCE[torch.bfloat16], "final z")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("T", [1, 17, 64, 65, 200])
@pytest.mark.parametrize("m, dv", [(32, 24), (128, 128), (100, 160)])
def test_fading_state_runs_on_tensor_cores(dtype, T, m, dv):
    """decay and gate (a fading state) inside the tensor-core forward: e^(b_i − b_j) on the chunk's
    fp32 scores, e^(b_i) on the earlier chunks' part, the state faded by the chunk's total and its
    keys by e^(b_last − b_j) (b = the chunk's cumulative log factors; no positive exponent), against
    the float64 reference, the final state too (the backward: test_tensor_core_fading_backward.py)."""
    q, k, v, decay, gate = gated_inputs(2, 3, T, m, dv, dtype, seed=T + m)
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        out, (S, z) = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate, output_final_state=True)
    assert counters()["mma"] > 0, "the tensor-core forward did not run"
    ref, (ref_S, ref_z) = gated_reference(q, k, v, decay, gate)
    assert_close(out, ref, TOLERANCE[dtype], "out")
    assert_close(S, ref_S, TOLERANCE[dtype], "final S")
    assert_close(z, ref_z, TOLERANCE[dtype], "final z")


@pytest.mark.parametrize("strength", [0.0, 30.0])
def test_fading_state_extremes_padding_and_initial_state(strength):
    """No fading (log factors 0) and a state that forgets within a token (e^(-3) per step and
    less), with key padding and an initial state, through the tensor cores."""
    q, k, v, decay, gate, mask, (S0, z0) = fading_extremes(64, 64, strength)
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        out, (S, z) = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate, key_padding_mask=mask,
                                               initial_state=(S0, z0), output_final_state=True)
    assert counters()["mma"] > 0, "the tensor-core forward did not run"
    ref, (ref_S, ref_z) = gated_reference(q, k, v, decay, gate, key_padding_mask=mask,
                                          initial_state=(S0.double(), z0.double()))
    assert_close(out, ref, TOLERANCE[torch.bfloat16], "out")
    assert_close(S, ref_S, TOLERANCE[torch.bfloat16], "final S")
    assert_close(z, ref_z, TOLERANCE[torch.bfloat16], "final z")


def test_fading_state_gradients_opcheck_and_compile():
    """Gated calls under the fused operators: the gradients of q, k, v, the gate and the decay
    (the tensor-core backward) against the reference, opcheck of the forward operator with
    log_decay, and torch.compile(fullgraph=True) equal to eager."""
    q, k, v, decay, gate = gated_inputs(1, 2, 90, 32, 32, torch.bfloat16, seed=4)
    leaves = [t.requires_grad_() for t in (q, k, v, decay, gate)]
    with ops.fused_implementation():
        out = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate)
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        compiled = torch.compile(lambda *t: linattn.linear_attention(*t[:3], causal=True, decay=t[3], gate=t[4]),
                                 fullgraph=True)
        assert torch.equal(compiled(*leaves), out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = gated_reference(*ref_leaves)[0]
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    for name, a, b in zip(("q", "k", "v", "decay", "gate"), grads, ref_grads):
        assert_close(a, b, 4 * TOLERANCE[torch.bfloat16], f"grad {name}")
    log_decay = log_factors(decay.detach(), gate.detach(), *gate.shape).float()
    torch.library.opcheck(FWD, (q.detach(), k.detach(), v.detach(), None, None, ELU, True, True, 1e-6, log_decay))


@pytest.mark.parametrize("initial", [False, True])
def test_fading_state_split_into_segments(monkeypatch, initial):
    """One long sequence with a fading state, split into segments for 132 SMs: each segment's
    state sums fade within it (the kernel), and the starts are a scan over segments in which every
    state fades by the segment's total (fading_segment_starts); against the float64 reference, and
    against the unsplit kernel (2 SMs)."""
    B, H, T, m, dv = 1, 2, 1700, 32, 24
    q, k, v, decay, gate = gated_inputs(B, H, T, m, dv, torch.bfloat16, seed=12, strength=0.2)
    g = torch.Generator().manual_seed(13)
    state = (torch.randn(B, H, m, dv, generator=g), torch.rand(B, H, m, generator=g) + 1) if initial else None
    results = {}
    for sms in ("132", "2"):
        monkeypatch.setenv("LINATTN_EMULATED_SMS", sms)
        with ops.fused_implementation():
            results[sms] = linattn.linear_attention(q, k, v, causal=True, decay=decay, gate=gate, initial_state=state,
                                                    output_final_state=True)
    ref_state = None if state is None else tuple(t.double() for t in state)
    ref, (ref_S, ref_z) = gated_reference(q, k, v, decay, gate, initial_state=ref_state)
    out, (S, z) = results["132"]
    assert_close(out, ref, TOLERANCE[torch.bfloat16], "out")
    assert_close(S, ref_S, TOLERANCE[torch.bfloat16], "final S")
    assert_close(z, ref_z, TOLERANCE[torch.bfloat16], "final z")
    assert_close(out, results["2"][0].double(), TOLERANCE[torch.bfloat16], "split vs whole")
