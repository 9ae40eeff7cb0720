"""A torchvision VisionTransformer swapped to linear attention with one line, trained for a few
steps on synthetic images, with throughput and peak memory against softmax as images grow.

    python examples/vit_linear_attention.py            # 64..512 px (up to 4097 tokens)
    python examples/vit_linear_attention.py --quick    # the README demo: a minute or two on 2 cores

Each (image size, method) runs in a fresh process so its peak memory is its own. Prints a table,
writes results/vit_linear_attention.{json,png}.
"""
import argparse
import json
import statistics
import sys

import _common  # noqa: F401  (sets up imports when run as a file)
from _common import PeakMemory, print_table, run_worker, save_results, timed_training_step


def synthetic_batch(batch, size, generator):
    """4 classes: a bright 1/4-size square in quadrant c of a noisy image."""
    import torch

    images = torch.randn(batch, 3, size, size, generator=generator) * 0.5
    labels = torch.randint(0, 4, (batch,), generator=generator)
    half, side = size // 2, size // 4
    for i, c in enumerate(labels.tolist()):
        top, left = (c // 2) * half + side // 2, (c % 2) * half + side // 2
        images[i, :, top:top + side, left:left + side] += 2.0
    return images, labels


def worker(config):
    import torch
    import torchvision

    import linattn

    torch.manual_seed(0)
    device = torch.device(config["device"])
    model = torchvision.models.VisionTransformer(
        image_size=config["size"], patch_size=config["patch"], num_layers=4, num_heads=4, hidden_dim=64,
        mlp_dim=128, num_classes=4,
    )
    if config["method"] != "softmax":
        linattn.swap_attention(model, method=config["method"])  # the one line
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    batches = [synthetic_batch(config["batch"], config["size"], generator) for _ in range(config["steps"])]
    times, losses = [], []
    with PeakMemory(device) as memory:
        for images, labels in batches:
            seconds, loss = timed_training_step(model, optimizer, images.to(device), labels.to(device))
            times.append(seconds)
            losses.append(loss)
    step = statistics.median(times[1:] if len(times) > 1 else times)  # the first step warms up
    return {
        **config, "tokens": (config["size"] // config["patch"]) ** 2 + 1, "step_s": step,
        "images_per_s": config["batch"] / step, "peak_mb": memory.peak / 2**20,
        "first_loss": losses[0], "last_loss": losses[-1],
    }


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        ax1.plot([r["tokens"] for r in mine], [r["images_per_s"] for r in mine], "o-", label=method)
        ax2.plot([r["tokens"] for r in mine], [r["peak_mb"] for r in mine], "o-", label=method)
    ax1.set(xlabel="tokens per image", ylabel="training images / s", xscale="log", yscale="log",
            title="ViT training throughput")
    ax2.set(xlabel="tokens per image", ylabel="peak memory (MiB)", xscale="log", yscale="log",
            title="ViT training peak memory")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="four image sizes, few steps")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes in pixels (multiples of the patch)")
    parser.add_argument("--methods", nargs="+", default=["softmax", "linear"])
    parser.add_argument("--steps", type=int, help="training steps per configuration")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from tqdm import tqdm

    sizes = args.sizes or ([64, 128, 256, 384] if args.quick else [64, 128, 192, 256, 384, 512])
    steps = args.steps or (4 if args.quick else 10)
    configs = [
        dict(size=s, patch=8, method=m, steps=steps, batch=args.batch, device=args.device)
        for s in sizes for m in args.methods
    ]
    rows = [run_worker(__file__, c) for c in tqdm(configs, desc="ViT configurations", file=sys.stdout)]

    baseline = {r["size"]: r for r in rows if r["method"] == "softmax"}
    table = []
    for r in rows:
        base = baseline.get(r["size"])
        table.append([
            r["size"], r["tokens"], r["method"], f"{r['step_s'] * 1e3:.0f}", f"{r['images_per_s']:.1f}",
            f"{base['step_s'] / r['step_s']:.2f}x" if base else "-", f"{r['peak_mb']:.0f}",
            f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base and base["peak_mb"] > 0 else "-",
            f"{r['first_loss']:.2f} -> {r['last_loss']:.2f}",
        ])
    import torch

    print(f"\nViT (torchvision, 4 layers, hidden 64, 4 heads, patch 8), batch {args.batch}, {steps} AdamW steps, "
          f"{args.device}, {torch.get_num_threads()} threads; median step time")
    print_table(["px", "tokens", "method", "step ms", "img/s", "speed vs softmax", "peak MiB", "mem vs softmax", "loss"],
                table)
    save_results("vit_linear_attention", rows, plot)


if __name__ == "__main__":
    main()
