"""Benchmark of the restricted-softmax operators other than the sliding window: BigBird
block-sparse attention, Reformer LSH attention and additive (Bahdanau) attention, on the CPU
(fp32, B=1, H=8, D=64), forward and forward+backward, against
  - SDPA with the equivalent dense boolean mask (the same result, computed densely), while the
    T×T mask fits;
  - full SDPA (softmax over every key: what these methods replace);
  - for additive attention, the dense PyTorch formulation (the (T, T, D) tanh tensor).
Round-robin in one process per point, medians. LSH has no dense equivalent (its buckets depend on
the data), so it is compared with full SDPA only.

    python -m benchmarks.bench_sparse_methods            # BigBird/LSH T = 1024 ... 16384, additive T ≤ 1024
    python -m benchmarks.bench_sparse_methods --quick

Writes results/sparse_methods.json.
"""
import argparse

import torch
import torch.nn.functional as F

import linattn
from benchmarks.common import interleaved_medians, machine_info, write_results

B, H, D = 1, 8, 64
BLOCK = 64


def inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3)]


def timed(fns, reps, T):
    """({name: fwd s}, {name: fwd+bwd s}) for fns name -> fn(q, k, v), each on its own copy of
    the same inputs."""
    fwd, both = {}, {}
    for name, fn in fns.items():
        q, k, v = inputs(T)
        fwd[name] = (lambda fn=fn, q=q, k=k, v=v: _no_grad(fn, q, k, v))
        both[name] = (lambda fn=fn, q=q, k=k, v=v: fn(q, k, v).sum().backward())
    return interleaved_medians(fwd, reps), interleaved_medians(both, reps)


def _no_grad(fn, q, k, v):
    with torch.no_grad():
        fn(q, k, v)


def bigbird_point(T, reps, dense_max):
    layout = linattn.bigbird_layout(T, BLOCK, num_random=3, num_global=2, heads=H,
                                    generator=torch.Generator().manual_seed(0))
    fns = {"linattn": lambda q, k, v: linattn.block_sparse_attention(q, k, v, layout, BLOCK)}
    if T <= dense_max:
        mask = linattn.layout_mask(layout, BLOCK, T, T)  # (1, H, T, T)
        fns["sdpa dense mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fns["sdpa full"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    return fns, {"layout_density": float(layout.float().mean())}


def lsh_point(T, reps, dense_max):
    fns = {
        "linattn": lambda q, k, v: linattn.lsh_attention(q, v, n_hashes=4, bucket_size=BLOCK,
                                                         generator=torch.Generator().manual_seed(0)),
        "sdpa full": lambda q, k, v: F.scaled_dot_product_attention(q, q, v),
    }
    return fns, {"n_hashes": 4, "bucket_size": BLOCK}


def additive_point(T, reps, dense_max):
    w = torch.randn(H, D) * D**-0.5

    def dense(q, k, v):
        scores = torch.einsum("bhtsd,hd->bhts", torch.tanh(q[:, :, :, None] + k[:, :, None]), w)
        return torch.softmax(scores, -1) @ v

    fns = {"linattn": lambda q, k, v: linattn.additive_attention(q, k, v, w), "dense tanh": dense,
           "sdpa full": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    return fns, {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 3 if args.quick else 5
    points = [("bigbird", T) for T in ([1024, 4096] if args.quick else [1024, 4096, 16384])]
    points += [("lsh", T) for T in ([1024, 4096] if args.quick else [1024, 4096, 16384])]
    # Additive attention is O(T²·D) work whatever the implementation (a tanh per pair and
    # feature); the dense formulation also holds (T, T, D) tensors: 8.6 GB at T=2048.
    points += [("additive", T) for T in ([512] if args.quick else [512, 1024])]
    makers = {"bigbird": bigbird_point, "lsh": lsh_point, "additive": additive_point}
    rows = []
    print(f"{'method':>9} {'T':>6} {'impl':>16} {'fwd ms':>9} {'fwd+bwd ms':>11} {'linattn speed-up fwd / fwd+bwd':>31}")
    for method, T in points:
        fns, extra = makers[method](T, reps, dense_max=8192)
        fwd, both = timed(fns, reps, T)
        for name in fns:
            row = {"method": method, "T": T, "impl": name, "fwd_ms": fwd[name] * 1e3, "fwd_bwd_ms": both[name] * 1e3,
                   "linattn_speedup_fwd": fwd[name] / fwd["linattn"],
                   "linattn_speedup_fwd_bwd": both[name] / both["linattn"], **extra}
            rows.append(row)
            ratio = "" if name == "linattn" else f"{row['linattn_speedup_fwd']:.2f}x / {row['linattn_speedup_fwd_bwd']:.2f}x"
            print(f"{method:>9} {T:>6} {name:>16} {row['fwd_ms']:>9.2f} {row['fwd_bwd_ms']:>11.2f} {ratio:>31}")
    path, _ = write_results("results", "sparse_methods", {"machine": machine_info(), "B": B, "H": H, "D": D,
                                                          "rows": rows})
    print(f"\nraw numbers: {path}  (speed-up > 1: linattn faster than that implementation)")


if __name__ == "__main__":
    main()
