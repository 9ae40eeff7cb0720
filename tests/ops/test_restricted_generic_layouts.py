"""The device-generic restricted softmax's block layouts (csrc/restricted_softmax/generic_layout.cpp,
docs/guide/cuda.md "The device-generic restricted softmax"): query blocks of whole layout rows (or 128
rows of a larger block), each with the key blocks its rows hold gathered on the device, pairs of
(layout head, query block) in classes of similar width (BigBird's global rows apart), tiles split by
their score bound. Against float64 softmax under the pattern's dense mask, against the CPU kernel for
the score terms (bias, Reformer's positions) and where a tile bound splits a call, and counted: a
call's kernel launches do not grow with T."""
import pytest
import torch

from benchmarks.bench_generic_passes import LaunchCalls
from linattn.ops.restricted import Pattern
from test_restricted_generic_tiles import check_split_call_equals_cpu_kernel, ids, padding
from test_restricted_pattern import B, H, check_against_dense_mask

FWD = torch.ops.linattn.restricted_softmax_fwd_generic.default
BWD = torch.ops.linattn.restricted_softmax_bwd_generic.default


def random_layout(heads, rows, cols, density=0.4, seed=0):
    return torch.rand(heads, rows, cols, generator=torch.Generator().manual_seed(seed)) < density


def bigbird(T, block, heads, seed=0):
    """Band of 3 blocks, 2 global blocks (rows and columns), 2 random blocks a row, per head."""
    n = -(-T // block)
    i = torch.arange(n)
    layout = ((i[:, None] - i[None, :]).abs() <= 1).expand(heads, n, n).clone()
    layout[:, :2, :] = True
    layout[:, :, :2] = True
    g = torch.Generator().manual_seed(seed)
    for h in range(heads):
        layout[h, i[:, None], torch.randint(0, n, (n, 2), generator=g)] = True
    return layout


def cases():
    empty_rows = random_layout(H, 10, 10, 0.5, seed=1)
    empty_rows[:, 3] = False  # a layout row (of every head) that sees nothing: 0, lse −inf
    empty_rows[1] = False     # a head that sees nothing
    return {
        # per-head lists; the global rows see every block: a class of their own
        "bigbird, per head, global rows": (300, 300, Pattern(layout=bigbird(300, 16, H), block_size=16)),
        # blocks of 4 layout rows, looked up per row; causal on indices with T_q < T_k drops later blocks
        "one layout for every head, causal, T_q < T_k, padding, segments": (
            229, 341, Pattern(layout=random_layout(1, 8, 11, 0.5, seed=2), block_size=32, causal=True,
                              key_padding_mask=padding(341), q_segments=ids(B, H, 229), k_segments=ids(B, H, 341, seed=4))),
        "per-head layout, T_q > T_k": (341, 229, Pattern(layout=random_layout(H, 11, 8, 0.5, seed=3), block_size=32)),
        # block size 1: 64 layout rows a query block, each key its own block
        "block 1": (70, 70, Pattern(layout=random_layout(H, 70, 70, 0.2, seed=4), block_size=1, causal=True)),
        "odd block, rows and heads without keys": (97, 97, Pattern(layout=empty_rows, block_size=10)),
        # blocks larger than 128 rows: 128-row query blocks, some straddling two layout rows
        "block 200": (450, 450, Pattern(layout=random_layout(H, 3, 3, 0.6, seed=5), block_size=200, causal=True)),
        "block 256": (300, 300, Pattern(layout=random_layout(1, 2, 2, 0.7, seed=6), block_size=256)),
        # Swin's form: one block holding every pair of a window
        "one block": (49, 49, Pattern(layout=torch.ones(1, 1, 1, dtype=torch.bool), block_size=49,
                                      q_segments=ids(B, 1, 49, seed=7), k_segments=ids(B, 1, 49, seed=7))),
    }


@pytest.mark.parametrize("case", list(cases()))
def test_layout_tiles_equal_softmax_under_the_dense_mask(case):
    check_against_dense_mask(FWD, *cases()[case], seed=3)


def pattern_with_terms(layout, block, T, heads, bias_heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(T, generator=g) for _ in range(B * heads)]).view(B, heads, T)
    segments = torch.randint(0, 3, (B, heads, T), generator=g)
    bias = torch.randn(bias_heads, T, T, generator=g, dtype=torch.float64)
    return Pattern(layout=layout, block_size=block, causal=True, positions=positions, q_segments=segments,
                   k_segments=segments, bias=bias)


@pytest.mark.parametrize("layout_heads,bias_heads", [(1, H), (H, H), (H, 1)],
                         ids=["shared layout", "per-head layout and bias", "per-head layout, one bias"])
def test_bias_and_positions_equal_the_cpu_kernel(layout_heads, bias_heads):
    """Score terms: Swin's bias (its gradient summed over the batch, and over the heads when one bias
    serves them all) and Reformer's positions (a token's own key fixed, causality on positions)."""
    T, block = 90, 16
    pattern = pattern_with_terms(random_layout(layout_heads, 6, 6, 0.6, seed=8), block, T, H, bias_heads)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    results = []
    for fwd, bwd in ((FWD, BWD), (torch.ops.linattn.restricted_softmax_fwd, torch.ops.linattn.restricted_softmax_bwd)):
        out, lse = fwd(q, k, v, 0.4, *pattern.op_args())
        grad_lse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        grads = bwd(torch.ones_like(out), grad_lse.masked_fill(torch.isinf(lse), 0), q, k, v, out, lse, 0.4,
                    *pattern.op_args())
        results.append((out, lse) + tuple(grads))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dbias"], *results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert results[0][5].abs().sum() > 0


def launches(op, *args):
    mode = LaunchCalls(op)
    with mode:
        op(*args)
    return mode.launches()


@pytest.mark.parametrize("per_head", [False, True], ids=["one layout", "per-head layout"])
def test_launches_do_not_grow_with_the_sequence(per_head):
    """The same number of computing calls at T = 1024 and 4096, forward and backward (BigBird, block
    64: two classes of pairs, one tile each). The host loop this replaced issued about 40 (forward) and
    58 (backward) per 128 rows."""
    counts = {}
    for T in (1024, 4096):
        pattern = Pattern(layout=bigbird(T, 64, 2 if per_head else 1), block_size=64)
        q, k, v = (torch.randn(1, 2, T, 8) for _ in range(3))
        out, lse = FWD(q, k, v, 0.25, *pattern.op_args())
        counts[T] = (launches(FWD, q, k, v, 0.25, *pattern.op_args()),
                     launches(BWD, torch.randn_like(out), None, q, k, v, out, lse, 0.25, *pattern.op_args()))
    assert counts[1024] == counts[4096], counts
    assert counts[4096][0] <= 85 and counts[4096][1] <= 125, counts


def test_calls_split_into_tiles_equal_the_cpu_kernel():
    """A batch large enough that each class is cut into several tiles (2^25 scores a tile)."""
    batch, heads, T, D, block = 32, 8, 2048, 4, 64
    check_split_call_equals_cpu_kernel(batch, heads, T, D, Pattern(layout=bigbird(T, block, heads), block_size=block,
                                                                   causal=True))
