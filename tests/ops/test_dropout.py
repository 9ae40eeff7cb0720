"""Attention dropout in the restricted softmax (the operator's dropout_p / dropout_seed;
sliding_window_attention's and block_sparse_attention's dropout_p, flash-attn's): probabilities
dropped after the softmax, the kept ones scaled by 1 / (1 − p), pair (b, h, i, j) kept when the
Philox4x32-10 bits of (seed; j / 4, i, b·H + h, 0), word j mod 4, reach ⌊p·2^32⌋ (common/philox.h).

An independent Philox in numpy, checked against Random123's known-answer vectors, gives the mask;
the CPU kernel's and the device-generic tiles' masks (read through one-hot values) must be that
mask exactly, and their out, lse and gradients equal float64 softmax with that mask, for every
pattern kind, grouped-query heads, the lse's cotangent; the kept fraction and its independence
across neighbouring pairs; gradcheck, opcheck, compile; the seeds drawn from torch's generator; and
the refusals (p outside [0, 1), a missing or malformed seed)."""
import numpy as np
import pytest
import torch

import linattn
from linattn import reference
from linattn.flash_attn_compat import flash_attn_func
from linattn.ops.restricted import Pattern, dropout_seed_from
from conftest import TOLERANCE, assert_close
from test_flash_forward import counters
from test_softcap import SCALE, check_float64, patterns

FWD = torch.ops.linattn.restricted_softmax_fwd
MASK32 = np.uint64(0xFFFFFFFF)


def philox(c0, c1, c2, c3, key: int):
    """Philox4x32-10 on numpy uint64 arrays holding 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & MASK32, (k1 + np.uint64(0xBB67AE85)) & MASK32
    return c0, c1, c2, c3


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    vectors = [((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
               ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
               ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
                (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in vectors:
        assert tuple(int(w) for w in philox(*counter, key)) == expected


def keep_mask(seed: torch.Tensor, B, H, Tq, Tk, p) -> torch.Tensor:
    """(B, H, T_q, T_k) bool: the pairs dropout keeps, by the definition above."""
    b, h, i, j = np.meshgrid(np.arange(B), np.arange(H), np.arange(Tq), np.arange(Tk), indexing="ij")
    words = philox((j >> 2).astype(np.uint64), i.astype(np.uint64), (b * H + h).astype(np.uint64), 0,
                   int(seed.item()) & 0xFFFFFFFFFFFFFFFF)
    bits = np.choose(j & 3, words)
    threshold = min(int(p * 4294967296.0), 0xFFFFFFFF)
    return torch.from_numpy(bits >= threshold)


def seed_of(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def with_dropout(pattern, p, seed):
    return Pattern(**{**pattern.__dict__, "dropout_p": p, "dropout_seed": seed})


def reference_forward(q, k, v, pattern):
    fixed = None
    if pattern.positions is not None:
        pos = pattern.positions
        fixed = pos[:, :, :, None] == pos[:, :, None, :]
    keep = keep_mask(pattern.dropout_seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], pattern.dropout_p)
    return reference.masked_softmax_attention(q, k, v, pattern.dense_mask(q.shape[2], k.shape[2]), SCALE,
                                              bias=pattern.bias, fixed=fixed, softcap=pattern.softcap,
                                              keep=keep, dropout_p=pattern.dropout_p, return_lse=True)


def mask_through_one_hot_values(op, B, H, T, pattern, dtype=torch.float64):
    """Values one-hot per key make out[i, j] the dropped probability itself: nonzero exactly where
    the pair is visible and kept (every kept probability is positive)."""
    q, k = (torch.randn(B, H, T, 8, generator=torch.Generator().manual_seed(s), dtype=dtype) for s in (1, 2))
    v = torch.eye(T, dtype=dtype).expand(B, H, T, T)
    return op(q, k, v, SCALE, *pattern.op_args())[0] != 0


@pytest.mark.parametrize("suffix", ["", "_generic"])
def test_the_kernels_mask_is_the_definitions(suffix):
    """The CPU kernel's and the device-generic tiles' masks (windows, global tokens, layouts per head
    and shared, blocks of whole quads of keys and not) are the definition's, bit for bit."""
    op = getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix)
    B, H, T, p = 2, 3, 70, 0.3
    seed = seed_of(-123456789012345)  # negative: its two's-complement bits are the key
    keep = keep_mask(seed, B, H, T, T, p)
    global_mask = torch.zeros(B, T, dtype=torch.bool)
    global_mask[1, [0, 33]] = True
    n = -(-T // 8)
    for pattern in (Pattern(), Pattern(window=(9, 4), global_mask=global_mask),
                    Pattern(layout=torch.rand(H, n, n, generator=torch.Generator().manual_seed(2)) < 0.5,
                            block_size=8),
                    Pattern(layout=torch.rand(1, n, n, generator=torch.Generator().manual_seed(3)) < 0.5,
                            block_size=8, causal=True),
                    Pattern(layout=torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(4)) < 0.5,
                            block_size=6)):
        visible = pattern.dense_mask(T, T).expand(B, H, T, T)
        got = mask_through_one_hot_values(op, B, H, T, with_dropout(pattern, p, seed))
        assert torch.equal(got, keep & visible)


def test_the_generic_mask_in_row_chunks():
    """A tile whose one block of rows exceeds the generic path's Philox chunk (2^22 pairs: causal
    span tiles of 2 heads × 2100 × 2100) draws it in row chunks, the same mask."""
    B, H, T, p = 1, 2, 2100, 0.5
    seed = seed_of(77)
    got = mask_through_one_hot_values(torch.ops.linattn.restricted_softmax_fwd_generic, B, H, T,
                                      Pattern(causal=True, dropout_p=p, dropout_seed=seed), torch.float32)
    assert torch.equal(got, keep_mask(seed, B, H, T, T, p) & torch.ones(T, T, dtype=torch.bool).tril())


@pytest.mark.parametrize("suffix", ["", "_generic"])
@pytest.mark.parametrize("name", list(patterns(8, 1)))
def test_float64_equals_softmax_with_the_mask(suffix, name):
    """out, lse (the undropped softmax's) and the gradients of q, k, v (grouped-query heads) and the
    bias, for cotangents of out and lse, equal float64 autograd with the definition's mask."""
    T, H = 37, 4
    pattern = with_dropout(patterns(T, H)[name], 0.25, seed_of(2024))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, H, T, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, T, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (16, 12))
    bias = pattern.bias.clone().requires_grad_() if pattern.bias is not None else None
    pattern = Pattern(**{**pattern.__dict__, "bias": bias})
    check_float64(getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix), q, k, v, pattern,
                  reference=lambda q, k, v, scale, pattern: reference_forward(q, k, v, pattern))


FUSED_FWD = torch.ops.linattn.restricted_softmax_fwd_fused.default
FUSED_BWD = torch.ops.linattn.restricted_softmax_bwd_fused.default


def test_the_flash_engines_mask_is_the_definitions():
    """The flash engine's emulation (mma counted) drops the definition's pairs: bands whose keys
    start off a quad (a thread's two keys then straddle quads), gathered global tokens, a layout."""
    B, H, T, p = 2, 3, 70, 0.3
    seed = seed_of(-987654321)
    keep = keep_mask(seed, B, H, T, T, p)
    global_mask = torch.zeros(B, T, dtype=torch.bool)
    global_mask[1, [0, 33]] = True
    n = -(-T // 16)
    for pattern in (Pattern(window=(9, 4), global_mask=global_mask), Pattern(window=(-1, 3)),
                    Pattern(layout=torch.rand(H, n, n, generator=torch.Generator().manual_seed(2)) < 0.5,
                            block_size=16, causal=True)):
        torch.ops.linattn._reset_warp_emulation_counters()
        got = mask_through_one_hot_values(FUSED_FWD, B, H, T, with_dropout(pattern, p, seed), torch.bfloat16)
        assert counters()["mma"] > 0, "the flash engine did not run"
        assert torch.equal(got, keep & pattern.dense_mask(T, T).expand(B, H, T, T))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(patterns(8, 1)))
def test_flash_engine_forward_and_backward(dtype, name):
    """The flash engine's emulation with dropout and grouped-query heads: out, lse and the gradients
    of q, k, v and the bias (cotangents of out and lse) against float64 with the definition's mask."""
    T, H = 150, 4
    pattern = with_dropout(patterns(T, H)[name], 0.2, seed_of(31))
    if pattern.bias is not None:
        pattern = Pattern(**{**pattern.__dict__, "bias": pattern.bias.to(dtype)})
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, H, T, 40, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, T, d, generator=g).to(dtype) for d in (40, 24))
    torch.ops.linattn._reset_warp_emulation_counters()
    out, lse = FUSED_FWD(q, k, v, SCALE, *pattern.op_args())
    w_out = torch.randn(out.shape, generator=g).to(dtype)
    w_lse = torch.randn(lse.shape, generator=g).masked_fill(torch.isinf(lse), 0)
    grads = FUSED_BWD(w_out, w_lse, q, k, v, out, lse, SCALE, *pattern.op_args())
    assert counters()["mma"] > 0, "the flash engine did not run"
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    bias = pattern.bias.double().requires_grad_() if pattern.bias is not None else None
    ref_out, ref_lse = reference_forward(*leaves, Pattern(**{**pattern.__dict__, "bias": bias}))
    assert_close(out, ref_out, TOLERANCE[dtype], "out")
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], 1e-4, "lse")
    loss = (ref_out * w_out.double()).sum() + (torch.where(finite, ref_lse, 0) * w_lse.double()).sum()
    expected = torch.autograd.grad(loss, leaves + ([bias] if bias is not None else []))
    for label, got, want in zip(("q", "k", "v", "bias"), grads, expected):
        assert_close(got, want, 2 * TOLERANCE[dtype], f"grad {label}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision(dtype):
    T, H = 150, 2
    pattern = with_dropout(Pattern(window=(20, 3)), 0.1, seed_of(7))
    q, k, v = (torch.randn(2, H, T, 16, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (4, 5, 6))
    out, _ = FWD(q, k, v, SCALE, *pattern.op_args())
    assert_close(out, reference_forward(q, k, v, pattern)[0], TOLERANCE[dtype], "out")


def test_kept_fraction_and_independence():
    """Over 4·4·300·300 pairs the kept fraction is 1 − p within 5 standard deviations, and a pair's
    fate does not predict its neighbour's (key j + 1, query i + 1)."""
    p = 0.3
    keep = keep_mask(seed_of(99), 4, 4, 300, 300, p).double()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    for a, b in ((keep[..., :-1], keep[..., 1:]), (keep[:, :, :-1], keep[:, :, 1:])):
        correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(correlation) < 5 / a.numel() ** 0.5
    q, k, v = (torch.randn(1, 2, 300, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    v = torch.eye(300).expand(1, 2, 300, 300)
    out, _ = FWD(q, k, v, SCALE, *Pattern(dropout_p=p, dropout_seed=seed_of(5)).op_args())
    assert abs((out != 0).double().mean().item() - (1 - p)) < 0.01


def test_public_functions_draw_seeds_from_torch_generator():
    q, k, v = (torch.randn(2, 4, 33, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    kv = [t[:, :2] for t in (k, v)]
    torch.manual_seed(0)
    first = linattn.sliding_window_attention(q, *kv, 5, causal=True, dropout_p=0.2)
    torch.manual_seed(0)
    assert torch.equal(first, linattn.sliding_window_attention(q, *kv, 5, causal=True, dropout_p=0.2))
    assert not torch.equal(first, linattn.sliding_window_attention(q, *kv, 5, causal=True, dropout_p=0.2))
    generator = torch.Generator().manual_seed(11)
    seed = dropout_seed_from(torch.Generator().manual_seed(11))
    got = linattn.sliding_window_attention(q, *kv, 5, causal=True, dropout_p=0.2, generator=generator, scale=SCALE)
    want = reference_forward(q.double(), kv[0].double(), kv[1].double(),
                             with_dropout(Pattern(window=(5, 0), causal=True), 0.2, seed))[0]
    assert_close(got, want, TOLERANCE[torch.float32], "sliding_window_attention")
    layout = linattn.functional.block_local_layout(33, 8, previous=True)
    got = linattn.functional.block_sparse_attention(q, *kv, layout, 8, dropout_p=0.2, scale=SCALE,
                                                    generator=torch.Generator().manual_seed(11))
    want = reference_forward(q.double(), kv[0].double(), kv[1].double(),
                             with_dropout(Pattern(layout=layout, block_size=8), 0.2, seed))[0]
    assert_close(got, want, TOLERANCE[torch.float32], "block_sparse_attention")
    torch.manual_seed(3)
    got = flash_attn_func(*(t.transpose(1, 2) for t in (q, *kv)), dropout_p=0.2, causal=True)
    torch.manual_seed(3)
    want = linattn.sliding_window_attention(q, *kv, -1, causal=True, dropout_p=0.2).transpose(1, 2)
    assert torch.equal(got, want)


def test_gradcheck_opcheck_compile_and_the_fused_switch():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = with_dropout(Pattern(window=(3, 1)), 0.4, seed_of(17))
    assert torch.autograd.gradcheck(lambda q, k, v: FWD(q, k, v, SCALE, *pattern.op_args()), (q, k, v))
    x = [t.detach().float().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(FWD.default, (*x, SCALE, *with_dropout(Pattern(causal=True), 0.4, seed_of(1)).op_args()))
    # float32 inputs are not the flash engine's: its operator runs the CPU kernel, equal.
    fused = torch.ops.linattn.restricted_softmax_fwd_fused(*x, SCALE, *pattern.op_args())
    assert torch.equal(fused[0], FWD(*x, SCALE, *pattern.op_args())[0])

    def call(q, k, v):
        return linattn.sliding_window_attention(q, k, v, 3, causal=True, dropout_p=0.4)

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # inductor draws the seed as eager does
        torch.manual_seed(5)
        compiled = torch.compile(call, fullgraph=True)(*x)
    torch.manual_seed(5)
    assert torch.equal(compiled, call(*x))


def test_refusals_name_the_argument():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    for p in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout_p must be a number in"):
            linattn.sliding_window_attention(q, k, v, 2, dropout_p=p)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\), got 1"):
        FWD(q, k, v, 1.0, *Pattern(dropout_p=1.0, dropout_seed=seed_of(1)).op_args())
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs a dropout_seed"):
        FWD(q, k, v, 1.0, *Pattern(dropout_p=0.5).op_args())
    with pytest.raises(RuntimeError, match=r"dropout_seed must be a CPU int64 tensor of shape \(1,\)"):
        FWD(q, k, v, 1.0, *Pattern(dropout_p=0.5, dropout_seed=torch.tensor([1, 2])).op_args())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("suffix", ["", "_fused"])
def test_cuda_masks_are_the_definitions(suffix):
    """On a GPU: the default path's and the flash engine's masks are the definition's, and their
    outputs and gradients equal the CPU kernel's (float32 default path; bf16 flash engine)."""
    op = getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix)
    B, H, T, p = 2, 3, 150, 0.3
    seed = seed_of(-5)
    n = -(-T // 16)
    for pattern in (Pattern(window=(20, 5)), Pattern(causal=True),
                    Pattern(layout=torch.rand(H, n, n, generator=torch.Generator().manual_seed(2)) < 0.5,
                            block_size=16)):
        dropped = with_dropout(pattern, p, seed)
        q, k = (torch.randn(B, H, T, 64, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
        v = torch.eye(T).expand(B, H, T, T).contiguous()
        dtype = torch.bfloat16 if suffix else torch.float32
        q, k = (t.to(dtype).cuda() for t in (q, k))
        layout = dropped.layout.cuda() if dropped.layout is not None else None
        on_gpu = Pattern(**{**dropped.__dict__, "layout": layout})
        got = op(q, k, v.to(dtype).cuda(), SCALE, *on_gpu.op_args())[0] != 0
        keep = keep_mask(seed, B, H, T, T, p)
        assert torch.equal(got.cpu(), keep & pattern.dense_mask(T, T).expand(B, H, T, T))
        x = [torch.randn(B, H, T, 64, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (3, 4, 5)]
        x_gpu = [t.cuda().requires_grad_() for t in x]
        x_cpu = [t.requires_grad_() for t in x]
        out_gpu, out_cpu = op(*x_gpu, SCALE, *on_gpu.op_args())[0], FWD(*x_cpu, SCALE, *dropped.op_args())[0]
        assert_close(out_gpu.cpu(), out_cpu, TOLERANCE[dtype], "GPU vs CPU out")
        w = torch.randn(out_cpu.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
        for got_grad, want in zip(torch.autograd.grad((out_gpu * w.cuda()).sum(), x_gpu),
                                  torch.autograd.grad((out_cpu * w).sum(), x_cpu)):
            assert_close(got_grad.cpu(), want, TOLERANCE[dtype], "GPU vs CPU grad")
