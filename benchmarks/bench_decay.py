"""Decay and gates: the cost of a fading state over plain causal linear attention, forward and
forward+backward, on the CPU kernel. Per-head decay γ (RetNet / Lightning), per-token log-gates
(Mamba-2 / simple GLA) and both, and per-channel log-gates (GLA, (B, H, T, D): the device-generic
formulation), against the same call without them; round-robin in one run, medians. B=1, H=8, D=64,
fp32; the gates and decay require gradients (as when they are learned). With flash-linear-attention
installed, its CPU path for GLA (naive_recurrent_gla, a loop over tokens: its chunk kernels are
Triton) is timed on the same per-channel call, forward only.

    python -m benchmarks.bench_decay            # T = 4096, 16384
    python -m benchmarks.bench_decay --quick    # T = 4096, fewer repetitions

Writes results/decay.json.
"""
import argparse

import torch

import linattn
from benchmarks.common import interleaved_medians, machine_info, write_results

B, H, D = 1, 8, 64


def run(T, reps):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
    decay = (1 - torch.rand(H, generator=g) * 0.1).requires_grad_()
    gate = (-torch.rand(B, H, T, generator=g) * 0.1).requires_grad_()
    channel_gate = (-torch.rand(B, H, T, D, generator=g) * 0.1).requires_grad_()
    variants = {"plain": {}, "decay": {"decay": decay}, "gate": {"gate": gate},
                "decay+gate": {"decay": decay, "gate": gate}, "channel gate": {"gate": channel_gate}}
    grad = torch.randn(B, H, T, D, generator=g)

    def forward(kwargs):
        def fn():
            with torch.no_grad():
                linattn.linear_attention(q, k, v, causal=True, **kwargs)
        return fn

    def forward_backward(kwargs):
        def fn():
            out = linattn.linear_attention(q, k, v, causal=True, **kwargs)
            out.backward(grad)
        return fn

    forwards = {name: forward(kw) for name, kw in variants.items()}
    try:
        from fla.ops.gla.naive import naive_recurrent_gla
    except ImportError:
        naive_recurrent_gla = None
    if naive_recurrent_gla is not None:
        heads = [t.detach().transpose(1, 2) for t in (q, k, v, channel_gate)]  # its (B, T, H, D) layout

        def fla_naive():
            with torch.no_grad():
                naive_recurrent_gla(*heads)
        forwards["fla naive (channel)"] = fla_naive
    fwd = interleaved_medians(forwards, reps)
    both = interleaved_medians({name: forward_backward(kw) for name, kw in variants.items()}, reps)
    rows = [{"T": T, "variant": name, "fwd_ms": fwd[name] * 1e3, "fwd_bwd_ms": both[name] * 1e3,
             "fwd_ratio": fwd[name] / fwd["plain"], "fwd_bwd_ratio": both[name] / both["plain"]} for name in variants]
    if "fla naive (channel)" in fwd:
        rows.append({"T": T, "variant": "fla naive (channel)", "fwd_ms": fwd["fla naive (channel)"] * 1e3,
                     "fwd_bwd_ms": float("nan"), "fwd_ratio": fwd["fla naive (channel)"] / fwd["plain"],
                     "fwd_bwd_ratio": float("nan")})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    lengths, reps = ([4096], 5) if args.quick else ([4096, 16384], 9)
    rows = []
    print(f"{'T':>6} {'variant':>20} {'fwd ms':>8} {'vs plain':>9} {'fwd+bwd ms':>11} {'vs plain':>9}")
    for T in lengths:
        for row in run(T, reps):
            rows.append(row)
            print(f"{T:>6} {row['variant']:>20} {row['fwd_ms']:>8.2f} {row['fwd_ratio']:>8.2f}x "
                  f"{row['fwd_bwd_ms']:>11.2f} {row['fwd_bwd_ratio']:>8.2f}x")
    path, _ = write_results("results", "decay", {"machine": machine_info(), "B": B, "H": H, "D": D, "rows": rows})
    print(f"\nraw numbers: {path}")


if __name__ == "__main__":
    main()
