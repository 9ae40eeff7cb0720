"""Packed sequences (cu_seqlens) on the tensor cores (csrc/linear_attention/tensor_core/): the forward
and both backward passes run a block per (sequence, head), its chunks counted from the sequence's
first row, rows past its end read as zeros, its own initial and final state, and a fading state's
factors and the final state's term of dL/dc per sequence. On CPU tensors through the warp-operation
layer's emulation; every test counts the mma instructions executed, so none can pass on the CPU
kernel the fused operators hand packed calls to where the tensor cores do not take them.

A sequence's chunks are the same rows whether it is packed or alone, so packed results equal the
per-sequence runs bit for bit, and the emulation's global traffic is their sum."""
import pytest
import torch

import linattn
from linattn import ops, reference
from conftest import TOLERANCE, assert_close, gated_reference

FWD = torch.ops.linattn.linear_attn_fwd_fused.default
BWD = torch.ops.linattn.linear_attn_bwd_fused.default
HALF_TYPES = [torch.bfloat16, torch.float16]
ELU = 1
# An empty sequence, a one-token one, one ending mid-chunk, one of exactly a chunk, chunk-crossing ones
# starting mid-chunk.
OFFSETS = [0, 0, 1, 40, 104, 104, 275, 300]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def counters():
    names = ("mma", "ldmatrix_matrices", "ldmatrix_wavefronts", "shuffles", "read_bytes", "written_bytes")
    return dict(zip(names, torch.ops.linattn._warp_emulation_counters().tolist()))


def packed_inputs(H, m, dv, dtype, offsets=OFFSETS, seed=0, gated=False):
    """q, k, v (1, H, total, ·), cu_seqlens, states (S0, z0) per sequence and, gated, log-gates
    (1, H, total) that forget over a few dozen tokens."""
    g = torch.Generator().manual_seed(seed)
    T, N = offsets[-1], len(offsets) - 1
    q, k, v = (torch.randn(1, H, T, d, generator=g, dtype=torch.float64).to(dtype) for d in (m, m, dv))
    state = (torch.randn(N, H, m, dv, generator=g), torch.rand(N, H, m, generator=g) + 1)
    gate = -torch.rand(1, H, T, generator=g) * 0.1 if gated else None
    return q, k, v, torch.tensor(offsets, dtype=torch.int32), state, gate


def cotangents(out, S, z, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device) for t in (out, S, z)]


def loss_of(results, cots):
    out, (S, z) = results
    return sum((t.double() * c).sum() for t, c in zip((out, S, z), cots))


def leaves_of(q, k, v, state, gate):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *state)]
    if gate is not None:
        leaves.append(gate.clone().requires_grad_())
    return leaves


def packed_run(q, k, v, cu, state, gate, causal, seed=3, **options):
    """The fused packed call's out, final state and gradients (q, k, v, S0, z0[, gate]) of a random
    linear function of them."""
    leaves = leaves_of(q, k, v, state, gate)
    with ops.fused_implementation():
        results = linattn.linear_attention(*leaves[:3], causal=causal, cu_seqlens=cu.to(q.device),
                                           initial_state=tuple(leaves[3:5]), output_final_state=True,
                                           gate=leaves[5] if gate is not None else None, **options)
        grads = torch.autograd.grad(loss_of(results, cotangents(results[0], *results[1], seed)), leaves)
    return results, grads


def each_sequence_alone(q, k, v, offsets, state, gate, causal, seed=3, **options):
    """The same through one fused call per sequence on its rows; outputs and gradients joined."""
    leaves = leaves_of(q, k, v, state, gate)
    outs, states = [], []
    with ops.fused_implementation():
        for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            rows = [t[:, :, a:b] for t in leaves[:3]]
            initial = (leaves[3][n:n + 1], leaves[4][n:n + 1])
            if a == b:  # an empty sequence: its state passes through
                outs.append(rows[0].new_zeros(1, q.shape[1], 0, v.shape[-1]))
                states.append(initial)
                continue
            sequence_gate = leaves[5][:, :, a:b] if gate is not None else None
            out, final = linattn.linear_attention(*rows, causal=causal, initial_state=initial, gate=sequence_gate,
                                                  output_final_state=True, **options)
            outs.append(out)
            states.append(final)
        results = (torch.cat(outs, 2), tuple(torch.cat([s[i] for s in states]) for i in range(2)))
        grads = torch.autograd.grad(loss_of(results, cotangents(results[0], *results[1], seed)), leaves)
    return results, grads


def reference_per_sequence(leaves, offsets, causal, cots=None):
    """The float64 reference run on each sequence of `leaves` (q, k, v, S0, z0[, log-gates]) and joined,
    and its gradients of loss_of against `cots` (or the cotangents packed_run draws)."""
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    H, dv = leaves[0].shape[1], leaves[2].shape[-1]
    outs, states = [], []
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        initial = (ref_leaves[3][n:n + 1], ref_leaves[4][n:n + 1])
        if a == b:
            outs.append(ref_leaves[0].new_zeros(1, H, 0, dv))
            states.append(initial)
            continue
        rows = [t[:, :, a:b] for t in ref_leaves[:3]]
        if len(ref_leaves) > 5:
            out, final = gated_reference(*rows, torch.ones(H, dtype=torch.float64), ref_leaves[5][:, :, a:b],
                                         initial_state=initial)
        else:
            out, final = reference.linear_attention(*rows, causal=causal, initial_state=initial)
        outs.append(out)
        states.append(final)
    ref = (torch.cat(outs, 2), tuple(torch.cat([s[i] for s in states]) for i in range(2)))
    cots = cots if cots is not None else cotangents(ref[0], *ref[1], 3)
    return ref, torch.autograd.grad(loss_of(ref, cots), ref_leaves)


def flat(results):
    out, (S, z) = results
    return out, S, z


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal, gated", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("m, dv", [(32, 24), (100, 33), (128, 128)])
def test_equals_each_sequence_alone(dtype, causal, gated, m, dv):
    """Out, the final states and the gradients of q, k, v and the initial states equal, bit for bit,
    those of one call per sequence (the gate's to fp32 rounding: autograd's reverse cumulative sum of
    dL/dc is per segment of the packing in one and per call in the other), and the tensor cores ran
    every part."""
    q, k, v, cu, state, gate = packed_inputs(2, m, dv, dtype, seed=m + dv, gated=gated)
    torch.ops.linattn._reset_warp_emulation_counters()
    packed, packed_grads = packed_run(q, k, v, cu, state, gate, causal)
    assert counters()["mma"] > 0, "the tensor cores did not run"
    alone, alone_grads = each_sequence_alone(q, k, v, OFFSETS, state, gate, causal)
    for name, a, b in zip(("out", "S", "z"), flat(packed), flat(alone)):
        assert torch.equal(a, b), name
    for name, a, b in zip(("q", "k", "v", "S0", "z0"), packed_grads, alone_grads):
        assert torch.equal(a, b), f"grad {name}"
    if gated:
        assert_close(packed_grads[5], alone_grads[5].double(), 1e-6, "grad gate")


def test_against_reference_and_every_pass_on_tensor_cores():
    """Out, states and every gradient (the gate's too) against the float64 reference per sequence,
    and the forward and the backward each executed mma: a packed call never reaches the CPU kernel."""
    dtype, H, m, dv = torch.bfloat16, 2, 64, 48
    q, k, v, cu, state, gate = packed_inputs(H, m, dv, dtype, seed=5, gated=True)
    leaves = leaves_of(q, k, v, state, gate)
    with ops.fused_implementation():
        torch.ops.linattn._reset_warp_emulation_counters()
        results = linattn.linear_attention(*leaves[:3], causal=True, cu_seqlens=cu, gate=leaves[5],
                                           initial_state=tuple(leaves[3:5]), output_final_state=True)
        assert counters()["mma"] > 0, "the tensor-core forward did not run"
        cots = cotangents(results[0], *results[1], seed=4)
        torch.ops.linattn._reset_warp_emulation_counters()
        grads = torch.autograd.grad(loss_of(results, cots), leaves)
        assert counters()["mma"] > 0, "the tensor-core backward did not run"
    ref, ref_grads = reference_per_sequence(leaves, OFFSETS, True, cots)
    for name, a, b in zip(("out", "S", "z"), flat(results), flat(ref)):
        assert_close(a, b, TOLERANCE[dtype], name)
    for name, a, b in zip(("q", "k", "v", "S0", "z0", "gate"), grads, ref_grads):
        assert_close(a, b, 2 * TOLERANCE[dtype], f"grad {name}")


def test_traffic_is_the_sum_of_the_sequences():
    """The forward's global reads and writes of a packed call equal those of its sequences run one
    by one: no row is read by a block of another sequence."""
    q, k, v, cu, state, _ = packed_inputs(2, 64, 64, torch.bfloat16, seed=7)
    initial = torch.cat([state[0], state[1].unsqueeze(-1)], -1)
    torch.ops.linattn._reset_warp_emulation_counters()
    FWD(q, k, v, initial, None, ELU, True, True, 1e-6, None, cu)
    packed = counters()
    read = written = 0
    # (An empty sequence's blocks still read and write its state: 2 heads × 64 × 65 fp32 each way.)
    state_bytes = 2 * 64 * 65 * 4
    for n, (a, b) in enumerate(zip(OFFSETS[:-1], OFFSETS[1:])):
        if a == b:
            read += state_bytes
            written += state_bytes
            continue
        torch.ops.linattn._reset_warp_emulation_counters()
        FWD(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], initial[n:n + 1], None, ELU, True, True, 1e-6)
        read += counters()["read_bytes"]
        written += counters()["written_bytes"]
    assert packed["read_bytes"] == read and packed["written_bytes"] == written


def test_falls_back_where_the_tensor_cores_do_not_take_the_call():
    """fp32 inputs and a backward with head dims above 256 run the CPU kernel (no mma) and still
    match the reference."""
    q, k, v, cu, state, _ = packed_inputs(2, 16, 8, torch.float32, seed=9)
    torch.ops.linattn._reset_warp_emulation_counters()
    with ops.fused_implementation():
        out = linattn.linear_attention(q, k, v, causal=True, cu_seqlens=cu)
    assert counters()["mma"] == 0
    expected = torch.cat([reference.linear_attention(q[:, :, a:b].double(), k[:, :, a:b].double(),
                                                     v[:, :, a:b].double(), causal=True)[0]
                          for a, b in zip(OFFSETS[:-1], OFFSETS[1:])], 2)
    assert_close(out, expected, TOLERANCE[torch.float32], "out")
    q, k, v, cu, state, _ = packed_inputs(1, 264, 16, torch.bfloat16, offsets=[0, 30, 70], seed=10)
    torch.ops.linattn._reset_warp_emulation_counters()
    packed, grads = packed_run(q, k, v, cu, state, None, True)
    assert counters()["mma"] == 0
    alone, alone_grads = each_sequence_alone(q, k, v, [0, 30, 70], state, None, True)
    for name, a, b in zip(("q", "k", "v", "S0", "z0"), grads, alone_grads):
        assert_close(a, b.double(), TOLERANCE[torch.bfloat16], f"grad {name}")


def test_split_of_one_packed_sequence_equals_the_unpacked_split(monkeypatch):
    """One packed sequence whose (sequence, head) blocks leave SMs idle is split as the unpacked call is
    (6 emulated SMs, H = 2, T = 1536: three segments of 512 rows either way), so out, state and every
    gradient equal the unpacked call's bit for bit, and the split ran (it writes per-segment sums)."""
    T = 1536
    q, k, v, cu, state, gate = packed_inputs(2, 64, 48, torch.bfloat16, offsets=[0, T], seed=15, gated=True)
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "6")
    torch.ops.linattn._reset_warp_emulation_counters()
    packed, packed_grads = packed_run(q, k, v, cu, state, gate, True)
    split_written = counters()["written_bytes"]
    alone, alone_grads = each_sequence_alone(q, k, v, [0, T], state, gate, True)
    for name, a, b in zip(("out", "S", "z"), flat(packed), flat(alone)):
        assert torch.equal(a, b), name
    for name, a, b in zip(("q", "k", "v", "S0", "z0"), packed_grads, alone_grads):
        assert torch.equal(a, b), f"grad {name}"
    assert_close(packed_grads[5], alone_grads[5].double(), 1e-6, "grad gate")
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "1")  # as many SMs as blocks: no split
    torch.ops.linattn._reset_warp_emulation_counters()
    packed_run(q, k, v, cu, state, gate, True)
    assert split_written > counters()["written_bytes"], "the split did not run (no segment sums written)"


# Sequences of unequal lengths: 16 emulated SMs over 3 sequences × 2 heads want 3 segments per
# sequence, but 3100 rows hold states for 2 (3100 // (512 · 3)), so segments of 1600 rows: the
# long sequence, starting mid-chunk, runs as two; the short ones' second blocks are empty.
UNEQUAL = [0, 37, 3000, 3100]


@pytest.mark.parametrize("causal, gated", [(True, False), (False, False), (True, True)])
def test_split_packed_sequences_against_reference_and_unsplit(monkeypatch, causal, gated):
    """Packed sequences of unequal lengths split into segments (see UNEQUAL): out, states and every
    gradient (the gate's too) against the float64 reference per sequence and against the unsplit
    packed call; the split ran (it writes per-segment sums), every part on the tensor cores."""
    H, m, dv = 2, 32, 40
    q, k, v, cu, state, gate = packed_inputs(H, m, dv, torch.bfloat16, offsets=UNEQUAL, seed=16, gated=gated)
    results = {}
    for sms in ("16", "1"):  # (1: no split)
        monkeypatch.setenv("LINATTN_EMULATED_SMS", sms)
        torch.ops.linattn._reset_warp_emulation_counters()
        results[sms] = packed_run(q, k, v, cu, state, gate, causal)
        results[sms + " counters"] = counters()
    split, split_grads = results["16"]
    whole, whole_grads = results["1"]
    assert results["16 counters"]["mma"] > 0, "the tensor cores did not run"
    assert results["16 counters"]["written_bytes"] > results["1 counters"]["written_bytes"], "no split ran"
    ref, ref_grads = reference_per_sequence(leaves_of(q, k, v, state, gate), UNEQUAL, causal)
    names = ("q", "k", "v", "S0", "z0", "gate")
    for name, a, b, c in zip(("out", "S", "z"), flat(split), flat(ref), flat(whole)):
        assert_close(a, b, TOLERANCE[torch.bfloat16], name)
        assert_close(a, c.double(), TOLERANCE[torch.bfloat16], f"{name} split vs whole")
    for name, a, b, c in zip(names, split_grads, ref_grads, whole_grads):
        assert_close(a, b, 2 * TOLERANCE[torch.bfloat16], f"grad {name}")
        assert_close(a, c.double(), TOLERANCE[torch.bfloat16], f"grad {name} split vs whole")


@pytest.mark.parametrize("offsets, message", [([0, 50, 20, 300], "non-decreasing"), ([0, 50, 299], "end at")])
def test_bad_offsets_raise(offsets, message):
    q, k, v, _, _, _ = packed_inputs(1, 32, 32, torch.bfloat16, seed=11)
    cu = torch.tensor(offsets, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message):
        FWD(q, k, v, None, None, ELU, True, True, 1e-6, None, cu)


def test_opcheck_and_compile():
    """opcheck of both operators with packed sequences and a fading state, and torch.compile
    (fullgraph) gradients equal to eager's (q, k, v bit for bit; the gate's to fp32 rounding)."""
    q, k, v, cu, state, gate = packed_inputs(2, 32, 32, torch.bfloat16, offsets=[0, 20, 20, 90], seed=12,
                                             gated=True)
    initial = torch.cat([state[0], state[1].unsqueeze(-1)], -1)
    log_decay = gate.clone()
    with ops.fused_implementation():
        torch.library.opcheck(FWD, (q, k, v, initial, None, ELU, True, True, 1e-6, log_decay, cu))
        out, final, den = FWD(q, k, v, initial, None, ELU, True, True, 1e-6, log_decay, cu)
        torch.library.opcheck(BWD, (out.clone(), torch.randn_like(final), q, k, v, out, den, initial, None, ELU, True,
                                    True, None, log_decay, cu))
        leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]

        def loss(q, k, v, gate):
            return linattn.linear_attention(q, k, v, causal=True, gate=gate, cu_seqlens=cu).float().square().sum()

        eager = torch.autograd.grad(loss(*leaves), leaves)
        compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for name, a, b in zip(("q", "k", "v"), compiled, eager):
        assert torch.equal(a, b), name
    torch.testing.assert_close(compiled[3], eager[3], rtol=1e-5, atol=1e-5, msg="gate")


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal, gated", [(True, False), (False, False), (True, True)])
def test_cuda_kernels_equal_each_sequence_alone(dtype, causal, gated):
    """On the GPU: a packed call's outputs and gradients equal the per-sequence calls' bit for bit
    (as in the emulation) at head dims 128."""
    offsets = [0, 0, 1, 40, 104, 104, 700, 1000]  # (under 1024 rows: neither call splits)
    q, k, v, cu, state, gate = packed_inputs(4, 128, 128, dtype, offsets=offsets, seed=13, gated=gated)
    cuda = [t.cuda() for t in (q, k, v)]
    state = tuple(t.cuda() for t in state)
    gate = gate.cuda() if gated else None
    packed, packed_grads = packed_run(*cuda, cu.cuda(), state, gate, causal)
    alone, alone_grads = each_sequence_alone(*cuda, offsets, state, gate, causal)
    for name, a, b in zip(("out", "S", "z"), flat(packed), flat(alone)):
        assert torch.equal(a, b), name
    for name, a, b in zip(("q", "k", "v", "S0", "z0"), packed_grads, alone_grads):
        assert torch.equal(a, b), f"grad {name}"


@needs_gpu
def test_cuda_offsets_past_the_packing_stay_in_bounds():
    """Offsets are not read back on the GPU (no synchronisation): a last offset past the packed
    length is clamped into it by the kernels, and the sequences before it are unaffected."""
    q, k, v, _, _, _ = packed_inputs(2, 64, 64, torch.bfloat16, offsets=[0, 100, 200], seed=14)
    cuda = [t.cuda() for t in (q, k, v)]
    cu = torch.tensor([0, 100, 100000], dtype=torch.int32, device="cuda")
    out, final, _ = FWD(*cuda, None, None, ELU, True, True, 1e-6, None, cu)
    torch.cuda.synchronize()
    alone, _, _ = FWD(*(t[:, :, :100] for t in cuda), None, None, ELU, True, True, 1e-6)
    assert torch.equal(out[:, :, :100], alone)
