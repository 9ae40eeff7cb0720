"""Packed variable-length batches: linear_attention(..., cu_seqlens=) against the two ways to
do without it, a Python loop with one call per sequence, and padding every sequence to the
longest (key_padding_mask; causal padding needs none). Forward+backward, round-robin in one
run, medians; H=8, D=64, fp32; sequence lengths drawn uniformly from [lo, hi] with a fixed seed.

    python -m benchmarks.bench_varlen            # three batches: many short, mixed, few long
    python -m benchmarks.bench_varlen --quick

Writes results/varlen.json.
"""
import argparse

import torch

import linattn
from benchmarks.common import interleaved_medians, machine_info, write_results

H, D = 8, 64
BATCHES = [  # (sequences, shortest, longest)
    (512, 8, 64),     # small graphs
    (64, 64, 2048),   # packed documents
    (4, 2048, 8192),  # a few long sequences
]


def run(count, lo, hi, causal, reps):
    g = torch.Generator().manual_seed(count)
    lengths = torch.randint(lo, hi + 1, (count,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    total, longest = int(offsets[-1]), int(lengths.max())
    cu = offsets.to(torch.int32)
    q, k, v = (torch.randn(1, H, total, D, generator=g).requires_grad_() for _ in range(3))
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    # Padded layout: (N, H, longest, D), built once (its cost is not timed).
    padded = [torch.zeros(count, H, longest, D).requires_grad_() for _ in range(3)]
    with torch.no_grad():
        for n, (a, b) in enumerate(bounds):
            for src, dst in zip((q, k, v), padded):
                dst[n, :, : b - a] = src[0, :, a:b]
    padding = torch.arange(longest)[None, :] >= lengths[:, None]

    def packed():
        linattn.linear_attention(q, k, v, causal=causal, cu_seqlens=cu).sum().backward()

    sizes = lengths.tolist()

    def loop():
        # torch.split, not slicing: the backward of a slice materializes a full-size gradient per
        # sequence, which made the naive loop 100x slower at 512 sequences.
        pieces = zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2))
        outs = [linattn.linear_attention(qs, ks, vs, causal=causal) for qs, ks, vs in pieces]
        torch.cat(outs, 2).sum().backward()

    def pad():
        out = linattn.linear_attention(*padded, causal=causal, key_padding_mask=None if causal else padding)
        out.masked_fill(padding[:, None, :, None], 0).sum().backward()

    times = interleaved_medians({"cu_seqlens": packed, "loop": loop, "padded": pad}, reps)
    return {"sequences": count, "lengths": [lo, hi], "tokens": total, "padded_tokens": count * longest,
            "causal": causal, **{f"{name}_ms": t * 1e3 for name, t in times.items()},
            "vs_loop": times["loop"] / times["cu_seqlens"], "vs_padded": times["padded"] / times["cu_seqlens"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 3 if args.quick else 7
    batches = BATCHES[:2] if args.quick else BATCHES
    rows = []
    print(f"{'N':>4} {'lengths':>11} {'tokens':>7} {'padded':>7} {'causal':>6} {'cu_seqlens ms':>14} "
          f"{'loop ms':>9} {'padded ms':>10} {'vs loop':>8} {'vs padded':>10}")
    for count, lo, hi in batches:
        for causal in (False, True):
            row = run(count, lo, hi, causal, reps)
            rows.append(row)
            print(f"{count:>4} {f'{lo}-{hi}':>11} {row['tokens']:>7} {row['padded_tokens']:>7} {str(causal):>6} "
                  f"{row['cu_seqlens_ms']:>14.2f} {row['loop_ms']:>9.2f} {row['padded_ms']:>10.2f} "
                  f"{row['vs_loop']:>7.2f}x {row['vs_padded']:>9.2f}x")
    path, _ = write_results("results", "varlen", {"machine": machine_info(), "H": H, "D": D, "rows": rows})
    print(f"\nraw numbers: {path}")


if __name__ == "__main__":
    main()
