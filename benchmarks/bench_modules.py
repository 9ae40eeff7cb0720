"""Benchmark of linattn.nn.MultiheadAttention's methods as whole modules (in-projection,
attention, out-projection), forward+backward, against torch.nn.MultiheadAttention and, when
they are installed, the PyPI peers performer-pytorch and linformer (pip install performer-pytorch linformer).

Self-attention on x (B, T, E) with E=256 and 4 heads of 64, fp32, need_weights=False; every
module of a (T, causal) point is timed in the same run, round-robin, and quoted as a median;
"vs torch MHA" is torch's median over the module's (> 1 = faster than torch).

    python -m benchmarks.bench_modules            # T = 1024, 4096, 16384
    python -m benchmarks.bench_modules --quick    # T = 1024, 4096 with few repetitions

Writes results/modules.json and results/modules.png.
"""
import argparse
import sys

import torch
from torch import nn

import linattn
from benchmarks.common import interleaved_medians, machine_info, write_results

B, E, HEADS = 2, 256, 4
HEAD_DIM = E // HEADS


def linattn_modules(T, causal):
    options = {
        "softmax": {}, "linear": {}, "performer": {"seed": 0},
        "efficient": {}, "linformer": {"max_seq_len": T, "k": 256},
    }
    modules = {}
    for method, opts in options.items():
        module = linattn.nn.MultiheadAttention(E, HEADS, batch_first=True, method=method, **opts)
        if causal and not module.core.supports_causal:
            continue
        modules[f"linattn {method}"] = module
    return modules


def peer_modules(T, causal):
    """Peers with the same embedding size and heads, each with its own projections."""
    peers = {}
    try:
        from performer_pytorch import SelfAttention

        # Same number of random features as linattn's default (⌈d ln d⌉), no redraws timed.
        peers["performer-pytorch"] = SelfAttention(
            dim=E, heads=HEADS, dim_head=HEAD_DIM, causal=causal, nb_features=linattn_modules(T, False)[
                "linattn performer"].core.nb_features,
        )
    except ImportError:
        pass
    if not causal:
        try:
            from linformer import LinformerSelfAttention

            peers["linformer (PyPI)"] = LinformerSelfAttention(dim=E, seq_len=T, heads=HEADS, k=256)
        except ImportError:
            pass
    return peers


def callers(T, causal):
    """name -> fn(x) returning the module output for one self-attention call."""
    mask = nn.Transformer.generate_square_subsequent_mask(T) if causal else None
    torch_mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    fns = {"torch MHA": lambda x: torch_mha(x, x, x, attn_mask=mask, is_causal=causal, need_weights=False)[0]}
    for name, module in linattn_modules(T, causal).items():
        fns[name] = lambda x, m=module: m(x, x, x, attn_mask=mask, is_causal=causal, need_weights=False)[0]
    for name, module in peer_modules(T, causal).items():
        fns[name] = lambda x, m=module: m(x)
    return fns


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384]
    reps = 3 if args.quick else 5
    info = machine_info()
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}")
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(x, **_):
            return x
    torch.manual_seed(0)
    rows = []
    for causal in (False, True):
        for T in tqdm(lengths, desc=f"modules ({'causal' if causal else 'full'})", file=sys.stderr):
            fns = callers(T, causal)
            x = torch.randn(B, T, E, requires_grad=True)
            times = interleaved_medians({n: (lambda f=f: f(x).sum().backward()) for n, f in fns.items()}, reps)
            rows.append({"T": T, "causal": causal, "forward_backward_s": times})

    names = sorted({n for r in rows for n in r["forward_backward_s"]}, key=lambda n: (n != "torch MHA", n))
    print(f"\nforward+backward, B={B} E={E} heads={HEADS}, fp32; median ms (ratio = torch MHA time / module time)")
    header = f"{'module':<20}" + "".join(f"{('causal ' if c else 'full ') + str(T):>22}" for c in (False, True) for T in lengths)
    print(header)
    for name in names:
        cells = []
        for row in rows:
            t = row["forward_backward_s"].get(name)
            base = row["forward_backward_s"]["torch MHA"]
            cells.append(f"{t * 1e3:9.1f} ({base / t:5.2f}x)" if t else "-")
        print(f"{name:<20}" + "".join(f"{c:>22}" for c in cells))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    # One colour per implementation across both panels (a panel's own colour cycle would give
    # the same method different colours where a panel lacks some methods), and one legend.
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    lines = {}
    for ax, causal in zip(axes, (False, True)):
        mine = [r for r in rows if r["causal"] == causal]
        for name in names:
            points = [(r["T"], r["forward_backward_s"]["torch MHA"] / r["forward_backward_s"][name])
                      for r in mine if name in r["forward_backward_s"]]
            if points:
                (lines[name],) = ax.plot(*zip(*points), "o-", color=colours[name], label=name)
        ax.set(xscale="log", yscale="log", xlabel="T", title=f"{'causal' if causal else 'non-causal'} fwd+bwd")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed vs torch nn.MultiheadAttention")
    fig.subplots_adjust(right=0.84)
    fig.legend([lines[n] for n in names if n in lines], [n for n in names if n in lines], loc="center left",
               bbox_to_anchor=(0.85, 0.5), fontsize=8)
    json_path, png_path = write_results(args.out, "modules", {"machine": info, "B": B, "E": E, "heads": HEADS,
                                                              "rows": rows}, fig)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
