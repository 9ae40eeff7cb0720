"""The delta rule on the CPU: linattn's chunkwise kernel (DeltaNet, Gated DeltaNet and KDA's gates
per key channel) against the per-token recurrence in PyTorch, flash-linear-attention's chunkwise
PyTorch references (delta_rule_chunkwise, naive_chunk_gated_delta_rule, naive_chunk_kda; skipped
when fla-core is absent), and
linattn's own causal linear attention at the same size. Forward (no_grad) and forward+backward,
round-robin in one run, medians; B=1, H=8, D=64, fp32. Peak memory of a forward+backward is
measured in a fresh process per length (memory linear in T).

    python -m benchmarks.bench_delta_rule            # T = 1024, 4096, 16384
    python -m benchmarks.bench_delta_rule --quick    # T = 1024, 4096, fewer repetitions

Writes results/delta_rule.json. q and k are L2-normalised once outside the timings and every
implementation gets them as they are (normalize_qk=False): the same computation everywhere.
"""
import argparse
import json
import sys

import torch

import linattn
from benchmarks.common import (
    current_rss_bytes, interleaved_medians, machine_info, peak_rss_bytes, reset_peak_rss, run_child, write_results,
)

B, H, D = 1, 8, 64
RECURRENCE_MAX_T = 4096  # the per-token loop takes seconds beyond


def inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    q, k = linattn.delta_rule.l2_normalize(q), linattn.delta_rule.l2_normalize(k)
    beta = torch.rand(B, H, T, generator=g)
    gate = -torch.rand(B, H, T, generator=g) * 0.1
    channel_gate = -torch.rand(B, H, T, D, generator=g) * 0.1  # KDA: one per key channel
    return q, k, v, beta, gate, channel_gate


def recurrence(q, k, v, beta, gate=None):
    """The per-token recurrence in PyTorch (float32, autograd through the loop)."""
    S = q.new_zeros(B, H, D, D)
    outs = []
    for t in range(q.shape[2]):
        if gate is not None:
            S = S * gate[:, :, t].exp()[..., None, None]
        kt = k[:, :, t]
        correction = beta[:, :, t, None] * (v[:, :, t] - (kt.unsqueeze(-1) * S).sum(-2))
        S = S + kt.unsqueeze(-1) * correction.unsqueeze(-2)
        outs.append((q[:, :, t].unsqueeze(-1) * S).sum(-2) * D ** -0.5)
    return torch.stack(outs, 2)


# The gate an implementation takes (its function's last argument), and linattn's row of that kind.
OURS = {None: "linattn DeltaNet", "token": "linattn Gated DeltaNet", "channel": "linattn KDA"}


def implementations(T):
    """name -> (function of (q, k, v, beta, gate) returning out, the gate it takes: None, "token" (B, H, T)
    or "channel" (B, H, T, D))."""
    ours = lambda q, k, v, b, g: linattn.delta_rule_attention(q, k, v, b, gate=g, normalize_qk=False)  # noqa: E731
    impls = {
        "linattn DeltaNet": (lambda q, k, v, b, g: linattn.delta_rule_attention(q, k, v, b, normalize_qk=False), None),
        "linattn Gated DeltaNet": (ours, "token"),
        "linattn KDA": (ours, "channel"),
        "linattn linear attention": (lambda q, k, v, b, g: linattn.linear_attention(q, k, v, causal=True), None),
    }
    try:
        from fla.ops.delta_rule.naive import delta_rule_chunkwise
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
        from fla.ops.kda.naive import naive_chunk_kda
    except ImportError:
        print("fla-core not installed: flash-linear-attention's references skipped", file=sys.stderr)
    else:
        impls["fla chunkwise reference"] = (lambda q, k, v, b, g: delta_rule_chunkwise(q, k, v, b)[0], None)
        bthd = lambda x: x.transpose(1, 2)  # noqa: E731  (its gated references take (B, T, H, ·))
        impls["fla gated chunkwise reference"] = (
            lambda q, k, v, b, g: bthd(naive_chunk_gated_delta_rule(bthd(q), bthd(k), bthd(v), bthd(g), bthd(b))[0]),
            "token")
        impls["fla KDA chunkwise reference"] = (
            lambda q, k, v, b, g: bthd(naive_chunk_kda(bthd(q), bthd(k), bthd(v), bthd(g), bthd(b))[0]), "channel")
    if T <= RECURRENCE_MAX_T:
        impls["per-token recurrence"] = (lambda q, k, v, b, g: recurrence(q, k, v, b), None)
    return impls


def run(T, reps):
    q, k, v, beta, gate, channel_gate = inputs(T)
    gates = {None: None, "token": gate, "channel": channel_gate}
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    gate_leaves = {kind: None if g is None else g.clone().requires_grad_() for kind, g in gates.items()}
    impls = implementations(T)

    def forward(fn, kind):
        def call():
            with torch.no_grad():
                fn(q, k, v, beta, gates[kind])
        return call

    def forward_backward(fn, kind):
        def call():
            for t in [*leaves, gate_leaves[kind]]:
                if t is not None:
                    t.grad = None
            fn(*leaves, gate_leaves[kind]).backward(grad)
        return call

    slow = {name for name in impls if name.startswith(("fla", "per-token"))}
    fast = {name: impl for name, impl in impls.items() if name not in slow}
    fwd = interleaved_medians({n: forward(*impl) for n, impl in fast.items()}, reps)
    both = interleaved_medians({n: forward_backward(*impl) for n, impl in fast.items()}, reps)
    # The references take 10-100x longer: fewer repetitions, run after the fast ones.
    fwd.update(interleaved_medians({n: forward(*impls[n]) for n in slow}, max(1, reps // 3)))
    both.update(interleaved_medians({n: forward_backward(*impls[n]) for n in slow}, max(1, reps // 3)))
    rows = []
    for name, (_, kind) in impls.items():
        ours = OURS[kind]
        rows.append({"T": T, "implementation": name, "gate": kind, "fwd_ms": fwd[name] * 1e3,
                     "fwd_bwd_ms": both[name] * 1e3, "linattn_speedup_fwd": fwd[name] / fwd[ours],
                     "linattn_speedup_fwd_bwd": both[name] / both[ours]})
    return rows


def decoding_step_rows(reps):
    """One Gated DeltaNet decoding step under no_grad: linattn.delta_rule_step (the fused CPU
    kernel) against the step's formula in ATen operations (what the step ran before it)."""
    def formula(q, k, v, beta, gate, S):
        S = S * gate.exp()[..., None, None]
        predicted = torch.matmul(k.unsqueeze(-2), S).squeeze(-2)
        S_new = S + k.unsqueeze(-1) * (beta.unsqueeze(-1) * (v - predicted)).unsqueeze(-2)
        return torch.matmul(q.unsqueeze(-2), S_new).squeeze(-2), S_new

    rows = []
    for b, h, d in ((1, H, D), (8, 16, 128)):
        g = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(b, h, d, generator=g) for _ in range(3))
        beta, gate, S = torch.rand(b, h, generator=g), -torch.rand(b, h, generator=g), torch.randn(b, h, d, d, generator=g)
        with torch.no_grad():
            t = interleaved_medians({
                "fused": lambda: linattn.delta_rule_step(q, k, v, beta, S, gate=gate, scale=1.0, normalize_qk=False),
                "formula": lambda: formula(q, k, v, beta, gate, S)}, reps * 20, warmup=10)
        rows.append({"B": b, "H": h, "D": d, "fused_us": t["fused"] * 1e6, "formula_us": t["formula"] * 1e6,
                     "speedup": t["formula"] / t["fused"]})
    return rows


def memory_child(T):
    """(In a fresh process) peak RSS growth of one DeltaNet forward+backward at length T."""
    q, k, v, beta, _, _ = inputs(T)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    grad = torch.randn(B, H, T, D)
    before = current_rss_bytes()
    reset_peak_rss()
    linattn.delta_rule_attention(*leaves, normalize_qk=False).backward(grad)
    inputs_bytes = sum(t.numel() * 4 for t in (q, k, v, beta, grad))
    print(json.dumps({"T": T, "peak_growth_mb": (peak_rss_bytes() - before) / 2**20, "inputs_mb": inputs_bytes / 2**20}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    lengths, reps = ([1024, 4096], 5) if args.quick else ([1024, 4096, 16384], 9)
    rows, memory = [], []
    print(f"{'T':>6} {'implementation':>30} {'fwd ms':>9} {'fwd+bwd ms':>11} {'linattn is x faster (fwd, fwd+bwd)':>36}")
    for T in lengths:
        for row in run(T, reps):
            rows.append(row)
            print(f"{T:>6} {row['implementation']:>30} {row['fwd_ms']:>9.1f} {row['fwd_bwd_ms']:>11.1f} "
                  f"{row['linattn_speedup_fwd']:>17.2f}x {row['linattn_speedup_fwd_bwd']:>9.2f}x")
        memory.append(run_child(["benchmarks.bench_delta_rule", "--memory-child", str(T)]))
    steps = decoding_step_rows(reps)
    print("\none Gated DeltaNet decoding step (no_grad): the fused CPU step against its ATen formula")
    for r in steps:
        print(f"  B={r['B']} H={r['H']} D={r['D']}: {r['fused_us']:.1f} us vs {r['formula_us']:.1f} us "
              f"({r['speedup']:.2f}x)")
    print("\npeak memory of a DeltaNet forward+backward (growth of the process's RSS):")
    for m in memory:
        print(f"  T={m['T']:>6}: {m['peak_growth_mb']:7.1f} MiB (inputs and output gradient: {m['inputs_mb']:.1f} MiB)")
    path, _ = write_results("results", "delta_rule", {"machine": machine_info(), "B": B, "H": H, "D": D, "steps": steps,
                                                      "rows": rows, "memory": memory})
    print(f"\nraw numbers: {path}")


if __name__ == "__main__":
    main()
