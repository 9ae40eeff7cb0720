"""The tensor-core backward of linear attention at head dims above 128 (up to 256): a kernel block
keeps its state (Sᵀ or U, value × feature columns) in fp32 registers, so the kernels take at most
128 × 128 and a wider call runs one backward per (feature tile, value tile) of at most 128 columns;
a gradient that sums over tiles goes through an fp32 buffer the first tile writes and the last adds
to and rounds to 16 bits once (fused_plans.h, tensor_core_backward; docs/guide/cuda.md, "Head dims
above 128").

On CPU tensors through the warp-operation layer's emulation; every test counts the mma instructions
the backward executed and how many tiles ran, so none can pass on the CPU kernel these calls went
to before."""
import pytest
import torch

from conftest import TOLERANCE, assert_close, gated_inputs
from test_tensor_core_backward import (check, check_autograd_opcheck_and_compile, check_split, counters,
                                      initial_state_of, make, run)
from test_tensor_core_fading_backward import check as check_fading
from test_tensor_core_fading_backward import gradients as fading_gradients


def backward_mma(m, dv, T, causal=True):
    """The mma count of one backward at (m, dv), B = H = 1, T rows (no state cotangent)."""
    q, k, v = make(1, 1, T, T, m, dv, torch.bfloat16, seed=1, scale=0.5)
    run(q, k, v, grad_state=None, causal=causal)
    return counters()["mma"]


@pytest.mark.parametrize("m, dv", [(256, 256), (200, 64), (64, 256), (130, 16), (256, 131), (129, 129)])
@pytest.mark.parametrize("causal", [True, False])
def test_head_dims_above_128(m, dv, causal):
    """Every gradient, dS0 included (its z column a sum over the value tiles), against the float64
    reference at head dims that cut into tiles of 128 and a remainder, with an initial state and a
    cotangent of the final state."""
    q, k, v = make(1, 2, 70, 70, m, dv, torch.bfloat16, seed=m + dv, scale=0.5)
    check(q, k, v, TOLERANCE[torch.bfloat16], causal=causal, initial_state=initial_state_of(1, 2, m, dv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 64, 131])
def test_dtypes_and_lengths_at_256(dtype, T):
    q, k, v = make(1, 1, T, T, 256, 256, dtype, seed=T, scale=0.5)
    check(q, k, v, TOLERANCE[dtype], causal=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map, normalize", [("elu", True), ("relu", False), ("identity", False)])
def test_feature_maps_padding_and_strided_views(causal, feature_map, normalize):
    """Padded keys, each feature map (φ' applied to each tile's partial dφ, whose sum is the
    gradient), and (B, T, H, D) views whose tiles are column ranges of strided rows."""
    B, T, H, m, dv = 2, 90, 2, 192, 160
    g = torch.Generator().manual_seed(9)
    base = torch.randn(B, T, H, 2 * m + dv, generator=g).mul(0.5).bfloat16()
    q = base[..., :m].transpose(1, 2)
    k = base[..., m:2 * m].transpose(1, 2)
    v = base[..., 2 * m:].transpose(1, 2)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 60:] = True
    mask[1, ::4] = True
    check(q, k, v, TOLERANCE[torch.bfloat16], causal=causal, mask=mask, feature_map=feature_map,
          normalize=normalize, initial_state=initial_state_of(B, H, m, dv))


@pytest.mark.parametrize("hand_final_state", [True, False])
def test_cross_attention_lengths(hand_final_state):
    """Non-causal T_q != T_k: each tile's query pass reads its block of the forward's final state
    (z in every value tile) when it is handed over, and sums its keys itself otherwise."""
    q, k, v = make(1, 2, 50, 97, 160, 200, torch.float16, seed=7, scale=0.5)
    check(q, k, v, TOLERANCE[torch.float16], causal=False, initial_state=initial_state_of(1, 2, 160, 200),
          hand_final_state=hand_final_state)


def test_every_tile_runs_once():
    """The mma a tiled backward executes is the sum of its tiles' as whole calls: (256, 256) runs
    the (128, 128) kernels four times, (200, 64) the (128, 64) and (72 → 128, 64) ones once each."""
    assert backward_mma(256, 256, 64) == 4 * backward_mma(128, 128, 64)
    assert backward_mma(200, 64, 64) == 2 * backward_mma(128, 64, 64)
    assert backward_mma(64, 256, 64) == 2 * backward_mma(64, 128, 64)


def test_traffic_and_bank_conflicts(monkeypatch):
    """Global traffic of the causal backward at B=1 H=2 D=256 T=512 bf16 as a multiple of its floor
    (q, k, v, o and grad_out read, dq, dk, dv written once): each of the four tiles reads its
    columns of q, k (both passes), v, o and grad_out, and the sums' fp32 parts are written by the
    first tile and read by the last (4.40x here with dS_N and dS0; a whole call at D = 128 is
    1.57x). The bound catches growth; no ldmatrix bank conflicts."""
    monkeypatch.setenv("LINATTN_EMULATED_SMS", "2")
    B, H, T, D = 1, 2, 512, 256
    q, k, v = make(B, H, T, T, D, D, torch.bfloat16, seed=6, scale=0.3)
    run(q, k, v, grad_state=None)
    c = counters()
    traffic = (c["read_bytes"] + c["written_bytes"]) / (8 * B * H * T * D * 2)
    assert traffic <= 4.45, f"traffic {traffic:.3f}x the floor"
    assert c["ldmatrix_wavefronts"] == c["ldmatrix_matrices"], "ldmatrix bank conflicts"


def test_zero_cotangent_in_one_value_tile():
    """A row whose cotangent is 0 in one value tile and not in the other: that tile passes nothing
    for it (its share of gn is 0), the other the whole row's gradient."""
    q, k, v = make(1, 1, 40, 40, 64, 256, torch.bfloat16, seed=3, scale=0.5)
    out, _, _, _ = run(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    grad_out[0, 0, 10:30, :128] = 0
    grad_out[0, 0, 20:, 128:] = 0
    check(q, k, v, TOLERANCE[torch.bfloat16], grad_out=grad_out, grad_state=None)


def test_sequence_split(monkeypatch):
    """One long sequence for 16 emulated SMs (B·H = 2, T = 1600: three segments) at (256, 160): each
    tile splits as a whole call does; against the reference and the unsplit run."""
    B, H, T, m, dv = 1, 2, 1600, 256, 160
    q, k, v = make(B, H, T, T, m, dv, torch.bfloat16, seed=13, scale=0.3)
    check_split(monkeypatch, q, k, v, causal=True, initial_state=initial_state_of(B, H, m, dv))


@pytest.mark.parametrize("m, dv, T", [(256, 256, 70), (160, 200, 130)])
def test_fading_state(m, dv, T):
    """Decay and gates: the tiles' row terms of dL/dc and their ⟨dS_N, S_N⟩ parts (dS_N's z column
    in value tile 0 only) sum to the call's; every gradient (decay, gate and the initial state's
    included) against the float64 reference."""
    q, k, v, decay, gate = gated_inputs(1, 2, T, m, dv, torch.bfloat16, seed=T + m)
    q, k, v = (t * 0.5 for t in (q, k, v))
    g = torch.Generator().manual_seed(4)
    state = (torch.randn(1, 2, m, dv, generator=g), torch.rand(1, 2, m, generator=g) + 1)
    check_fading(*fading_gradients(q, k, v, decay, gate, initial_state=state, seed=T), 2 * TOLERANCE[torch.bfloat16])


def test_packed_sequences():
    """cu_seqlens at (256, 192): every tile restarts its chunks at the sequence starts; gradients equal
    those of one call per sequence (also tiled), and the backward ran on the tensor cores."""
    from test_tensor_core_packed import each_sequence_alone, packed_inputs, packed_run
    offsets = [0, 30, 100]
    q, k, v, cu, state, gate = packed_inputs(1, 256, 192, torch.bfloat16, offsets=offsets, seed=10, gated=True)
    torch.ops.linattn._reset_warp_emulation_counters()
    _, grads = packed_run(q, k, v, cu, state, gate, True)
    assert counters()["mma"] > 0
    _, alone = each_sequence_alone(q, k, v, offsets, state, gate, True)
    for name, a, b in zip(("q", "k", "v", "S0", "z0", "gate"), grads, alone):
        assert_close(a, b.double(), TOLERANCE[torch.bfloat16], f"grad {name}")


def test_falls_back_above_256():
    q, k, v = make(1, 1, 40, 40, 264, 16, torch.bfloat16, seed=11, scale=0.5)
    check(q, k, v, TOLERANCE[torch.bfloat16], expect_tensor_cores=False)


def test_autograd_opcheck_and_compile():
    """At (256, 256): gradients against the reference through linattn.linear_attention,
    torch.compile(fullgraph=True) equal to eager, and opcheck of the backward operator."""
    check_autograd_opcheck_and_compile(1, 40, 256, 256, True, scale=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m, dv, T", [(256, 256, 777), (192, 160, 130)])
def test_cuda_kernels_match_reference(causal, m, dv, T):
    q, k, v = make(2, 3, T, T, m, dv, torch.bfloat16, seed=T, scale=0.5, device="cuda")
    check(q, k, v, TOLERANCE[torch.bfloat16], causal=causal, initial_state=initial_state_of(2, 3, m, dv).cuda())
