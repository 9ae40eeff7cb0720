"""Training a Swin Transformer whose shifted-window attention runs on linattn's fused window
kernel: torchvision's SwinTransformer (a small configuration), swapped with one
`linattn.swap_attention(model)` call, trained side by side with the unswapped model from the
same initial weights on synthetic images. The swap is exact (same parameters, same math), so
the two loss curves should agree to float32 rounding; the table shows that, the held-out
accuracy and the step time of each.

The task (generated here): 64×64 noisy images with a bright 16×16 square at a random place; the
label is its colour (red, green, blue or white). Swin ends in global average pooling and has no
absolute position embedding, so a task about where something is would be the wrong one.

    python examples/swin_training.py            # 300 steps of batch 32
    python examples/swin_training.py --quick    # 60 steps

Prints a table, writes results/swin_training.{json,png}.
"""
import argparse
import copy
import statistics
import time

import _common  # noqa: F401  (sets up imports when run as a file)
from _common import print_table, save_results

import torch
import torchvision

import linattn


def synthetic_batch(batch, size, generator):
    """4 classes: a bright square of colour red / green / blue / white at a random place."""
    images = torch.randn(batch, 3, size, size, generator=generator) * 0.5
    labels = torch.randint(0, 4, (batch,), generator=generator)
    side = size // 4
    corners = torch.randint(0, size - side + 1, (batch, 2), generator=generator).tolist()
    for i, (c, (top, left)) in enumerate(zip(labels.tolist(), corners)):
        channels = slice(0, 3) if c == 3 else slice(c, c + 1)
        images[i, channels, top:top + side, left:left + side] += 2.0
    return images, labels


def small_swin():
    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=4,
        stochastic_depth_prob=0.0,
    )


def accuracy(model, batches):
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
    model.train()
    return right / sum(len(y) for _, y in batches)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.plot(row["losses"], label=f"{row['attention']} ({row['ms_per_step']:.0f} ms/step)")
    ax.set(xlabel="step", ylabel="training loss", title="small Swin on synthetic coloured squares")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 steps")
    args = parser.parse_args()
    steps = 60 if args.quick else 300
    generator = torch.Generator().manual_seed(1)
    batches = [synthetic_batch(32, 64, generator) for _ in range(steps)]
    held_out = [synthetic_batch(64, 64, generator) for _ in range(4)]
    torchvision_model = small_swin()
    swapped = linattn.swap_attention(copy.deepcopy(torchvision_model))  # the one line
    models = {"torchvision": torchvision_model, "linattn (swapped)": swapped}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    losses = {name: [] for name in models}
    times = {name: [] for name in models}
    for images, labels in batches:
        for name, model in models.items():  # interleaved, so machine noise hits both alike
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            times[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())
    rows = []
    for name, model in models.items():
        rows.append({"attention": name, "steps": steps, "final_loss": losses[name][-1],
                     "held_out_accuracy": accuracy(model, held_out),
                     "ms_per_step": 1e3 * statistics.median(times[name][1:]), "losses": losses[name]})
    gap = max(abs(a - b) for a, b in zip(*losses.values()))
    print_table(["attention", "final loss", "held-out accuracy", "ms / step (median)"],
                [[r["attention"], f"{r['final_loss']:.4f}", f"{r['held_out_accuracy']:.3f}",
                  f"{r['ms_per_step']:.1f}"] for r in rows])
    print(f"\nlargest loss difference between the two over {steps} steps: {gap:.2e}")
    save_results("swin_training", rows, plot)


if __name__ == "__main__":
    main()
