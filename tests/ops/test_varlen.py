"""linear_attention(..., cu_seqlens=): packed variable-length batches. Each sequence of the
packing must get what it gets alone (the float64 reference per sequence, and the operator per
sequence), causal or not, with decay/gates and per-sequence states, forward and backward,
through the CPU varlen operator and the per-sequence path of other devices; empty sequences,
one long sequence (sequence-parallel kernel), gradcheck, opcheck, compile and errors."""
import pytest
import torch

import linattn
from linattn import reference
from conftest import TOLERANCE, assert_close

H, D, DV = 3, 5, 4
OFFSETS = [0, 7, 7, 31, 32, 95, 233]  # an empty sequence, a 1-token one, chunk-crossing ones


def packed(offsets=OFFSETS, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = offsets[-1]
    q, k = (torch.randn(1, H, T, D, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(1, H, T, DV, generator=g).to(dtype)
    return q, k, v, torch.tensor(offsets, dtype=torch.int32)


def per_sequence(fn, offsets, *tensors):
    """fn on each sequence's rows; outputs concatenated along time, states along batch."""
    outs, states = [], []
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        out, state = fn(n, *(t[:, :, a:b] if t.dim() > 2 else t for t in tensors))
        outs.append(out)
        states.append(state)
    return torch.cat(outs, 2), tuple(torch.cat([s[i] for s in states]) for i in range(2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map,normalize", [("elu", True), ("relu", True), ("identity", False)])
def test_against_reference_per_sequence(dtype, causal, feature_map, normalize, linear_implementation):
    q, k, v, cu = packed(dtype=dtype)
    out, (S, z) = linattn.linear_attention(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                           cu_seqlens=cu, output_final_state=True)
    expected, (S_ref, z_ref) = per_sequence(
        lambda n, q, k, v: reference.linear_attention(q, k, v, causal=causal, feature_map=feature_map,
                                                      normalize=normalize),
        OFFSETS, q, k, v)
    assert out.dtype == dtype and S.shape == (len(OFFSETS) - 1, H, D, DV)
    assert_close(out, expected, TOLERANCE[dtype], "out")
    assert_close(S, S_ref, TOLERANCE[dtype], "S")
    assert_close(z, z_ref, TOLERANCE[dtype], "z")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("fade", [None, "decay", "gate"])
def test_gradients_equal_the_per_sequence_operator(causal, fade, implementation):
    if fade and not causal:
        pytest.skip("decay and gates are causal")
    q, k, v, cu = packed()
    g = torch.Generator().manual_seed(1)
    n = len(OFFSETS) - 1
    initial = (torch.randn(n, H, D, DV, generator=g, dtype=torch.float64),
               torch.rand(n, H, D, generator=g, dtype=torch.float64) + 1)
    decay = torch.tensor([0.9, 1.0, 0.7], dtype=torch.float64) if fade == "decay" else None
    gate = -torch.rand(1, H, OFFSETS[-1], generator=g, dtype=torch.float64) if fade == "gate" else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *initial)]
    fades = [None if t is None else t.clone().requires_grad_() for t in (decay, gate)]
    weight = torch.randn(1, H, OFFSETS[-1], DV, generator=g, dtype=torch.float64)
    state_weight = torch.randn(n, H, D, DV, generator=g, dtype=torch.float64)

    def loss(out, S):
        return (out * weight).sum() + (S * state_weight).sum()

    out, (S, _) = linattn.linear_attention(*leaves[:3], causal=causal, cu_seqlens=cu, initial_state=tuple(leaves[3:]),
                                           decay=fades[0], gate=fades[1], output_final_state=True)
    grads = torch.autograd.grad(loss(out, S), leaves + [t for t in fades if t is not None])

    leaves2 = [t.detach().clone().requires_grad_() for t in leaves]
    fades2 = [None if t is None else t.detach().clone().requires_grad_() for t in fades]
    outs, states = [], []
    for i, (a, b) in enumerate(zip(OFFSETS[:-1], OFFSETS[1:])):
        o, (S_i, _) = linattn.linear_attention(
            *(t[:, :, a:b] for t in leaves2[:3]), causal=causal, initial_state=(leaves2[3][i:i + 1], leaves2[4][i:i + 1]),
            decay=fades2[0], gate=None if fades2[1] is None else fades2[1][:, :, a:b], output_final_state=True)
        outs.append(o)
        states.append(S_i)
    expected_out, S2 = torch.cat(outs, 2), torch.cat(states)
    expected = torch.autograd.grad(loss(expected_out, S2), leaves2 + [t for t in fades2 if t is not None])
    assert_close(out, expected_out, 1e-12, "out")
    for name, got, want in zip(["q", "k", "v", "S0", "z0", fade], grads, expected):
        assert_close(got, want, 1e-10, f"grad {name}")


def test_decay_and_gates_against_reference():
    q, k, v, cu = packed()
    gate = -torch.rand(1, H, OFFSETS[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    decay = torch.tensor([0.95, 0.8, 1.0], dtype=torch.float64)
    out = linattn.linear_attention(q, k, v, causal=True, cu_seqlens=cu, decay=decay, gate=gate)
    expected, _ = per_sequence(
        lambda n, q, k, v, g: reference.decayed_linear_attention(q, k, v, g + decay.log().view(1, H, 1)),
        OFFSETS, q, k, v, gate)
    assert_close(out, expected, 1e-12)


def test_one_long_sequence_uses_the_sequence_parallel_kernel():
    offsets = [0, 3, 4100, 4111]
    q, k, v, cu = packed(offsets, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for causal in (True, False):
            out = linattn.linear_attention(q, k, v, causal=causal, cu_seqlens=cu)
            expected = torch.cat([linattn.linear_attention(q[:, :, a:b].double(), k[:, :, a:b].double(),
                                                           v[:, :, a:b].double(), causal=causal)
                                  for a, b in zip(offsets[:-1], offsets[1:])], 2)
            assert_close(out, expected, TOLERANCE[torch.float32], f"causal={causal}")
    finally:
        torch.set_num_threads(threads)


def test_strided_inputs():
    q, k, v, cu = packed()
    # (1, T, H, D) activations viewed as (1, H, T, D)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    assert_close(linattn.linear_attention(qt, kt, vt, causal=True, cu_seqlens=cu),
                 linattn.linear_attention(q, k, v, causal=True, cu_seqlens=cu), 1e-15)


def test_gradcheck():
    offsets = [0, 3, 3, 8]
    q, k, v, cu = packed(offsets)
    g = torch.Generator().manual_seed(3)
    gate = -torch.rand(1, H, 8, generator=g, dtype=torch.float64)
    initial = (torch.randn(3, H, D, DV, generator=g, dtype=torch.float64),
               torch.rand(3, H, D, generator=g, dtype=torch.float64) + 1)
    inputs = [t.requires_grad_() for t in (q, k, v, gate, *initial)]

    def fn(q, k, v, gate, S0, z0):
        out, (S, z) = linattn.linear_attention(q, k, v, causal=True, cu_seqlens=cu, gate=gate, initial_state=(S0, z0),
                                               output_final_state=True)
        return out, S, z

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_decay", [False, True])
def test_opcheck(dtype, with_decay):
    q, k, v, cu = packed([0, 5, 5, 12], dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    log_decay = -torch.rand(1, H, 12, dtype=acc) if with_decay else None
    initial = torch.rand(3, H, D, DV + 1, dtype=acc)
    grad = dtype == torch.float64
    args = (q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad), initial, None, 1, True, True, 1e-6,
            log_decay, cu)
    torch.library.opcheck(torch.ops.linattn.linear_attn_fwd.default, args)


def test_compile_fullgraph_equals_eager():
    q, k, v, cu = packed(dtype=torch.float32)

    def fn(q, k, v, cu):
        return linattn.linear_attention(q, k, v, causal=True, cu_seqlens=cu)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, cu), fn(q, k, v, cu))


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, cu: (q, k, v, cu.long()), "int32"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 9, 5, 233], dtype=torch.int32)), "non-decreasing"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 9, 200], dtype=torch.int32)), "233"),
    (lambda q, k, v, cu: (q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cu), "(1, H, total"),
    (lambda q, k, v, cu: (q, k, v, cu[None]), "1-D"),
])
def test_errors(change, message, implementation):
    q, k, v, cu = packed()
    q, k, v, cu = change(q, k, v, cu)
    with pytest.raises((ValueError, RuntimeError)) as info:
        linattn.linear_attention(q, k, v, causal=True, cu_seqlens=cu)
    assert message in str(info.value)


def test_errors_initial_state_and_padding():
    q, k, v, cu = packed()
    with pytest.raises(ValueError, match="key_padding_mask"):
        linattn.linear_attention(q, k, v, cu_seqlens=cu, key_padding_mask=torch.zeros(1, 233, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"initial_state S must have shape \(6, 3, 5, 4\)"):
        linattn.linear_attention(q, k, v, causal=True, cu_seqlens=cu,
                                 initial_state=(torch.zeros(1, H, D, DV, dtype=torch.float64),
                                                torch.zeros(1, H, D, dtype=torch.float64)))


# --- sliding_window_attention(..., cu_seqlens=) ---------------------------------------------


@pytest.mark.parametrize("window,causal,dilation", [(3, False, 1), (4, True, 1), ((2, 6), False, 1), (6, False, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_sliding_window_against_reference_per_sequence(window, causal, dilation, dtype, implementation):
    q, k, v, cu = packed(dtype=dtype)
    out = linattn.sliding_window_attention(q, k, v, window, causal=causal, dilation=dilation, cu_seqlens=cu)
    expected = torch.cat([
        reference.sliding_window_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], window, causal=causal,
                                           dilation=dilation)
        for a, b in zip(OFFSETS[:-1], OFFSETS[1:])], 2)
    assert_close(out, expected, TOLERANCE[dtype] * (10 if dtype == torch.bfloat16 else 1), f"{window} {causal}")


def test_sliding_window_gradients_equal_the_per_sequence_operator(implementation):
    q, k, v, cu = packed()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    weight = torch.randn(1, H, OFFSETS[-1], DV, dtype=torch.float64)
    (linattn.sliding_window_attention(*leaves, 5, causal=True, cu_seqlens=cu) * weight).sum().backward()
    sizes = [b - a for a, b in zip(OFFSETS[:-1], OFFSETS[1:])]
    leaves2 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    pieces = zip(*(t.split(sizes, 2) for t in leaves2))
    out = torch.cat([linattn.sliding_window_attention(qs, ks, vs, 5, causal=True) for qs, ks, vs in pieces], 2)
    (out * weight).sum().backward()
    for name, a, b in zip("qkv", leaves, leaves2):
        assert_close(a.grad, b.grad, 1e-10, f"grad {name}")


def test_sliding_window_opcheck_and_compile():
    q, k, v, cu = packed([0, 5, 5, 12], dtype=torch.float32)
    segments = torch.tensor([[[0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2]]])
    for op in (torch.ops.linattn.restricted_softmax_fwd.default,
               torch.ops.linattn.restricted_softmax_fwd_generic.default):
        torch.library.opcheck(op, (q.double().requires_grad_(), k.double().requires_grad_(), v.double().requires_grad_(),
                                   0.5, 3, 0, 1, True, None, 1, None, None, segments, segments))
    fn = lambda q, k, v, cu: linattn.sliding_window_attention(q, k, v, 3, causal=True, cu_seqlens=cu)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v, cu), fn(q, k, v, cu))


def test_sliding_window_errors():
    q, k, v, cu = packed()
    with pytest.raises(ValueError, match="global_mask"):
        linattn.sliding_window_attention(q, k, v, 3, cu_seqlens=cu, global_mask=torch.zeros(1, 233, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-decreasing"):
        linattn.sliding_window_attention(q, k, v, 3, cu_seqlens=torch.tensor([0, 50, 20, 233], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="q_segments must be an int64 tensor"):
        ids = torch.zeros(1, 1, 233, dtype=torch.int32)
        torch.ops.linattn.restricted_softmax_fwd(q, k, v, 1.0, 3, 3, q_segments=ids, k_segments=ids)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map,normalize", [("elu", True), ("relu", True), ("identity", False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_device_generic_packing_without_states(causal, feature_map, normalize, dtype):
    """What CUDA tensors run without per-sequence states: the whole packing at once, nothing
    crossing a sequence start, no host synchronisation (compiles with fullgraph=True, which a .tolist()
    would break)."""
    q, k, v, cu = packed(dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with linattn.ops.generic_implementation():
        out = linattn.linear_attention(*leaves, causal=causal, feature_map=feature_map, normalize=normalize,
                                       cu_seqlens=cu)
        # Seeded: relu's bf16 gradients vary with the weights by 2x (a draw-dependent tolerance).
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad((out * weight).sum(), leaves)
    expected, _ = per_sequence(
        lambda n, q, k, v: reference.linear_attention(q, k, v, causal=causal, feature_map=feature_map,
                                                      normalize=normalize), OFFSETS, q, k, v)
    assert_close(out, expected, TOLERANCE[dtype] * 4, "out")
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = torch.cat([
        reference.linear_attention(*(t[:, :, a:b] for t in ref_leaves), causal=causal, feature_map=feature_map,
                                   normalize=normalize)[0] for a, b in zip(OFFSETS[:-1], OFFSETS[1:])], 2)
    ref_grads = torch.autograd.grad((ref_out * weight.double()).sum(), ref_leaves)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_close(got, want, TOLERANCE[dtype] * 10, f"grad {name}")
    if dtype == torch.float32:
        fn = lambda q, k, v, cu: linattn.linear_attention(q, k, v, causal=causal, feature_map=feature_map,  # noqa: E731
                                                          normalize=normalize, cu_seqlens=cu)
        with linattn.ops.generic_implementation():
            torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v, cu), fn(q, k, v, cu))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_device_generic_packing_with_decay_gates_and_states(dtype):
    """Decay, gates and per-sequence states on the device-generic packing (what CUDA tensors
    run): per sequence as the float64 reference, forward and backward (the decay's, gates' and
    initial states' gradients too, through the output and the final states), and compiled with
    fullgraph=True (no host synchronisation)."""
    q, k, v, cu = packed(dtype=dtype)
    g = torch.Generator().manual_seed(5)
    n = len(OFFSETS) - 1
    decay = torch.tensor([0.95, 0.8, 1.0], dtype=torch.float64)
    gate = -torch.rand(1, H, OFFSETS[-1], generator=g, dtype=torch.float64) * 0.3
    S0, z0 = torch.randn(n, H, D, DV, generator=g, dtype=torch.float64), torch.rand(n, H, D, generator=g) + 1
    leaves = [t.clone().to(dtype).requires_grad_() for t in (q, k, v, decay, gate, S0, z0)]
    weights = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((1, H, OFFSETS[-1], DV), S0.shape,
                                                                                  z0.shape)]

    def loss(out, state):
        return sum((t * w.to(t.dtype)).sum() for t, w in zip((out, *state), weights))

    with linattn.ops.generic_implementation():
        out, state = linattn.linear_attention(*leaves[:3], causal=True, decay=leaves[3], gate=leaves[4],
                                              initial_state=tuple(leaves[5:]), output_final_state=True, cu_seqlens=cu)
        grads = torch.autograd.grad(loss(out, state), leaves)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    log_factors = ref[4] + ref[3].log().view(1, H, 1)
    ref_out, ref_state = per_sequence(
        lambda i, q, k, v, f: reference.decayed_linear_attention(
            q, k, v, f, initial_state=(ref[5][i:i + 1], ref[6][i:i + 1])), OFFSETS, ref[0], ref[1], ref[2], log_factors)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_state), ref)
    assert_close(out, ref_out, TOLERANCE[dtype] * 4, "out")
    for name, got, want in zip(["S", "z"], state, ref_state):
        assert_close(got, want, TOLERANCE[dtype] * 4, name)
    for name, got, want in zip(["q", "k", "v", "decay", "gate", "S0", "z0"], grads, ref_grads):
        assert_close(got, want, TOLERANCE[dtype] * 20, f"grad {name}")
    if dtype == torch.float32:
        fn = lambda q, k, v, decay, gate, S0, z0: linattn.linear_attention(  # noqa: E731
            q, k, v, causal=True, decay=decay, gate=gate, initial_state=(S0, z0), output_final_state=True,
            cu_seqlens=cu)
        inputs = [t.detach() for t in leaves]
        with linattn.ops.generic_implementation():
            torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*inputs), fn(*inputs))
