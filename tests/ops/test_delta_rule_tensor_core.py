"""The delta rule's tensor-core forward (csrc/delta_rule/tensor_core/forward.h).

delta_rule_fwd_fused runs it for bfloat16 and float16 inputs with key dims up to 128; on CPU
tensors through the warp-operation layer's emulation (every lane of every warp, ldmatrix and mma
with the PTX ISA's fragment layouts, cp.async landing only at its wait, shared memory starting as
NaN). Each test counts the mma instructions the emulation executed, so a test cannot pass on
another path; the float64 per-token recurrence (reference.delta_rule) is the oracle."""

import pytest
import torch

import linattn
from linattn import ops, reference
from linattn.delta_rule import l2_normalize
from conftest import assert_close, assert_tensor_cores_without_local_memory, compiled_kernel_rows

FWD = torch.ops.linattn.delta_rule_fwd_fused.default
HALF_TYPES = [torch.bfloat16, torch.float16]
# The kernel rounds what the CPU kernel keeps in fp32 (T = (I + A)⁻¹, W, u, the state's copy) to
# the inputs' 16 bits before each tensor-core product: measured errors are about twice the CPU
# kernel's at the same dtype (bf16 ~4e-3, fp16 ~5e-4 relative).
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mma_count():
    return int(torch.ops.linattn._warp_emulation_counters()[0])


def run(q, k, v, beta, gate=None, state=None, causal=True, scale=None, normalize_qk=True, cu_seqlens=None):
    """The fused forward, asserting that the tensor cores' emulation ran it."""
    torch.ops.linattn._reset_warp_emulation_counters()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    result = FWD(q, k, v, beta, gate, state, cu_seqlens, causal, scale, normalize_qk)
    assert mma_count() > 0, "the tensor-core forward did not run"
    return result


def make(B, H, T, dk, dv, dtype, seed=0, gated=True, state=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, dk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g).to(dtype)
    beta = torch.rand(B, H, T, generator=g).to(dtype)
    gate = (-torch.rand(B, H, T, generator=g) * 0.3).to(dtype) if gated else None
    S0 = torch.randn(B, H, dk, dv, generator=g) if state else None
    return q, k, v, beta, gate, S0


def expected(q, k, v, beta, gate, S0, causal=True, scale=None, normalize_qk=True):
    qd, kd = q.double(), k.double()
    if normalize_qk:
        qd, kd = l2_normalize(qd), l2_normalize(kd)
    return reference.delta_rule(qd, kd, v.double(), beta.double(), gate=None if gate is None else gate.double(),
                                scale=scale, initial_state=None if S0 is None else S0.double(), causal=causal)


def check(q, k, v, beta, gate, S0, tol, causal=True, **options):
    out, S = run(q, k, v, beta, gate, S0, causal=causal, **options)
    ref_out, ref_S = expected(q, k, v, beta, gate, S0, causal, **options)
    assert out.dtype == q.dtype and out.shape == v.shape and S.dtype == torch.float32
    assert_close(out, ref_out, tol, "out")
    assert_close(S, ref_S, tol, "final state")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("T", [1, 15, 63, 64, 65, 130, 200])
def test_matches_the_recurrence_around_the_chunk(dtype, causal, gated, T):
    q, k, v, beta, gate, S0 = make(2, 3, T, 32, 48, dtype, seed=T, gated=gated)
    check(q, k, v, beta, gate, S0, TOL[dtype], causal=causal)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("dk, dv", [(8, 24), (16, 16), (64, 64), (65, 63), (100, 70), (64, 128), (128, 64),
                                    (128, 128), (32, 200), (128, 130)])
def test_head_dims_and_value_tiles(dtype, dk, dv):
    """Key dims padded to 64 or 128; value dims in tiles of 64 or 128 columns, a block each."""
    q, k, v, beta, gate, S0 = make(1, 2, 77, dk, dv, dtype, seed=dk + dv)
    for causal in (True, False):
        check(q, k, v, beta, gate, S0, TOL[dtype], causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_without_normalisation_state_or_scale(causal):
    """q and k used as given (already unit rows, as normalize_qk=False expects), no initial state,
    an explicit scale."""
    q, k, v, beta, gate, _ = make(2, 2, 150, 64, 32, torch.bfloat16, seed=3)
    q, k = l2_normalize(q), l2_normalize(k)
    check(q, k, v, beta, gate, None, TOL[torch.bfloat16], causal=causal, scale=0.7, normalize_qk=False)


def test_strided_and_unaligned_rows():
    """Rows that cannot load as 16-byte copies (a transposed layout, an odd storage offset) take
    element loads; the result is the contiguous one's."""
    q, k, v, beta, gate, S0 = make(2, 3, 70, 40, 24, torch.bfloat16, seed=4)
    contiguous = run(q, k, v, beta, gate, S0)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    storage = torch.zeros(k.numel() + 1, dtype=k.dtype)
    k_odd = storage[1:].view(k.shape).copy_(k)
    strided = run(q_t, k_odd, v, beta, gate, S0)
    for a, b in zip(contiguous, strided):
        assert torch.equal(a, b)


def test_long_half_precision_sequence_stays_finite():
    """4000 tokens of float16 with strong writes (β near 1) and slow gates: the state stays bounded
    (unit keys, a contractive transition) and the result follows the recurrence."""
    q, k, v, beta, gate, S0 = make(1, 2, 4000, 64, 64, torch.float16, seed=5)
    beta = (0.9 + 0.1 * beta.float()).half()
    gate = (gate.float() * 0.01).half()
    out, S = run(q, k, v, beta, gate, S0)
    assert torch.isfinite(out).all() and torch.isfinite(S).all()
    ref_out, ref_S = expected(q, k, v, beta, gate, S0)
    assert_close(out, ref_out, TOL[torch.float16], "out")
    assert_close(S, ref_S, TOL[torch.float16], "final state")


def test_collinear_keys_and_full_writes():
    """The worst case of the UT transform: every key the same (or nearly), β = 1, so (I + A) is as
    far from I as unit keys allow; T = (I + A)⁻¹ in fp32 keeps the result on the recurrence
    (measured: 5e-3 out, 7-8e-3 state in bf16)."""
    q, k, v, beta, gate, S0 = make(1, 2, 200, 64, 64, torch.bfloat16, seed=3)
    ones = torch.ones_like(beta)
    for keys in (k[:, :, :1].expand_as(k).contiguous(), (k[:, :, :1] + 0.05 * k.float()).bfloat16()):
        check(q, keys, v, ones, gate, S0, 1.5e-2)


@pytest.mark.parametrize("gated, with_state, dv", [(True, True, 48), (False, False, 48), (True, True, 200)])
def test_sequence_split(monkeypatch, gated, with_state, dv):
    """Few (batch, head) blocks on many SMs: the sequence is cut into segments, each segment's affine
    map of the state ([N | M] from [0 | I] on [v | 0]) computed at once, composed in order, and every
    segment run again from its true state. Equal to the unsplit kernel up to rounding and to the
    recurrence; more mma than the unsplit run (the two passes ran)."""
    q, k, v, beta, gate, S0 = make(1, 2, 1100, 32, dv, torch.bfloat16, seed=12, gated=gated, state=with_state)
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "2")
    whole, S_whole = run(q, k, v, beta, gate, S0)
    unsplit_mma = mma_count()
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "132")  # 2 segments of 576 rows (the second padded)
    out, S = run(q, k, v, beta, gate, S0)
    assert mma_count() > unsplit_mma
    assert out.shape == v.shape and out.is_contiguous() and S.shape == (1, 2, 32, dv)
    assert_close(out, whole.double(), 1e-2, "split vs unsplit out")
    assert_close(S, S_whole.double(), 1e-2, "split vs unsplit state")
    ref_out, ref_S = expected(q, k, v, beta, gate, S0)
    assert_close(out, ref_out, TOL[torch.bfloat16], "out")
    assert_close(S, ref_S, TOL[torch.bfloat16], "final state")


def test_chaining_states_equals_one_call():
    q, k, v, beta, gate, S0 = make(1, 2, 200, 32, 32, torch.bfloat16, seed=6)
    whole, S_whole = run(q, k, v, beta, gate, S0)
    first, S_mid = run(q[:, :, :90], k[:, :, :90], v[:, :, :90], beta[:, :, :90], gate[:, :, :90], S0)
    second, S_end = run(q[:, :, 90:], k[:, :, 90:], v[:, :, 90:], beta[:, :, 90:], gate[:, :, 90:], S_mid)
    assert_close(torch.cat([first, second], 2), whole.double(), 2e-2, "chained out")
    assert_close(S_end, S_whole.double(), 2e-2, "chained state")


@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences_equal_one_call_per_sequence(causal):
    """cu_seqlens: a block per (sequence, head) from its own state (an empty sequence keeps it),
    bit for bit what each sequence gives alone, and the recurrence."""
    cu = torch.tensor([0, 15, 15, 100, 230], dtype=torch.int32)
    q, k, v, beta, gate, _ = make(1, 2, 230, 32, 40, torch.bfloat16, seed=10)
    S0 = torch.randn(4, 2, 32, 40, generator=torch.Generator().manual_seed(11))
    out, S = run(q, k, v, beta, gate, S0, causal=causal, cu_seqlens=cu)
    assert S.shape == S0.shape
    for n in range(4):
        a, b = int(cu[n]), int(cu[n + 1])
        rows = slice(a, b)
        if a == b:
            assert torch.equal(S[n], S0[n])
            continue
        alone = run(q[:, :, rows], k[:, :, rows], v[:, :, rows], beta[:, :, rows], gate[:, :, rows], S0[n:n + 1],
                    causal=causal)
        assert torch.equal(out[:, :, rows], alone[0]) and torch.equal(S[n:n + 1], alone[1])
        ref_out, ref_S = expected(q[:, :, rows], k[:, :, rows], v[:, :, rows], beta[:, :, rows], gate[:, :, rows],
                                  S0[n:n + 1], causal)
        assert_close(out[:, :, rows], ref_out, TOL[torch.bfloat16], f"out of sequence {n}")
        assert_close(S[n:n + 1], ref_S, TOL[torch.bfloat16], f"state of sequence {n}")


def test_packed_offsets_are_checked():
    q, k, v, beta, gate, _ = make(1, 2, 50, 16, 16, torch.bfloat16)
    for cu, message in (([0, 30, 20, 50], "non-decreasing"), ([0, 30, 40], "end at the packed length")):
        with pytest.raises(RuntimeError, match=message):
            FWD(q, k, v, beta, gate, None, torch.tensor(cu, dtype=torch.int32), True, 1.0, True)


@pytest.mark.parametrize("case", ["float32", "key_dim_129", "switched_off", "small_shared_memory"])
def test_calls_it_does_not_take_run_the_cpu_kernel(monkeypatch, case):
    """The fused operator runs delta_rule_fwd for what the kernel does not take: equal to it, no mma."""
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    dk = 129 if case == "key_dim_129" else 32
    q, k, v, beta, gate, S0 = make(1, 2, 40, dk, 16, dtype, seed=7)
    cu = None
    if case == "switched_off":
        monkeypatch.setenv("LINATTN_TENSOR_CORES", "0")
    if case == "small_shared_memory":
        monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", str(64 * 1024))
    args = (q, k, v, beta, gate, S0.float(), cu, True, 0.5, True)
    torch.ops.linattn._reset_warp_emulation_counters()
    got = FWD(*args)
    assert mma_count() == 0
    want = torch.ops.linattn.delta_rule_fwd(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_the_public_function_runs_it_under_the_fused_backend():
    """delta_rule_attention routes to the fused forward under the fused backend (the tensor cores
    run), close to the CPU kernel's output. (Its gradient, delta_rule_bwd_fused, is
    test_delta_rule_tensor_core_backward.py's.)"""
    q, k, v, beta, gate, S0 = make(1, 2, 70, 32, 16, torch.bfloat16, seed=8)
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        out, S = linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)
    assert mma_count() > 0
    out2, S2 = linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)
    assert_close(out, out2.double(), 2e-2, "out")
    assert_close(S, S2.double(), 2e-2, "final state")


@pytest.mark.parametrize("method", ["deltanet", "gated_deltanet"])
def test_modules_run_it_under_the_fused_backend(method):
    """linattn.nn.MultiheadAttention(method=...) in bfloat16 takes the tensor-core forward under the
    fused backend (with key padding: padded keys have β = 0), close to the CPU kernel's output."""
    torch.manual_seed(0)
    module = linattn.nn.MultiheadAttention(64, 2, method=method, batch_first=True, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 90, 64, dtype=torch.bfloat16)
    padding = torch.zeros(2, 90, dtype=torch.bool)
    padding[1, 70:] = True
    want, _ = module(x, x, x, key_padding_mask=padding, is_causal=True, need_weights=False,
                     attn_mask=torch.ones(90, 90, dtype=torch.bool).triu(1))
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        got, _ = module(x, x, x, key_padding_mask=padding, is_causal=True, need_weights=False,
                        attn_mask=torch.ones(90, 90, dtype=torch.bool).triu(1))
    assert mma_count() > 0
    real = ~padding
    assert_close(got[real], want[real].double(), 2e-2, "module output")


def test_opcheck_and_compile():
    q, k, v, beta, gate, S0 = make(1, 2, 33, 16, 16, torch.bfloat16, seed=9)
    args = (q, k, v, beta, gate, S0, None, True, 0.25, True)
    torch.library.opcheck(FWD, args, test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v, beta, gate, S0):
        with ops.fused_implementation():
            return linattn.delta_rule_attention(q, k, v, beta, gate=gate, initial_state=S0, output_final_state=True)

    eager = f(q, k, v, beta, gate, S0)
    torch.ops.linattn._reset_warp_emulation_counters()
    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, beta, gate, S0)
    assert mma_count() > 0
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_cubins_hold_tensor_core_instructions_and_no_local_memory():
    """The compiled kernels (sm_80 and sm_90, every head-dim and dtype instance) use mma.sync and
    no local memory: no register spills, no stack."""
    # two architectures, two dtypes, four (DK, DV) instances and the backward's two keeping ones (DV = 64),
    # and for gates per key channel two forward and two keeping ones (DK = 64, 128; DV = 64)
    assert_tensor_cores_without_local_memory(compiled_kernel_rows("delta"), 2 * 2 * (4 + 2 + 2 + 2))


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, H, T, dk, dv", [(2, 3, 1, 32, 24), (2, 3, 131, 32, 24), (1, 2, 77, 128, 128),
                                             (4, 8, 300, 64, 64), (1, 2, 3000, 128, 256)])
def test_cuda_kernel_matches_the_recurrence(dtype, causal, B, H, T, dk, dv):
    q, k, v, beta, gate, S0 = make(B, H, T, dk, dv, dtype, seed=T)
    out, S = FWD(q.cuda(), k.cuda(), v.cuda(), beta.cuda(), gate.cuda(), S0.cuda(), None, causal, dk ** -0.5, True)
    ref_out, ref_S = expected(q, k, v, beta, gate, S0, causal)
    assert_close(out.cpu(), ref_out, TOL[dtype], "out")
    assert_close(S.cpu(), ref_S, TOL[dtype], "final state")


@needs_gpu
def test_cuda_kernel_equals_emulation():
    """The GPU and its CPU emulation run the same kernel source: equal up to the order of the fp32
    additions inside an mma (and the GPU's fast exp)."""
    q, k, v, beta, gate, S0 = make(2, 4, 333, 64, 64, torch.bfloat16, seed=21)
    for causal in (True, False):
        gpu = FWD(q.cuda(), k.cuda(), v.cuda(), beta.cuda(), gate.cuda(), S0.cuda(), None, causal, 0.125, True)
        cpu = FWD(q, k, v, beta, gate, S0, None, causal, 0.125, True)
        for a, b in zip(gpu, cpu):
            assert_close(a.cpu(), b.double(), 1e-2, "GPU vs emulation")


@pytest.mark.parametrize("poisoned", ["q", "k", "v", "beta", "gate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_later_non_finite_row_never_reaches_earlier_rows(poisoned, value):
    """Inf or NaN in row 40 (the chunk's third 16-row block, whose diagonal mma blocks would meet it
    through their zeros above the diagonal): the earlier rows' outputs are bitwise those without
    it, the row itself is not finite. q's stays in its own row; the others poison the rows from
    40 on and the state (screen_rows)."""
    q, k, v, beta, gate, S0 = make(1, 2, 150, 32, 24, torch.bfloat16, seed=12)
    clean, _ = run(q, k, v, beta, gate, S0)
    inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone(), "beta": beta.clone(), "gate": gate.clone()}
    if poisoned in ("beta", "gate"):
        inputs[poisoned][:, :, 40] = -value if poisoned == "gate" else value
    else:
        inputs[poisoned][:, :, 40, 1] = value
    out, S = run(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["gate"], S0)
    assert torch.equal(out[:, :, :40], clean[:, :, :40]), "a later row's Inf/NaN reached earlier rows"
    assert not torch.isfinite(out[:, :, 40]).all(), "the poisoned row itself must see its value"
    if poisoned == "q":
        assert torch.equal(out[:, :, 41:], clean[:, :, 41:])
    else:
        assert torch.isnan(out[:, :, 41:]).all() and torch.isnan(S).all()
