"""Hugging Face transformers models through linattn.hf: a whole model's forward (prefill, no
grad) against the same model on sdpa, time (round-robin medians, one run) and peak memory (each
in a process of its own). Small Mistral-style decoder (hidden 256, 4 layers, 8 query / 2 key
heads, fp32, batch 1): with a sliding window of 256, linattn_local against sdpa (transformers
gives sdpa a dense (T, T) window mask); without a window, linattn_linear against sdpa's causal
attention. Needs transformers (an optional extra).

    python -m benchmarks.bench_hf            # T = 2048, 8192, 16384
    python -m benchmarks.bench_hf --quick    # T = 2048, 4096

Writes results/hf.json.
"""
import argparse
import json

import torch

from benchmarks.common import (
    interleaved_medians, machine_info, peak_rss_bytes, reset_peak_rss, run_child, write_results,
)

WINDOW = 256
COMPARISONS = {"window": ("sdpa", "linattn_local"), "full": ("sdpa", "linattn_linear")}


def build(kind, implementation):
    import transformers

    import linattn

    linattn.hf.register()
    config = transformers.MistralConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=65536, sliding_window=WINDOW if kind == "window" else None,
        attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).eval()


def forward(model, T):
    ids = torch.randint(0, 1000, (1, T), generator=torch.Generator().manual_seed(T))
    mask = torch.ones(1, T, dtype=torch.long)

    def fn():
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return fn


def peak_memory(kind, implementation, T):
    """In a fresh process: the peak RSS of one forward above what the model and inputs hold."""
    fn = forward(build(kind, implementation), T)
    reset_peak_rss()
    before = peak_rss_bytes()
    fn()
    return peak_rss_bytes() - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "IMPLEMENTATION", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, implementation, T = args.child
        print(json.dumps({"peak_bytes": peak_memory(kind, implementation, int(T))}))
        return
    lengths, reps = ([2048, 4096], 3) if args.quick else ([2048, 8192, 16384], 3)
    rows = []
    for kind, (baseline, ours) in COMPARISONS.items():
        models = {name: build(kind, name) for name in (baseline, ours)}
        for T in lengths:
            times = interleaved_medians({name: forward(model, T) for name, model in models.items()}, reps)
            peaks = {name: run_child(["benchmarks.bench_hf", "--child", kind, name, str(T)])["peak_bytes"]
                     for name in models}
            row = {"model": kind, "T": T, "baseline": baseline, "ours": ours,
                   "baseline_ms": times[baseline] * 1e3, "ours_ms": times[ours] * 1e3,
                   "speedup": times[baseline] / times[ours],
                   "baseline_peak_mib": peaks[baseline] / 2**20, "ours_peak_mib": peaks[ours] / 2**20}
            rows.append(row)
            print(f"{kind:6s} T={T:6d}  {baseline} {row['baseline_ms']:9.1f} ms {row['baseline_peak_mib']:8.1f} MiB"
                  f"  {ours} {row['ours_ms']:9.1f} ms {row['ours_peak_mib']:8.1f} MiB  speedup {row['speedup']:.2f}x",
                  flush=True)
    json_path, _ = write_results("results", "hf", {"machine": machine_info(), "window": WINDOW, "rows": rows})
    print("wrote", json_path)


if __name__ == "__main__":
    main()
