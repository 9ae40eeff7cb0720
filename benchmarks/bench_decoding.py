"""Decoding benchmark: the cost of generating one token at a given context length, for causal
linear attention (a constant-size state) against softmax attention with a key/value cache.

Two levels, each timed round-robin in one run and quoted as medians:
  - attention alone: linattn.linear_attention_step on the state against
    torch.nn.functional.scaled_dot_product_attention over a preallocated KV cache (the new
    token's key and value written in place first);
  - the whole layer: linattn.nn.MultiheadAttention(method="linear") against
    method="softmax" (in-projection, attention, out-projection), both through
    linattn.nn.DecodingCache.
One layer of E = 1024 with 16 heads of 64 (a GPT-2-medium layer), batch 1, fp32. The caches are
filled with random keys/values/states of the given context length (a step's cost does not depend
on their values; prefilling 64K tokens of softmax attention would take minutes). Cache memory is
the bytes the layer holds at that context.

    python -m benchmarks.bench_decoding            # contexts 1K ... 64K
    python -m benchmarks.bench_decoding --quick    # 1K ... 16K, fewer repetitions

Writes results/decoding.json and results/decoding.png.
"""
import argparse

import torch

import linattn
from benchmarks.common import interleaved_medians, machine_info, write_results

B, E, HEADS = 1, 1024, 16
D = E // HEADS


def attention_alone(context, reps):
    """(linear step seconds, SDPA-with-KV-cache seconds, state bytes, KV bytes)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, HEADS, D, generator=g) for _ in range(3))
    state = (torch.rand(B, HEADS, D, D, generator=g), torch.rand(B, HEADS, D, generator=g) + 1)
    room = context + reps + 8
    keys, values = (torch.randn(B, HEADS, room, D, generator=g) for _ in range(2))
    position = [context]

    def linear():
        linattn.linear_attention_step(q, k, v, state)

    def softmax():
        p = position[0]
        keys[:, :, p], values[:, :, p] = k, v
        torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys[:, :, :p + 1], values[:, :, :p + 1])
        position[0] = p + 1 if p + 1 < room else context

    with torch.inference_mode():
        times = interleaved_medians({"linear": linear, "softmax": softmax}, reps, warmup=2)
    state_bytes = sum(t.numel() * t.element_size() for t in state)
    kv_bytes = 2 * B * HEADS * context * D * 4
    return times["linear"], times["softmax"], state_bytes, kv_bytes


def filled_cache(module, context, room):
    """A DecodingCache holding `context` random tokens for `module` (entry layouts: decoding.py)."""
    cache = linattn.nn.DecodingCache()
    g = torch.Generator().manual_seed(1)
    if module.method == "softmax":
        k, v = (torch.randn(B, HEADS, room, D, generator=g) for _ in range(2))
        entry = {"k": k, "v": v, "used": context}
    else:
        entry = {"state": (torch.rand(B, HEADS, D, D, generator=g), torch.rand(B, HEADS, D, generator=g) + 1)}
    entry.update(length=context, batch=B)
    cache.set_layer(module, entry)
    return cache


def whole_layer(context, reps):
    """(linear layer seconds, softmax layer seconds, linear cache bytes, softmax cache bytes used)."""
    torch.manual_seed(0)
    modules = {m: linattn.nn.MultiheadAttention(E, HEADS, batch_first=True, method=m).eval()
               for m in ("linear", "softmax")}
    room = context + reps + 8
    caches = {m: filled_cache(module, context, room) for m, module in modules.items()}
    x = torch.randn(B, 1, E)

    def step(method):
        module, cache = modules[method], caches[method]

        def run():
            if cache.seen_tokens(module) >= room - 1:  # keep within the reserved room
                caches[method] = filled_cache(module, context, room)
            module(x, x, x, need_weights=False, cache=caches[method])
        return run

    with torch.inference_mode():
        times = interleaved_medians({m: step(m) for m in modules}, reps, warmup=2)
    return (times["linear"], times["softmax"], caches["linear"].memory_bytes(),
            2 * B * HEADS * context * D * 4)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r["context"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(contexts, [r["layer_linear_ms"] for r in rows], "o-", label="layer, linear (state)")
    left.plot(contexts, [r["layer_softmax_ms"] for r in rows], "o-", label="layer, softmax (KV cache)")
    left.plot(contexts, [r["attn_linear_ms"] for r in rows], "s--", label="attention, linear step")
    left.plot(contexts, [r["attn_softmax_ms"] for r in rows], "s--", label="attention, SDPA + KV cache")
    left.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per token (median)",
             title=f"one decoding step, E={E}, {HEADS} heads, batch {B}")
    right.plot(contexts, [r["cache_linear_mib"] for r in rows], "o-", label="linear: state")
    right.plot(contexts, [r["cache_softmax_mib"] for r in rows], "o-", label="softmax: KV cache")
    right.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="MiB per layer",
              title="decoding cache memory")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    return fig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts up to 16K, fewer repetitions")
    args = parser.parse_args()
    contexts = [1024 * 2**i for i in range(5 if args.quick else 7)]
    reps = 15 if args.quick else 40
    rows = []
    header = (f"{'context':>8} {'attn linear ms':>15} {'attn SDPA+KV ms':>16} {'speed-up':>9} "
              f"{'layer linear ms':>16} {'layer softmax ms':>17} {'speed-up':>9} {'state MiB':>10} {'KV MiB':>8}")
    print(header)
    print("-" * len(header))
    for context in contexts:
        attn_lin, attn_soft, _, _ = attention_alone(context, reps)
        layer_lin, layer_soft, state_bytes, kv_bytes = whole_layer(context, reps)
        row = {
            "context": context, "attn_linear_ms": attn_lin * 1e3, "attn_softmax_ms": attn_soft * 1e3,
            "attn_speedup": attn_soft / attn_lin, "layer_linear_ms": layer_lin * 1e3,
            "layer_softmax_ms": layer_soft * 1e3, "layer_speedup": layer_soft / layer_lin,
            "cache_linear_mib": state_bytes / 2**20, "cache_softmax_mib": kv_bytes / 2**20,
        }
        rows.append(row)
        print(f"{context:>8} {row['attn_linear_ms']:>15.4f} {row['attn_softmax_ms']:>16.4f} {row['attn_speedup']:>8.1f}x "
              f"{row['layer_linear_ms']:>16.3f} {row['layer_softmax_ms']:>17.3f} {row['layer_speedup']:>8.1f}x "
              f"{row['cache_linear_mib']:>10.3f} {row['cache_softmax_mib']:>8.1f}")
    payload = {"machine": machine_info(), "B": B, "E": E, "heads": HEADS, "rows": rows}
    json_path, png_path = write_results("results", "decoding", payload, plot(rows))
    print(f"\nraw numbers: {json_path}\nplot: {png_path}")


if __name__ == "__main__":
    main()
