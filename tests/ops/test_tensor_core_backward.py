"""The tensor-core backward of linear attention (csrc/linear_attention/tensor_core/backward.h).

linear_attn_bwd_fused runs it for bfloat16 and float16 inputs with head dims up to 128 (up to 256 as
tiles of 128: test_tensor_core_wide_backward.py): a query
pass (dq, forwards in time) and a key-value pass (dk, dv and the initial state's gradient,
backwards in time); on CPU tensors through the warp-operation layer's emulation. Every test counts
the mma instructions the backward's emulation executed, so it cannot pass on the SIMT kernels."""
import math

import pytest
import torch

import linattn
from linattn import ops, reference
from conftest import TOLERANCE, assert_close, compiled_kernel_rows

FWD = torch.ops.linattn.linear_attn_fwd_fused.default
BWD = torch.ops.linattn.linear_attn_bwd_fused.default
HALF_TYPES = [torch.bfloat16, torch.float16]
FEATURE_MAPS = {"identity": 0, "elu": 1, "relu": 2}
CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def counters():
    names = ("mma", "ldmatrix_matrices", "ldmatrix_wavefronts", "shuffles", "read_bytes", "written_bytes")
    return dict(zip(names, torch.ops.linattn._warp_emulation_counters().tolist()))


def make(B, H, Tq, Tk, m, dv, dtype, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=torch.float64).mul(scale).to(device=device, dtype=dtype)
            for T, d in ((Tq, m), (Tk, m), (Tk, dv))]


def cotangents(out, m, seed=1, state=True):
    g = torch.Generator().manual_seed(seed)
    B, H, _, dv = out.shape
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    grad_state = None
    if state:
        grad_state = torch.randn(B, H, m, dv + 1, generator=g, dtype=torch.float64).float().to(out.device)
    return grad_out, grad_state


def run(q, k, v, grad_out=None, grad_state=None, causal=True, initial_state=None, mask=None, feature_map="elu",
        normalize=True, hand_final_state=True, expect_tensor_cores=True):
    """The fused forward, then the fused backward, asserting that the backward ran on (emulated)
    tensor cores. Returns (out, final state, (dq, dk, dv, d initial state), the cotangents)."""
    code = FEATURE_MAPS[feature_map]
    out, state, normalizer = FWD(q, k, v, initial_state, mask, code, causal, normalize, 1e-6)
    if grad_out is None:
        grad_out, grad_state = cotangents(out, q.shape[-1])
    torch.ops.linattn._reset_warp_emulation_counters()
    grads = BWD(grad_out, grad_state, q, k, v, out, normalizer, initial_state, mask, code, causal, normalize,
                state if hand_final_state else None)[:4]
    if q.device.type == "cpu":
        ran = counters()["mma"] > 0
        assert ran == expect_tensor_cores, "the tensor-core backward did not run" if expect_tensor_cores else "it ran"
    return out, state, grads, (grad_out, grad_state)


def reference_gradients(q, k, v, grad_out, grad_state, causal=True, initial_state=None, mask=None,
                        feature_map="elu", normalize=True):
    """dq, dk, dv and the initial state's gradient of Σ out·grad_out + Σ state·grad_state, float64."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    dv = v.shape[-1]
    state = None
    if initial_state is not None:
        S0 = initial_state.detach().cpu().double().requires_grad_()
        state = (S0[..., :dv], S0[..., dv])
        leaves.append(S0)
    cpu_mask = None if mask is None else mask.cpu()
    out, (S, z) = reference.linear_attention(*leaves[:3], causal=causal, initial_state=state,
                                             key_padding_mask=cpu_mask, feature_map=feature_map, normalize=normalize)
    loss = (out * grad_out.cpu().double()).sum()
    if grad_state is not None:
        gs = grad_state.cpu().double()
        loss = loss + (S * gs[..., :dv]).sum() + (z * gs[..., dv]).sum()
    grads = torch.autograd.grad(loss, leaves)
    d_initial = grads[3] if initial_state is not None else None
    return grads[0], grads[1], grads[2], d_initial, (S, z)


def check(q, k, v, tol, **options):
    """Every gradient (and, with a gradient of the final state, that of the initial state) against
    the float64 reference."""
    initial_state = options.get("initial_state")
    _, _, (dq, dk, dv, d_initial), (grad_out, grad_state) = run(q, k, v, **options)
    options = {key: val for key, val in options.items()
               if key not in ("hand_final_state", "expect_tensor_cores", "grad_out", "grad_state")}
    ref = reference_gradients(q, k, v, grad_out, grad_state, **options)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[:3]):
        assert got.dtype == q.dtype, name
        assert_close(got.cpu(), want, tol, name)
    if initial_state is not None:
        assert_close(d_initial.cpu(), ref[3], tol, "d initial state")
    else:
        # Without an initial state its gradient is still dS0 = dS_N + Σ φ(q_i) G'_iᵀ.
        S0 = torch.zeros(d_initial.shape, dtype=torch.float32, device=q.device)
        ref_with_zero = reference_gradients(q, k, v, grad_out, grad_state, initial_state=S0, **options)
        assert_close(d_initial.cpu(), ref_with_zero[3], tol, "d initial state")


def initial_state_of(B, H, m, dv, seed=3):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, H, m, dv, generator=g, dtype=torch.float64)
    z = torch.rand(B, H, m, 1, generator=g, dtype=torch.float64) * 2
    return torch.cat([S, z], -1).float()


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 15, 63, 64, 65, 128, 131, 200])
def test_matches_reference_around_the_chunk(dtype, causal, T):
    q, k, v = make(2, 2, T, T, 32, 24, dtype, seed=T)
    check(q, k, v, TOLERANCE[dtype], causal=causal)


@pytest.mark.parametrize("m, dv", [(8, 8), (16, 100), (64, 64), (65, 128), (128, 128), (100, 33), (128, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_head_dims(m, dv, causal):
    q, k, v = make(1, 2, 80, 80, m, dv, torch.bfloat16, seed=m + dv, scale=0.5)
    check(q, k, v, TOLERANCE[torch.bfloat16], causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map, normalize",
                         [("elu", True), ("elu", False), ("relu", True), ("relu", False), ("identity", False)])
def test_feature_maps_padding_and_state(causal, feature_map, normalize):
    B, H, T, m, dv = 2, 2, 150, 24, 20
    q, k, v = make(B, H, T, T, m, dv, torch.bfloat16, seed=5)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 100:] = True
    mask[1, ::3] = True
    check(q, k, v, TOLERANCE[torch.bfloat16], causal=causal, initial_state=initial_state_of(B, H, m, dv),
          mask=mask, feature_map=feature_map, normalize=normalize)


@pytest.mark.parametrize("hand_final_state", [True, False])
def test_cross_attention_lengths(hand_final_state):
    """Non-causal, T_q != T_k: the query pass reads the forward's final state when it is handed
    over (no pass over the keys), and sums the keys itself otherwise."""
    q, k, v = make(2, 2, 70, 133, 40, 24, torch.float16, seed=7)
    state = initial_state_of(2, 2, 40, 24)
    check(q, k, v, TOLERANCE[torch.float16], causal=False, initial_state=state, hand_final_state=hand_final_state)


@pytest.mark.parametrize("causal", [True, False])
def test_strided_and_unaligned_rows(causal):
    """(B, T, H, D) views, and rows that start 2 bytes past a 16-byte boundary (element loads)."""
    B, T, H, m, dv = 2, 90, 3, 32, 40
    g = torch.Generator().manual_seed(9)
    base = torch.randn(B, T, H, 2 * m + dv + 1, generator=g).bfloat16()
    q = base[..., 1:m + 1].transpose(1, 2)
    k = base[..., m + 1:2 * m + 1].transpose(1, 2)
    v = base[..., 2 * m + 1:].transpose(1, 2)
    check(q, k, v, TOLERANCE[torch.bfloat16], causal=causal)


@pytest.mark.parametrize("where", ["q", "k", "v", "grad_out"])
@pytest.mark.parametrize("position", [3, 16, 63, 64, 70])
def test_non_finite_rows_reach_only_the_rows_that_meet_them(where, position):
    """A NaN in row `position` of q, k, v or grad_out, with a cotangent of 0 on every output row
    that sees it: the gradients of the positions that never meet it equal those of a finite input
    (a masked pair is left out, not multiplied by 0), at both ends of a 16-row block and of the chunk."""
    T = 100
    q, k, v = make(1, 1, T, T, 16, 8, torch.bfloat16, seed=4)
    grads = {}
    for name, value in (("nan", math.nan), ("finite", 0.3)):
        inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        seeing = torch.zeros(T, dtype=torch.bool)
        if where in ("q", "grad_out"):
            seeing[position] = True
        else:
            seeing[position:] = True
        grad_out = torch.randn(1, 1, T, 8, generator=torch.Generator().manual_seed(3)).bfloat16()
        grad_out = grad_out.masked_fill(seeing[None, None, :, None], 0.0)
        if where == "grad_out":
            grad_out[0, 0, position, 1] = value
        else:
            inputs[where][0, 0, position, 1] = value
        _, _, grads[name], _ = run(inputs["q"], inputs["k"], inputs["v"], grad_out=grad_out, grad_state=None)
    for label, got, want in zip("qkv", grads["nan"][:3], grads["finite"][:3]):
        keep = torch.ones(T, dtype=torch.bool)
        if where in ("q", "grad_out") and label in "kv":
            keep[: position + 1] = False  # the keys the row sees meet it (0·NaN, a genuine NaN)
        elif where in ("k", "v") and label == "q":
            keep[position:] = False
        else:
            keep[position] = False
        got, want = got[0, 0, keep], want[0, 0, keep]
        assert torch.isfinite(got).all(), f"NaN in {where}[{position}] leaked into d{label}"
        # (Within bf16 rounding: a chunk holding the NaN adds its diagonal block pair by pair.)
        assert_close(got, want.double(), TOLERANCE[torch.bfloat16], f"d{label} with a NaN in {where}[{position}]")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_one_key_passes_no_gradient_to_q_and_k(dtype, causal):
    """With one key the normalized output is v whatever q and k are: dq = dk = 0, from terms that
    cancel (v · G against gn = −G · o, U_v v against u). Found on an H200: with gn rounded to 16 bits
    and built from the unrounded G, dk kept 40% of the tests' absolute floor (loss Σ out², no state
    cotangent)."""
    q, k, v = make(2, 3, 1, 1, 64, 64, dtype, seed=0)
    out, _, _, _ = run(q, k, v, causal=causal)
    check(q, k, v, TOLERANCE[dtype], causal=causal, grad_out=2 * out, grad_state=None)


def test_zero_cotangent_rows_pass_nothing():
    """A row whose cotangent is all 0 passes nothing even where its output is Inf (0, not 0·Inf):
    otherwise its normalizer's cotangent −(g · o) / d would be NaN and reach every earlier key."""
    q, k, v = make(1, 2, 70, 70, 16, 8, torch.bfloat16, seed=10)
    v[0, 1, 5, 2] = math.inf
    out, _, _, _ = run(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    grad_out[0, 1, 5:] = 0
    _, _, grads, _ = run(q, k, v, grad_out=grad_out, grad_state=None)
    for name, grad in zip("qkv", grads[:3]):
        assert torch.isfinite(grad[0, 1, :5]).all(), name


def test_falls_back_to_simt_above_256_or_when_disabled(monkeypatch):
    """(Head dims from 129 to 256 run as tiles: test_tensor_core_wide_backward.py.)"""
    q, k, v = make(1, 1, 40, 40, 264, 16, torch.bfloat16, seed=11)
    check(q, k, v, TOLERANCE[torch.bfloat16], expect_tensor_cores=False)
    monkeypatch.setenv("LINATTN_TENSOR_CORES", "0")
    q, k, v = make(1, 1, 40, 40, 32, 16, torch.bfloat16, seed=11)
    check(q, k, v, TOLERANCE[torch.bfloat16], expect_tensor_cores=False)


def test_falls_back_when_shared_memory_is_small(monkeypatch):
    monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", str(100 * 1024))
    q, k, v = make(1, 1, 40, 40, 128, 128, torch.bfloat16, seed=12, scale=0.3)
    check(q, k, v, TOLERANCE[torch.bfloat16], expect_tensor_cores=False)
    q, k, v = make(1, 1, 40, 40, 64, 64, torch.bfloat16, seed=12, scale=0.3)
    check(q, k, v, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hand_final_state", [True, False])
def test_sequence_split(monkeypatch, causal, hand_final_state):
    """Too few (batch, head) blocks for the GPU's SMs: the rows are cut into segments (emulating 16
    SMs, B·H = 2 and T = 1600 give three), each pass starting from states summed per segment. Every
    gradient against the reference (mask, initial state and dS_N included) and against the unsplit
    run, which writes no per-segment sums."""
    B, H, T, m, dv = 1, 2, 1600, 32, 24
    q, k, v = make(B, H, T, T, m, dv, torch.bfloat16, seed=13)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 560:600] = True
    check_split(monkeypatch, q, k, v, causal=causal, initial_state=initial_state_of(B, H, m, dv), mask=mask,
                hand_final_state=hand_final_state)


@pytest.mark.parametrize("causal", [True, False])
def test_sequence_split_identity_features(monkeypatch, causal):
    """The split with the identity map, unnormalized (GLA's form without gates): the query pass
    loads no Q rows there (dq needs no φ'(q)), but the segments' Σ φ(q) G'ᵀ does — it once read the
    unloaded rows (NaN in the emulation's shared memory; dk and dv NaN)."""
    B, H, T, m, dv = 1, 2, 1600, 32, 24
    q, k, v = make(B, H, T, T, m, dv, torch.bfloat16, seed=14)
    check_split(monkeypatch, q, k, v, causal=causal, initial_state=initial_state_of(B, H, m, dv),
                feature_map="identity", normalize=False)


def check_split(monkeypatch, q, k, v, **options):
    """B·H = 2 rows of T = 1600 split into segments for 16 emulated SMs: against the reference and the
    unsplit run (2 SMs), and the split ran (it writes per-segment sums)."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "16")
    check(q, k, v, TOLERANCE[torch.bfloat16], **options)
    _, _, split, _ = run(q, k, v, **options)
    split_written = counters()["written_bytes"]
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "2")
    _, _, whole, _ = run(q, k, v, **options)
    assert split_written > counters()["written_bytes"], "the split did not run (no segment sums written)"
    for name, a, b in zip(("dq", "dk", "dv", "dS0"), split, whole):
        assert_close(a, b.double(), TOLERANCE[torch.bfloat16], name)


def test_traffic_and_bank_conflicts(monkeypatch):
    """Global traffic of the causal backward at B=1 H=2 D=128 T=1024 bf16 as a multiple of its
    floor (q, k, v, o and grad_out read, dq, dk, dv written once) and no ldmatrix bank conflicts.
    The two passes read q, k, v and grad_out twice and o once (the query pass hands each row's
    scalars to the other): 1.5x in the limit, 1.57x here with dS_N, dS0 and the row scalars; the issue's
    1.3x would need dq in the reverse pass (benchmarks/bench_tensor_core.py prints T=4096)."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "2")  # a block per (batch, head): no sequence split
    B, H, T, D = 1, 2, 1024, 128
    q, k, v = make(B, H, T, T, D, D, torch.bfloat16, seed=6, scale=0.3)
    run(q, k, v, grad_state=None)
    c = counters()
    floor = 8 * B * H * T * D * 2
    traffic = (c["read_bytes"] + c["written_bytes"]) / floor
    assert traffic <= 1.6, f"traffic {traffic:.3f}x the floor"
    assert c["ldmatrix_wavefronts"] == c["ldmatrix_matrices"], "ldmatrix bank conflicts"


def test_cubins_hold_tensor_core_instructions_and_no_local_memory():
    """Both passes' kernels (sm_80 and sm_90, every head-dim and dtype instance) use mma.sync
    (HMMA.16816.F32 in their SASS); local memory only where noted below."""
    rows = compiled_kernel_rows("linear-bwd")
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    # architectures, dtypes, (DK, DV) instances, passes, plain and gated; and gates per channel's
    # two (DK, DV = 64) instances (wider value dims run as 64-column tiles)
    assert len(rows) == 2 * 2 * (4 * 2 * 2 + 2 * 2)
    for row in rows:
        name = f"{row['arch']} DK={row['dk']} DV={row['dv']} {row['dtype']}"
        assert row["hmma"] > 0, f"{name}: no tensor-core instructions"
        # Known shortfall: the key-value pass at 128 × 128 sits at 255 registers (U alone is 68 a
        # lane) and keeps loop-invariant values on the stack, reloaded once per chunk: 8 bytes,
        # 16 in float16's gated instance (φ(q) times the row scale as it is prepared); float16's
        # gated one at 64 × 128 8 (two shared-memory offsets); every other instance has no local
        # memory. The bound catches any growth.
        spill_allowed = 0
        if "key_value" in row["dtype"] and row["dk"] == row["dv"] == 128:
            spill_allowed = 16 if row["dtype"] == "Half key_value gated" else 8
        elif row["dtype"] == "Half key_value gated" and (row["dk"], row["dv"]) == (64, 128):
            spill_allowed = 8
        assert row["stack"] <= spill_allowed and row["local"] == 0, f"{name}: local memory (register spills)"


def check_autograd_opcheck_and_compile(H, T, m, dv, causal, scale=1.0):
    """Through linattn.linear_attention with the fused backend: gradients against the reference,
    torch.compile(fullgraph=True) equal to eager, and opcheck of the backward operator."""
    q, k, v = (t.requires_grad_() for t in make(1, H, T, T, m, dv, torch.bfloat16, seed=8, scale=scale))
    with ops.fused_implementation():
        torch.ops.linattn._reset_warp_emulation_counters()
        out = linattn.linear_attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        assert counters()["mma"] > 0
        compiled = torch.compile(lambda a, b, c: linattn.linear_attention(a, b, c, causal=causal), fullgraph=True)
        out_c = compiled(q, k, v)
        grads_c = torch.autograd.grad(out_c.float().square().sum(), (q, k, v))
    assert torch.equal(out_c, out)
    for a, b in zip(grads, grads_c):
        assert torch.equal(a, b)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.linear_attention(*ref_leaves, causal=causal)[0]
    ref_grads = torch.autograd.grad((2 * ref * out.detach().double()).sum(), ref_leaves)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, TOLERANCE[torch.bfloat16], f"d{name}")
    out_, state, normalizer = FWD(q.detach(), k.detach(), v.detach(), None, None, 1, causal, True, 1e-6)
    torch.library.opcheck(BWD, (torch.randn_like(out_), torch.randn_like(state), q.detach(), k.detach(), v.detach(),
                                out_, normalizer, None, None, 1, causal, True, state))


@pytest.mark.parametrize("causal", [True, False])
def test_autograd_opcheck_and_compile(causal):
    check_autograd_opcheck_and_compile(2, 70, 32, 32, causal)


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m, dv, T", [(64, 64, 1000), (128, 128, 777), (100, 33, 130)])
def test_cuda_kernels_match_reference(dtype, causal, m, dv, T):
    q, k, v = make(2, 3, T, T, m, dv, dtype, seed=T, scale=0.5, device="cuda")
    check(q, k, v, TOLERANCE[dtype], causal=causal, initial_state=initial_state_of(2, 3, m, dv).cuda())


@needs_gpu
def test_cuda_kernels_equal_their_emulation():
    q, k, v = make(2, 2, 300, 300, 64, 64, torch.bfloat16, seed=21, scale=0.5)
    out_cpu, _, grads_cpu, (grad_out, grad_state) = run(q, k, v)
    cuda = [t.cuda() for t in (q, k, v)]
    _, _, grads_gpu, _ = run(*cuda, grad_out=grad_out.cuda(), grad_state=grad_state.cuda())
    for name, a, b in zip(("dq", "dk", "dv", "dS0"), grads_cpu, grads_gpu):
        assert_close(b.cpu(), a.double(), 2e-2 if a.dtype != torch.float32 else 1e-4, name)

