"""The device-generic restricted softmax's window tiles (csrc/restricted_softmax/generic_window.cpp,
docs/guide/cuda.md "The device-generic restricted softmax"): sliding tiles (blocks of rows, each with
its own band of keys, stacked in one product), span tiles (a block of rows against the band its rows
reach), Longformer's global keys as extra columns and global rows as tiles of their own, and tiles
split by their score bound. Against float64 softmax under the pattern's dense mask, against the CPU
kernel where a tile bound splits a call, and counted: a call's kernel launches do not grow with T."""
import pytest
import torch

from benchmarks.bench_generic_passes import DirectCalls, LaunchCalls
from linattn.ops.restricted import Pattern
from test_restricted_pattern import B, H, check_against_dense_mask

FWD = torch.ops.linattn.restricted_softmax_fwd_generic.default
BWD = torch.ops.linattn.restricted_softmax_bwd_generic.default


def ids(*shape, high=3, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def padding(T, seed=0):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.1
    mask[1, -40:] = True
    return mask


def global_tokens(T):
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, [0, 63, 64, 127, T - 1]] = True  # at block edges: inside some blocks' bands, outside others'
    mask[1, [5, 200]] = True
    return mask


def cases():
    return {
        # sliding tiles (a band of 128 keys per block of 64 rows), T_q < T_k: the keys are cropped and padded
        "sliding, T_q < T_k, dilation, per-head segments, padding": (
            229, 341, Pattern(window=(5, 2), dilation=2, key_padding_mask=padding(341),
                              q_segments=ids(B, H, 229), k_segments=ids(B, H, 341, seed=1))),
        # T_q > T_k: the first rows' bands lie before key 0 (rows that see no key: 0, lse −inf)
        "sliding, T_q > T_k": (341, 229, Pattern(window=(30, 4))),
        "sliding, causal": (300, 300, Pattern(window=(150, 0), causal=True, key_padding_mask=padding(300))),
        "sliding, global tokens at block edges, padding": (
            301, 301, Pattern(window=(20, 20), global_mask=global_tokens(301), key_padding_mask=padding(301))),
        # span tiles: an unbounded side, or a band as wide as the keys
        "span, unbounded left": (300, 300, Pattern(window=(-1, 3))),
        "span, causal, segments": (300, 300, Pattern(causal=True, q_segments=ids(B, 1, 300, seed=2),
                                                     k_segments=ids(B, 1, 300, seed=2))),
        "span, wide window, global tokens": (300, 300, Pattern(window=(200, 200), global_mask=global_tokens(300))),
    }


@pytest.mark.parametrize("case", list(cases()))
def test_window_tiles_equal_softmax_under_the_dense_mask(case):
    check_against_dense_mask(FWD, *cases()[case], seed=3)


def launches(op, *args):
    mode = LaunchCalls(op)
    with mode:
        op(*args)
    return mode.launches()


@pytest.mark.parametrize("pattern", [Pattern(window=(256, 0), causal=True), Pattern(window=(64, 64), dilation=2),
                                     Pattern(causal=True)], ids=["sliding causal", "sliding dilated", "span causal"])
def test_launches_do_not_grow_with_the_sequence(pattern):
    """On Meta tensors (what a CUDA tensor's calls see, with no data): the same number of computing
    calls at T = 1024 and 4096, forward and backward. The host loop this replaced issued about 40
    (forward) and 58 (backward) per 128 rows."""
    counts = {}
    for T in (1024, 4096):
        q, k, v = (torch.empty(1, 2, T, 16, device="meta") for _ in range(3))
        out, lse = FWD(q, k, v, 0.25, *pattern.op_args())
        counts[T] = (launches(FWD, q, k, v, 0.25, *pattern.op_args()),
                     launches(BWD, torch.empty_like(out), None, q, k, v, out, lse, 0.25, *pattern.op_args()))
    assert counts[1024] == counts[4096], counts
    assert counts[4096][0] <= 55 and counts[4096][1] <= 80, counts


@pytest.mark.parametrize("pattern,batch,heads", [
    (Pattern(window=(30, 30)), 16, 16),  # 2^21 scores a block of 64 rows: 16 blocks a tile, 3 tiles
    ("global", 16, 16),                  # the same with global keys (15 blocks a tile) and global rows
    (Pattern(causal=True), 4, 8),        # span: 3 blocks of 128 rows a tile, 7 tiles
], ids=["sliding", "sliding with global tokens", "span"])
def test_calls_split_into_tiles_equal_the_cpu_kernel(pattern, batch, heads):
    T, D = 2600, 4
    if pattern == "global":
        mask = torch.zeros(batch, T, dtype=torch.bool)
        mask[:, [0, 1000, 1100, 2599]] = True
        mask[3, 50] = True
        pattern = Pattern(window=(30, 30), global_mask=mask)
    check_split_call_equals_cpu_kernel(batch, heads, T, D, pattern)


def check_split_call_equals_cpu_kernel(batch, heads, T, D, pattern):
    """The generic op's out, lse and gradients equal the CPU kernel's in float32, in a call that its
    tile bound splits into several tiles (counted: several score products)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, T, D, generator=g) for _ in range(3))
    args = (0.5, *pattern.op_args())
    out, lse = FWD(q, k, v, *args)
    cpu_out, cpu_lse = torch.ops.linattn.restricted_softmax_fwd(q, k, v, *args)
    torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, cpu_lse, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    got = BWD(grad, None, q, k, v, out, lse, *args)
    want = torch.ops.linattn.restricted_softmax_bwd(grad, None, q, k, v, cpu_out, cpu_lse, *args)
    for name, a, b in zip("qkv", got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
    mode = DirectCalls(FWD)
    with mode:
        FWD(q, k, v, *args)
    assert mode.calls.count("matmul") >= 3 * 2, "the call was meant to split into several tiles"
