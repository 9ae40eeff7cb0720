"""Benchmark of linattn.sliding_window_attention on the CPU (fp32, B=1, H=8, D=64) against
SDPA with the equivalent dense band mask (while it fits), FlexAttention with the equivalent
block mask (compiled forward only: its compiled CPU backward is not supported), and
local-attention (lucidrains, exact window) when installed. Causal windows of w keys before
each query. All implementations of a point run round-robin in one process; medians; GFLOP/s
counts the work actually needed, 4·T·(w+1)·D per head (causal), next to the machine's fp32
GEMM rate measured in the same run. Peak memory of one linattn forward+backward is measured in
a fresh process (peak RSS above baseline) for the largest T.

    python -m benchmarks.bench_window_attention            # T up to 65536, w 128/256/512 (~15 min)
    python -m benchmarks.bench_window_attention --quick    # T 1024/4096, w 256 (~1 min)
    python -m benchmarks.bench_window_attention --quick --softcap 50   # Gemma-2's logit soft-capping:
        linattn capped against itself without it (the cap's cost) and FlexAttention with the same
        cap as a score_mod (SDPA and local-attention cannot cap, so they are left out)
    python -m benchmarks.bench_window_attention --quick --alibi        # ALiBi slopes, likewise
    python -m benchmarks.bench_window_attention --quick --dropout 0.1  # attention dropout: linattn
        against itself without it (the mask's cost) and SDPA with the same dropout_p
    python -m benchmarks.bench_window_attention --quick --kv-heads 2   # grouped-query heads (8 query
        heads over 2 key/value heads): linattn reading the shared heads in place against itself on
        heads repeated first (what a model without native support does), SDPA and FlexAttention
        with enable_gqa

Writes results/window_attention.json and results/window_attention.png.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

import linattn
from benchmarks.common import (current_rss_bytes, gemm_gflops, interleaved_medians, machine_info, peak_rss_bytes,
                               reset_peak_rss, run_child, write_results)

B, H, D = 1, 8, 64
KV_HEADS = H  # --kv-heads: key/value heads, each serving H / KV_HEADS query heads
DROPOUT = 0.0  # --dropout: attention dropout probability


def make_inputs(T, requires_grad):
    g = torch.Generator().manual_seed(T)
    return [torch.randn(B, heads, T, D, generator=g).requires_grad_(requires_grad) for heads in (H, KV_HEADS, KV_HEADS)]


BASELINE = "linattn"  # the implementation every ratio is taken against
PLAIN = "linattn (no score terms)"  # with --softcap / --alibi: the same call without them
REPEATED = "linattn (heads repeated)"  # with --kv-heads: the same call on k and v repeated to H heads
SLOPES = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float32)  # ALiBi's geometric slopes


def implementations(T, w, sdpa_max, softcap=None, alibi=False):
    """name -> (forward fn(q, k, v), whether it can be trained, i.e. has a CPU backward). With a
    softcap or ALiBi, every implementation applies them but PLAIN, and those that cannot are left out."""
    slopes = SLOPES if alibi else None
    scored = softcap is not None or alibi  # score terms SDPA cannot add
    terms = scored or DROPOUT > 0
    impls = {BASELINE: (lambda q, k, v: linattn.sliding_window_attention(q, k, v, w, causal=True, softcap=softcap,
                                                                         alibi_slopes=slopes, dropout_p=DROPOUT),
                        True)}
    if terms:
        impls[PLAIN] = (lambda q, k, v: linattn.sliding_window_attention(q, k, v, w, causal=True), True)
    grouped = KV_HEADS != H
    if grouped:
        def repeated(q, k, v):
            k, v = (x.repeat_interleave(H // KV_HEADS, 1) for x in (k, v))
            return linattn.sliding_window_attention(q, k, v, w, causal=True, softcap=softcap, alibi_slopes=slopes)

        impls[REPEATED] = (repeated, True)
    if T <= sdpa_max and not scored:
        band = linattn.window_mask(T, T, w, causal=True)[0, 0]
        impls["sdpa dense mask"] = (lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=band, enable_gqa=grouped, dropout_p=DROPOUT), True)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # pragma: no cover - older torch
        create_block_mask = None
    if create_block_mask is not None and T <= 16384 and not DROPOUT:
        block_mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j <= w), None, None, T, T, device="cpu")
        # One compilation per (T, w) point, as a user with fixed shapes would have: without a
        # higher limit dynamo stops after 8 and runs flex_attention unfused (a T×T score matrix,
        # out of memory at T=16384).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(flex_attention, dynamic=False)
        if not terms:
            impls["flex (compiled fwd)"] = (
                lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=grouped), False)
        else:
            def score_terms(score, b, h, i, j):
                if softcap is not None:
                    score = softcap * torch.tanh(score / softcap)
                return score - SLOPES[h] * (i - j).abs() if alibi else score

            impls["flex score_mod (compiled fwd)"] = (
                lambda q, k, v: compiled(q, k, v, score_mod=score_terms, block_mask=block_mask, enable_gqa=grouped),
                False)
    try:
        from local_attention import LocalAttention
    except ImportError:
        LocalAttention = None
    if LocalAttention is not None and not terms and not grouped:
        local = LocalAttention(window_size=w, causal=True, look_backward=1, exact_windowsize=True, autopad=True,
                               use_rotary_pos_emb=False)
        impls["local-attention"] = (lambda q, k, v: local(q, k, v), True)
    return impls


def check_agreement(softcap, alibi, T=300, w=37):
    if DROPOUT:  # every implementation draws its own mask
        return
    q, k, v = make_inputs(T, False)
    outs = {name: fn(q, k, v) for name, (fn, _) in implementations(T, w, T, softcap, alibi).items() if name != PLAIN}
    for name, out in outs.items():
        err = (out - outs[BASELINE]).abs().max().item()
        assert err < 1e-4, f"{name} disagrees with linattn: max error {err:.2e}"


def forward_backward(fn):
    def run(q, k, v):
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
    return run


def measure(T, w, reps, sdpa_max, softcap, alibi):
    impls = implementations(T, w, sdpa_max, softcap, alibi)
    q, k, v = make_inputs(T, False)
    with torch.no_grad():
        fwd = interleaved_medians({n: (lambda f=f: f(q, k, v)) for n, (f, _) in impls.items()}, reps)
    qg, kg, vg = make_inputs(T, True)
    trainable = {n: f for n, (f, train) in impls.items() if train}
    both = interleaved_medians({n: (lambda f=f: forward_backward(f)(qg, kg, vg)) for n, f in trainable.items()},
                               max(1, reps // 2))
    return {"T": T, "w": w, "forward_s": fwd, "forward_backward_s": both}


def peak_memory_child(T, w, kv_heads):
    """Run in a fresh process: peak RSS of one linattn forward+backward above the baseline."""
    global KV_HEADS
    KV_HEADS = kv_heads
    q, k, v = make_inputs(T, True)
    base = current_rss_bytes()
    reset_peak_rss()
    forward_backward(lambda a, b, c: linattn.sliding_window_attention(a, b, c, w, causal=True))(q, k, v)
    tensors = 4 * B * T * D * (3 * H + 4 * KV_HEADS)  # q, out, dq; k, v, dk, dv (fp32)
    print(json.dumps({"peak_above_baseline": peak_rss_bytes() - base, "tensors": tensors}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default by mode)")
    parser.add_argument("--windows", type=int, nargs="+", help="window sizes (default by mode)")
    parser.add_argument("--softcap", type=float, help="cap every implementation's scores (Gemma-2: 50)")
    parser.add_argument("--alibi", action="store_true", help="ALiBi slopes 2^-1 .. 2^-H in every implementation")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout probability")
    parser.add_argument("--kv-heads", type=int, default=H, help=f"key/value heads, dividing H={H} (grouped-query)")
    parser.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return peak_memory_child(*args.memory_child)
    global KV_HEADS, DROPOUT
    if args.kv_heads < 1 or H % args.kv_heads:
        parser.error(f"--kv-heads must divide H={H}, got {args.kv_heads}")
    KV_HEADS, DROPOUT = args.kv_heads, args.dropout
    torch.manual_seed(0)
    check_agreement(args.softcap, args.alibi)
    info = machine_info()
    lengths = args.lengths or ([1024, 4096] if args.quick else [1024, 4096, 16384, 65536])
    windows = args.windows or ([256] if args.quick else [128, 256, 512])
    reps = 3 if args.quick else 5
    sdpa_max = 4096 if args.quick else 16384
    gemm = gemm_gflops()
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}; fp32 GEMM {gemm:.1f} GFLOP/s")
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **_: x
    points = [(T, w) for w in windows for T in lengths]
    for T, w in tqdm(points, desc="window attention"):
        rows.append(measure(T, w, reps, sdpa_max, args.softcap, args.alibi))
    largest = max(lengths)
    memory = run_child(["benchmarks.bench_window_attention", "--memory-child", str(largest), "256", str(KV_HEADS)])
    names = sorted({n for r in rows for n in r["forward_s"]}, key=lambda n: (n != BASELINE, n))
    capped = ("" if args.softcap is None else f", scores soft-capped at {args.softcap:g}") + (
        ", ALiBi" if args.alibi else "") + (f", {KV_HEADS} key/value heads" if KV_HEADS != H else "") + (
        f", dropout {DROPOUT:g}" if DROPOUT else "")
    print(f"\ncausal sliding window, B={B} H={H} D={D}, fp32{capped}; median ms (ratio = other's time / linattn's)")
    for r in rows:
        T, w = r["T"], r["w"]
        work = 4 * T * (w + 1) * D * B * H
        t = r["forward_s"][BASELINE]
        line = f"T={T:>6} w={w:>4}  fwd {t * 1e3:8.1f} ms {work / t / 1e9:6.1f} GFLOP/s ({work / t / 1e9 / gemm:4.0%} GEMM)"
        for n in names[1:]:
            if n in r["forward_s"]:
                line += f" | {n} {r['forward_s'][n] * 1e3:.1f} ms ({r['forward_s'][n] / t:.2f}x)"
        print(line)
        tb = r["forward_backward_s"][BASELINE]
        line = f"{'':>15}  fwd+bwd {tb * 1e3:8.1f} ms"
        for n in names[1:]:
            if n in r["forward_backward_s"]:
                line += f" | {n} {r['forward_backward_s'][n] * 1e3:.1f} ms ({r['forward_backward_s'][n] / tb:.2f}x)"
        print(line)
    print(f"\npeak memory of one linattn fwd+bwd at T={largest}, w=256: {memory['peak_above_baseline'] / 2**20:.0f} MiB "
          f"= {memory['peak_above_baseline'] / memory['tensors']:.2f}x inputs + output + gradients")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    colours = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(names)}
    for ax, key, title in zip(axes, ("forward_s", "forward_backward_s"), ("forward", "forward+backward")):
        for n in names:
            points = [(r["T"], r[key][n] * 1e3) for r in rows if r["w"] == 256 and n in r[key]]
            if points:
                ax.plot(*zip(*points), "o-", color=colours[n], label=n)
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=f"causal window w=256, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    payload = {"machine": info, "gemm_gflops": gemm, "B": B, "H": H, "D": D, "kv_heads": KV_HEADS, "dropout": DROPOUT,
               "softcap": args.softcap, "alibi": args.alibi, "rows": rows, "peak_memory": memory}
    name = "window_attention" + ("_softcap" if args.softcap is not None else "") + ("_alibi" if args.alibi else "")
    name += (f"_kv{KV_HEADS}" if KV_HEADS != H else "") + (f"_dropout{DROPOUT:g}" if DROPOUT else "")
    json_path, png_path = write_results(args.out, name, payload, fig)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    sys.exit(main())
