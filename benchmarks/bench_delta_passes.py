"""The delta rule's backward on a GPU, counted without one: how many ATen operations (kernel
launches on a GPU) one backward issues on the device-generic path (delta_rule_bwd_generic, what
CUDA tensors run by default) and on the tensor-core path (delta_rule_bwd_fused, the fused
backend: its two walks are one kernel each, everything else is batched over the chunks), as the
sequence grows. Counted with bench_generic_passes' dispatch mode (the operator's direct ATen
calls; "computing" leaves out views and empty allocations), the fused path through its CPU
emulation, whose host side is the CUDA one's. B=1 H=2 D=64 bf16, Gated DeltaNet, causal; one
sequence of T rows, and T = 4096 as 16 packed documents of 256 (cu_seqlens).

    python -m benchmarks.bench_delta_passes

Writes results/delta_passes.json.
"""
import argparse

import torch

import linattn  # noqa: F401  (registers the operators)
from benchmarks.bench_generic_passes import VIEWS, count
from benchmarks.common import machine_info, write_results

LENGTHS = (256, 1024, 4096)
# The fused backward's kernels (the forward's keeping instance and the backward walk), which the
# emulation runs outside ATen.
WALK_KERNELS = 2


def measure(T, documents=1, B=1, H=2, D=64, dtype=torch.bfloat16):
    """One backward over T rows: one sequence, or `documents` packed sequences of T / documents."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3))
    beta = torch.rand(B, H, T, generator=g).to(dtype)
    gate = (-0.1 * torch.rand(B, H, T, generator=g)).to(dtype)
    grad = torch.randn(B, H, T, D, generator=g).to(dtype)
    cu = torch.arange(0, T + 1, T // documents, dtype=torch.int32) if documents > 1 else None
    args = (grad, None, q, k, v, beta, gate, None, cu, True, D ** -0.5, True)
    rows = []
    for path, op, key, extra in (
            ("generic", torch.ops.linattn.delta_rule_bwd_generic.default,
             torch._C.DispatchKey.CompositeExplicitAutograd, 0),
            ("fused", torch.ops.linattn.delta_rule_bwd_fused.default, torch._C.DispatchKey.CPU, WALK_KERNELS)):
        counts, _ = count(op, *args, key=key)
        computing = sum(n for call, n in counts.items() if call not in VIEWS) + extra
        rows.append({"T": T, "documents": documents, "path": path, "operations": sum(counts.values()) + extra,
                     "computing": computing, "ops": dict(counts)})
    return rows


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = [row for T in LENGTHS for row in measure(T)] + measure(4096, documents=16)
    print(f"{'T':>6} {'documents':>9} {'path':<8} {'operations':>10} {'computing':>9}")
    for row in rows:
        print(f"{row['T']:>6} {row['documents']:>9} {row['path']:<8} {row['operations']:>10} {row['computing']:>9}")
    path, _ = write_results("results", "delta_passes", {"machine": machine_info(), "rows": rows})
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
