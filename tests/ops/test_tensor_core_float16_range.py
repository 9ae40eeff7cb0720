"""float16's range (65504) in the tensor-core kernels, through their CPU emulation, every gradient
against the float64 reference and bfloat16 alongside as the control (docs/guide/cuda.md, "float16's
range"):
- rows whose cotangent G = g / d passes it in the backward: a normalized row that sees no key (its
  keys padded, no initial state, or a zero one: d = eps) or almost none (a state that forgets
  within a token). Such a row is held as G' / σ, σ a power of two, and the passes multiply its
  dφ(q) or φ(q) by σ; before that its dq was NaN and dS0 Inf.
- rows whose G falls into its subnormals (below 2^-14; d large against g: a long sequence's later
  rows, a large state): σ about √max |G| splits the product φ(q_i) G_i between its two factors.
- states that pass it (a long sequence's z, large values, a large initial state or dS_N): the 16-bit
  state copies hold the state over a power of two σ and the products that read them multiply by σ;
  before that the copies were Inf (the forward's rows 0, the gradients tens of percent off)."""
import pytest
import torch

import linattn
from linattn import ops, reference

TOL = {torch.bfloat16: 3e-2, torch.float16: 6e-3}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mma():
    return int(torch.ops.linattn._warp_emulation_counters()[0])


def _close(got, expected, tol, what):
    assert torch.isfinite(got).all(), f"{what}: {(~torch.isfinite(got)).sum().item()} non-finite elements"
    floor = 1e-3 * expected.numel() ** 0.5
    err = (got.double() - expected).norm().item() / max(expected.norm().item(), floor)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.1e}"


def _run(q, k, v, gate, mask, state, causal, dtype, device="cpu", state_weight=1.0, **options):
    """Every gradient of out.sum() (g = 1: G = 1e6 where d = eps) and the final state's sum, S's times
    `state_weight` (dS_N), from the tensor cores (the CPU's emulation, or a GPU's kernels) and from
    the float64 reference; `options` (feature_map, normalize) go to both."""
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    gates = None if gate is None else on(gate).requires_grad_()
    states = None if state is None else tuple(on(t).requires_grad_() for t in state)
    emulated = device == "cpu"
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        out, (S, z) = linattn.linear_attention(*leaves, causal=causal, gate=gates, key_padding_mask=on(mask),
                                               initial_state=states, output_final_state=True, **options)
    assert not emulated or _mma() > 0, "the tensor-core forward did not run"
    torch.ops.linattn._reset_warp_emulation_counters()
    wanted = leaves + ([] if gates is None else [gates]) + ([] if states is None else list(states))
    loss = out.float().sum() + state_weight * S.sum() + z.sum()
    grads = [g.cpu() for g in torch.autograd.grad(loss, wanted)]
    assert not emulated or _mma() > 0, "the tensor-core backward did not run"
    out = out.cpu()

    ref_leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    log_f = torch.zeros(q.shape[:3], dtype=torch.float64) if gate is None else gate.double().requires_grad_()
    ref_states = None if state is None else tuple(t.double().requires_grad_() for t in state)
    if causal:
        ref, (ref_S, ref_z) = reference.decayed_linear_attention(*ref_leaves, log_f, key_padding_mask=mask,
                                                                 initial_state=ref_states, **options)
    else:
        ref, (ref_S, ref_z) = reference.linear_attention(*ref_leaves, causal=False, key_padding_mask=mask,
                                                         initial_state=ref_states, **options)
    ref_wanted = ref_leaves + ([] if gate is None else [log_f]) + ([] if state is None else list(ref_states))
    ref_grads = torch.autograd.grad(ref.sum() + state_weight * ref_S.sum() + ref_z.sum(), ref_wanted)
    names = ["q", "k", "v"] + ([] if gate is None else ["gate"]) + ([] if state is None else ["S0", "z0"])
    _close(out.detach(), ref.detach(), TOL[dtype], "out")
    for name, got, expected in zip(names, grads, ref_grads):
        _close(got, expected, 2 * TOL[dtype], f"grad {name}")
    return grads


def _inputs(B, H, T, m, dv, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g) for d in (m, m, dv)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", [None, "token", "channel"])
def test_rows_that_see_no_key(dtype, gate):
    """The fuzzer's case: the first keys padded, so the first rows see nothing (d = eps); their dq
    is 0 and they pass nothing on. One value column and a chunk and a half."""
    B, H, T, m, dv = 1, 2, 117, 8, 1
    q, k, v = _inputs(B, H, T, m, dv, seed=0)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :4] = True
    log_gate = None
    if gate is not None:
        shape = (B, H, T) if gate == "token" else (B, H, T, m)
        log_gate = -torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 0.1
    grads = _run(q, k, v, log_gate, mask, None, True, dtype)
    assert grads[0][0, :, :4].abs().max() == 0, "a row that sees nothing has dq = 0"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_initial_state_meets_rows_that_see_nothing(dtype):
    """A zero initial state (a learnt one at its start) and padded first keys: the first rows'
    d = eps, and dS0 gets their φ(q)ᵀ g / eps (about 1e6, float32's range) exactly, in the chunk
    after the first too (T = 150, 70 keys padded)."""
    B, H, T, m, dv = 2, 1, 150, 16, 24
    q, k, v = _inputs(B, H, T, m, dv, seed=2)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :70] = True
    mask[1, :3] = True
    state = (torch.zeros(B, H, m, dv), torch.zeros(B, H, m))
    grads = _run(q, k, v, None, mask, state, True, dtype)
    assert grads[3].abs().max() > 1e5, "dS0 holds the rows that saw only the zero state"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rows_that_see_almost_nothing(dtype):
    """A per-token gate of −16 and every other key padded: each odd row sees its predecessor at
    e^−16, d about 7e-6, G about 1.4e5. (At −20 float16's forward already loses such a key's scores
    below its subnormals; one chunk, since what U carries to earlier chunks is float16's range, as
    any state copy's.)"""
    B, H, T, m, dv = 1, 2, 50, 32, 40
    q, k, v = _inputs(B, H, T, m, dv, seed=3)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 1::2] = True
    _run(q, k, v, torch.full((B, H, T), -16.0), mask, None, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_causal_sequence_wholly_padded(dtype):
    """Non-causal, one sequence of the batch wholly padded: every row of it sees nothing."""
    B, H, T, m, dv = 2, 2, 70, 16, 16
    q, k, v = _inputs(B, H, T, m, dv, seed=4)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1] = True
    _run(q, k, v, None, mask, None, False, dtype)


def _large_state(B, H, m, dv, seed):
    """An initial state past float16's range: S0 about ±1e5 and z0 about 2e5 (so d stays positive)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, m, dv, generator=g) * 1e5, 2e5 + 1e4 * torch.rand(B, H, m, generator=g))


def _gates(kind, B, H, T, m, seed):
    if kind is None:
        return None
    shape = (B, H, T) if kind == "token" else (B, H, T, m)
    return -torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", [None, "token", "channel"])
def test_large_initial_state(dtype, gate):
    """Copies past the range from the start: the forward's [S0 | z0] and the query pass's S0ᵀ (about
    2e5). d is then about 4e6, so G = g / d (2e-7) would sit in float16's subnormals: the rows take
    σ about √G. Two chunks and a bit."""
    B, H, T, m, dv = 2, 1, 150, 16, 24
    q, k, v = _inputs(B, H, T, m, dv, seed=7)
    _run(q, k, v, _gates(gate, B, H, T, m, 8), None, _large_state(B, H, m, dv, seed=9), True, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", [None, "token", "channel"])
def test_final_state_cotangent_past_the_range(dtype, gate):
    """The key-value pass's U from dS_N = 1e5, unnormalized identity features with keys and values
    of 1e-2, so that dk and dv (U v_j, φ(k_j) U) stay within float16's range."""
    B, H, T, m, dv = 2, 1, 150, 16, 24
    q, k, v = _inputs(B, H, T, m, dv, seed=15)
    _run(q, k * 1e-2, v * 1e-2, _gates(gate, B, H, T, m, 16), None, None, True, dtype, state_weight=1e5,
         feature_map="identity", normalize=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_state_non_causal(dtype):
    """Non-causal: the state over every key (from a large initial one), and U over every query from
    dS_N = 1e5 (unnormalized, as above)."""
    B, H, T, m, dv = 1, 2, 90, 16, 16
    q, k, v = _inputs(B, H, T, m, dv, seed=10)
    _run(q, k, v, None, None, _large_state(B, H, m, dv, seed=11), False, dtype)
    _run(q, k * 1e-2, v * 1e-2, None, None, None, False, dtype, state_weight=1e5, feature_map="identity",
         normalize=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_values_with_a_mean_grow_the_state(dtype):
    """Values of mean 300: S passes 65504 within some 200 tokens, in the forward and in the query
    pass's Sᵀ, from a zero state. (Their spread, 300, keeps dq's and dk's terms G_i · (v_j − o_i)
    from cancelling to float16's rounding of G.)"""
    B, H, T, m, dv = 1, 2, 400, 8, 8
    q, k, v = _inputs(B, H, T, m, dv, seed=12)
    _run(q, k, 300 * (1 + v), None, None, None, True, dtype, state_weight=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_state_split_into_segments(monkeypatch, dtype):
    """One long row of segments (16 emulated SMs, B·H = 2, T = 1600: three segments), each segment's
    pass loading a state past the range, gradients included."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "16")
    B, H, T, m, dv = 1, 2, 1600, 16, 16
    q, k, v = _inputs(B, H, T, m, dv, seed=13)
    _run(q, k, v, None, None, _large_state(B, H, m, dv, seed=14), True, dtype)
    _run(q, k * 1e-2, v * 1e-2, None, None, None, True, dtype, state_weight=1e5, feature_map="identity",
         normalize=False)


def test_long_sequence_state_copies_within_float16():
    """80,000 tokens of elu+1 features: z, the normalizer's column of the state, passes 65504 (about
    1.16 a token and channel), so without the scale its float16 copy is Inf and the forward's later
    rows 0 where they should be about 1e-2 of v; and d grows alike, so the later rows' G = g / d
    (below 1e-6) sat in float16's subnormals without their square-root scale (dq 45% off). The CPU
    kernel in float64 is the reference (the dense one would need 50 GB)."""
    T, m, dv = 80000, 16, 16
    inputs = [x.half() for x in _inputs(1, 1, T, m, dv, seed=5)]
    weights = torch.randn(1, 1, T, dv, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in inputs]
    with ops.fused_implementation():
        out = linattn.linear_attention(*leaves, causal=True)
    grads = torch.autograd.grad((out.double() * weights).sum(), leaves)
    ref_leaves = [x.double().requires_grad_() for x in inputs]
    expected = linattn.linear_attention(*ref_leaves, causal=True)
    ref_grads = torch.autograd.grad((expected * weights).sum(), ref_leaves)
    _close(out, expected.detach(), TOL[torch.float16], "out")
    for name, got, want in zip("qkv", grads, ref_grads):
        _close(got, want, 2 * TOL[torch.float16], f"grad {name}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernels_float16_range(dtype):
    """The GPU's kernels on the cases above: padded first keys with a per-channel gate, a zero
    initial state with a chunk of padded keys, and a state past float16's range."""
    B, H, T, m, dv = 1, 2, 117, 8, 1
    q, k, v = _inputs(B, H, T, m, dv, seed=0)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :4] = True
    gate = -torch.rand(B, H, T, m, generator=torch.Generator().manual_seed(1)) * 0.1
    _run(q, k, v, gate, mask, None, True, dtype, device="cuda")
    B, H, T, m, dv = 2, 1, 150, 16, 24
    q, k, v = _inputs(B, H, T, m, dv, seed=2)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :70] = True
    state = (torch.zeros(B, H, m, dv), torch.zeros(B, H, m))
    _run(q, k, v, None, mask, state, True, dtype, device="cuda")
    B, H, T, m, dv = 2, 1, 150, 16, 24
    q, k, v = _inputs(B, H, T, m, dv, seed=7)
    _run(q, k, v, None, None, _large_state(B, H, m, dv, seed=9), True, dtype, device="cuda")
    _run(q, k * 1e-2, v * 1e-2, None, None, None, True, dtype, device="cuda", state_weight=1e5,
         feature_map="identity", normalize=False)
