"""The device-generic restricted softmax (csrc/restricted_softmax/generic*.cpp): how many ATen
operations one call issues, how many bytes they allocate, and its time on this machine's CPU.
"computing" counts the calls as bench_generic_passes does (views left out); "launches" also leaves
out the calls that return an input or a view of one (`to` a dtype it has, `flatten`), so it is the
number of kernels a GPU would run. CUDA tensors run this path by default (until the flash engine
is proven on hardware), and so do other devices.

Patterns at B=2 H=4 D=64 float32 (the generic path computes in float32 for every 16-bit input
too): causal sliding window 256, a symmetric window (128, 128) with dilation 2, Longformer
(256, 256) with 16 global tokens, a BigBird-style block layout (block 64: 1 band block each side,
2 global and 2 random blocks a row; one layout row per head) and Reformer's chunks (block 64: each
block sees itself and the one before; one layout for every head), at T = 1024 and 4096, forward and
backward.

    python -m benchmarks.bench_restricted_generic_passes

Writes results/restricted_generic_passes.json.
"""
import argparse
import statistics
import time
from collections import Counter

import torch

from benchmarks.bench_generic_passes import VIEWS, LaunchCalls
from benchmarks.common import machine_info, write_results
from linattn.ops.restricted import Pattern


def bigbird_layout(T, block, H, seed=0):
    n = T // block
    g = torch.Generator().manual_seed(seed)
    layout = torch.zeros(H, n, n, dtype=torch.bool)
    for i in range(n):
        layout[:, i, max(0, i - 1):i + 2] = True
        layout[:, i, :2] = True
        layout[:, :2, :] = True
        layout[:, i, torch.randint(0, n, (2,), generator=g)] = True
    return layout


def chunk_layout(T, block):
    i = torch.arange(T // block)
    d = i[:, None] - i[None, :]
    return ((d == 0) | (d == 1)).unsqueeze(0)


def patterns(B, T, H):
    global_mask = torch.zeros(B, T, dtype=torch.bool)
    global_mask[:, torch.linspace(0, T - 1, 16).long()] = True
    return {
        "window 256 causal": Pattern(window=(256, 0), causal=True),
        "window (128, 128) dilation 2": Pattern(window=(128, 128), dilation=2),
        "longformer (256, 256) + 16 global": Pattern(window=(256, 256), global_mask=global_mask),
        "bigbird layout, block 64": Pattern(layout=bigbird_layout(T, 64, H), block_size=64),
        "chunks (self + previous), block 64": Pattern(layout=chunk_layout(T, 64), block_size=64),
    }


def median_ms(run, repeats=3):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(T, B=2, H=4, D=64):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    io_bytes = 4 * q.numel() * q.element_size()
    fwd = torch.ops.linattn.restricted_softmax_fwd_generic.default
    bwd = torch.ops.linattn.restricted_softmax_bwd_generic.default
    rows = []
    for name, pattern in patterns(B, T, H).items():
        args = (q, k, v, D ** -0.5, *pattern.op_args())
        out, lse = fwd(*args)
        grad = torch.randn(out.shape, generator=g)
        bwd_args = (grad, None, q, k, v, out, lse, D ** -0.5, *pattern.op_args())
        for pass_name, op, op_args in (("forward", fwd, args), ("backward", bwd, bwd_args)):
            mode = LaunchCalls(op)
            with mode:
                op(*op_args)
            counts = Counter(mode.calls)
            rows.append({"pattern": name, "T": T, "pass": pass_name,
                         "computing": sum(n for call, n in counts.items() if call.removeprefix("view:") not in VIEWS),
                         "launches": mode.launches(),
                         "bytes_ratio": mode.allocated / io_bytes,
                         "cpu_ms": median_ms(lambda: op(*op_args)), "ops": dict(counts)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    lengths = parser.parse_args().lengths
    torch.manual_seed(0)
    rows = [row for T in lengths for row in measure(T)]
    print(f"{'pattern':<36} {'T':>5} {'pass':<9} {'computing':>9} {'launches':>8} {'bytes / qkvo':>12} "
          f"{'CPU ms':>8}")
    for row in rows:
        print(f"{row['pattern']:<36} {row['T']:>5} {row['pass']:<9} {row['computing']:>9} "
              f"{row['launches']:>8} {row['bytes_ratio']:>11.1f}x {row['cpu_ms']:>8.1f}")
    path, _ = write_results("results", "restricted_generic_passes", {"machine": machine_info(), "rows": rows})
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
