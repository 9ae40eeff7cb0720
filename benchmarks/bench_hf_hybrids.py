"""Pretrained hybrids' own delta-rule layers in transformers: the kernel functions their modeling
modules call (Qwen3-Next's Gated DeltaNet, `torch_chunk_gated_delta_rule`; Kimi Linear's KDA,
`chunk_kimi_delta_attention`) as transformers runs them where flash-linear-attention does not
(its PyTorch path: always on CPUs) against the same call routed to linattn by
linattn.hf.use_fla_compat (linattn.fla_compat on linattn's kernels). Qwen3-Next's shape (16 key
heads of 128 serving 32 value heads; here B=1 with 8 and 16), fp32, forward and forward+backward,
round-robin medians in one run, and the largest difference of the outputs. Needs transformers
with these models (an optional extra).

    python -m benchmarks.bench_hf_hybrids            # T = 1024, 4096
    python -m benchmarks.bench_hf_hybrids --quick    # T = 1024

Writes results/hf_hybrids.json.
"""
import argparse

import torch

from benchmarks.common import interleaved_medians, machine_info, write_results

H, HV, D = 8, 16, 128


def functions():
    """(layer, transformers' function, its linattn replacement, per-channel gate)."""
    from transformers.models.kimi_linear import modeling_kimi_linear
    from transformers.models.qwen3_next import modeling_qwen3_next

    from linattn.hf.delta_rule_layers import REPLACEMENTS

    return [("Qwen3-Next Gated DeltaNet", modeling_qwen3_next.torch_chunk_gated_delta_rule,
             REPLACEMENTS["torch_chunk_gated_delta_rule"], False),
            ("Kimi Linear KDA", modeling_kimi_linear.chunk_kimi_delta_attention,
             REPLACEMENTS["chunk_kimi_delta_attention"], True)]


def inputs(T, per_channel, grad):
    g = torch.Generator().manual_seed(T)
    heads = H if not per_channel else HV  # (Kimi Linear's layers have as many key heads as value heads)
    q, k = (torch.randn(1, T, heads, D, generator=g) for _ in range(2))
    v = torch.randn(1, T, HV, D, generator=g)
    gate = -0.05 * torch.rand(1, T, HV, *((D,) if per_channel else ()), generator=g)
    beta = torch.rand(1, T, HV, generator=g)
    return [x.requires_grad_(grad) for x in (q, k, v, gate, beta)]


def call(fn, args):
    q, k, v, gate, beta = args
    return fn(q, k, v, g=gate, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 1024 only")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for layer, theirs, ours, per_channel in functions():
        for T in (1024,) if args.quick else (1024, 4096):
            x = inputs(T, per_channel, grad=False)
            with torch.no_grad():
                difference = (call(theirs, x)[0] - call(ours, x)[0]).abs().max().item()
                forward = interleaved_medians({"transformers": lambda: call(theirs, x),
                                               "linattn": lambda: call(ours, x)}, args.reps)
            xg = inputs(T, per_channel, grad=True)

            def training(fn):
                return lambda: torch.autograd.grad(call(fn, xg)[0].sum(), xg)

            both = interleaved_medians({"transformers": training(theirs), "linattn": training(ours)}, args.reps)
            row = {"layer": layer, "T": T, "fwd_ms": {n: 1e3 * t for n, t in forward.items()},
                   "fwd_bwd_ms": {n: 1e3 * t for n, t in both.items()}, "max_abs_difference": difference}
            rows.append(row)
            fwd = row["fwd_ms"]
            print(f"{layer:26s} T={T:5d}  forward {fwd['transformers']:8.0f} / {fwd['linattn']:6.0f} ms"
                  f" ({forward['transformers'] / forward['linattn']:5.1f}x)  forward+backward "
                  f"{row['fwd_bwd_ms']['transformers']:8.0f} / {row['fwd_bwd_ms']['linattn']:6.0f} ms"
                  f" ({both['transformers'] / both['linattn']:5.1f}x)  max |difference| {difference:.1e}", flush=True)
    path, _ = write_results("results", "hf_hybrids", {"machine": machine_info(), "H": H, "HV": HV, "D": D,
                                                       "rows": rows})
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
