"""The device-generic linear attention (csrc/linear_attention/generic.cpp): how many ATen operations
one call issues and how many bytes they allocate. On a GPU each operation that computes is a
kernel launch and each allocation a pass over memory; CUDA tensors run this path until the fused
kernels are proven on hardware, so these counts are its cost there. Counted with torch.profiler on
CPU tensors (the same ATen calls a CUDA tensor makes), B=2 H=4 T=1024 D=64 bf16, elu+1 features,
normalized, forward (linear_attn_fwd_generic) and backward (linear_attn_bwd_generic):

  - operations: the operator's direct ATen children; "computing" leaves out views and empty
    allocations (no kernel);
  - bytes: what those children allocate, as a multiple of the q, k, v and output bytes.

Targets (issue 25, item 6): causal ≤ 20 operations and ≤ 4x the bytes, non-causal ≤ 10 and ≤ 2x.

    python -m benchmarks.bench_generic_passes

Writes results/generic_passes.json.
"""
import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import linattn  # noqa: F401  (registers the operators)
from benchmarks.common import machine_info, write_results

VIEWS = {"aten::view", "aten::reshape", "aten::transpose", "aten::narrow", "aten::select", "aten::unsqueeze",
         "aten::expand", "aten::as_strided", "aten::slice", "aten::empty", "aten::empty_like", "aten::t",
         "aten::alias", "aten::detach"}
ELU = 1
TARGETS = {True: (20, 4.0), False: (10, 2.0)}


def children(fn):
    """The ATen operations `fn` issues directly below the linattn operator, and their allocations."""
    fn()  # warm: the first call may allocate caches
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e for e in prof.events()
            if e.name.startswith("aten::") and e.cpu_parent is not None and e.cpu_parent.name.startswith("linattn::")]


def measure(causal, B=2, H=4, T=1024, D=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3))
    io_bytes = 4 * q.numel() * q.element_size()
    fwd = torch.ops.linattn.linear_attn_fwd_generic
    args = (q, k, v, None, None, ELU, causal, True, 1e-6, None, None)
    out, state, normalizer = fwd(*args)
    grad = torch.randn_like(out)
    bwd = torch.ops.linattn.linear_attn_bwd_generic
    rows = []
    for name, call in (("forward", lambda: fwd(*args)),
                       ("backward", lambda: bwd(grad, None, q, k, v, out, normalizer, None, None, ELU, causal, True,
                                                state, None, None))):
        events = children(call)
        counts = Counter(e.name for e in events)
        computing = sum(n for op, n in counts.items() if op not in VIEWS)
        allocated = sum(max(e.cpu_memory_usage, 0) for e in events)
        rows.append({"pass": name, "causal": causal, "operations": len(events), "computing": computing,
                     "bytes_ratio": allocated / io_bytes, "ops": dict(counts)})
    return rows


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = measure(True) + measure(False)
    print(f"{'pass':<9} {'causal':<7} {'operations':>10} {'computing':>9} {'bytes / qkvo':>12}   target (ops, bytes)")
    for row in rows:
        target = TARGETS[row["causal"]] if row["pass"] == "forward" else ("-", "-")
        print(f"{row['pass']:<9} {str(row['causal']):<7} {row['operations']:>10} {row['computing']:>9} "
              f"{row['bytes_ratio']:>11.1f}x   {target[0]}, {target[1]}x")
    path, _ = write_results("results", "generic_passes", {"machine": machine_info(), "rows": rows})
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
