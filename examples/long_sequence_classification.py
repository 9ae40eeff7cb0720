"""Long-sequence text classification on a generated task whose answer depends on tokens far
apart, comparing softmax, linear, performer, linformer, local (sliding window), longformer and
bigbird attention in the same small Transformer (one swap_attention line each): accuracy,
training step time and peak memory.

The task: a sequence of random tokens; the label is the *first* token, and the model reads its
answer at a classifier token appended after the *last* one, so attention has to carry
information across the whole sequence (mean pooling would only see it 1/T of the way).

    python examples/long_sequence_classification.py             # T = 1024
    python examples/long_sequence_classification.py --quick     # T = 256, fewer steps

Each method trains in a fresh process (so its peak memory is its own). Prints a table, writes
results/long_sequence_classification.{json,png}.
"""
import argparse
import json
import statistics
import sys

import _common  # noqa: F401  (sets up imports when run as a file)
from _common import PeakMemory, print_table, run_worker, save_results, timed_training_step

METHOD_OPTIONS = {
    "softmax": {},
    "linear": {},
    "performer": {"nb_features": 64, "seed": 0},
    "linformer": {"k": 64},  # max_seq_len is set from the sequence length
    # Softmax restricted to who may attend to whom: a window alone cannot reach the first token
    # from the classifier token in two layers; Longformer's global first token and BigBird's
    # global first/last blocks can.
    "local": {"window": 32},
    "longformer": {"window": 32, "global_tokens": 1},
    "bigbird": {"block_size": 32, "num_random": 2},
}


def make_batch(batch, length, classes, vocab, generator):
    import torch

    tokens = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    tokens[:, 0] = labels
    return tokens, labels


def build_model(length, classes, vocab, dim=64, heads=4, layers=2):
    import torch
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab + 1, dim)  # the last id is the classifier token
            self.position = nn.Parameter(torch.randn(length + 1, dim) * 0.1)
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(dim, classes)

        def forward(self, tokens):
            cls = torch.full((tokens.shape[0], 1), vocab, dtype=tokens.dtype, device=tokens.device)
            x = self.embed(torch.cat([tokens, cls], dim=1)) + self.position
            return self.head(self.encoder(x)[:, -1])

    return Classifier()


def worker(config):
    import torch

    import linattn

    torch.manual_seed(0)
    device = torch.device(config["device"])
    length, classes, vocab = config["length"], config["classes"], config["vocab"]
    model = build_model(length, classes, vocab)
    method = config["method"]
    if method != "softmax":
        options = dict(METHOD_OPTIONS[method])
        if method == "linformer":
            options["max_seq_len"] = length + 1
        linattn.swap_attention(model, method=method, **options)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(1)
    times = []
    with PeakMemory(device) as memory:
        for _ in range(config["steps"]):
            tokens, labels = (t.to(device) for t in make_batch(config["batch"], length, classes, vocab, generator))
            seconds, final_loss = timed_training_step(model, optimizer, tokens, labels)
            times.append(seconds)
    model.eval()
    correct = total = 0
    test_generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(8):
            tokens, labels = make_batch(64, length, classes, vocab, test_generator)
            correct += (model(tokens.to(device)).argmax(-1).cpu() == labels).sum().item()
            total += labels.numel()
    return {**config, "step_s": statistics.median(times[1:]), "peak_mb": memory.peak / 2**20,
            "accuracy": correct / total, "final_loss": final_loss}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    names = [r["method"] for r in rows]
    for ax, key, label in zip(axes, ("accuracy", "step_s", "peak_mb"),
                              ("test accuracy", "training step (s)", "peak memory (MiB)")):
        ax.bar(names, [r[key] for r in rows], color=["#777", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(rows)])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0 / rows[0]["classes"], color="k", ls=":", label="chance")
    axes[0].legend()
    fig.suptitle(f"first-token recall at T={rows[0]['length']}")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--length", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--methods", nargs="+", default=list(METHOD_OPTIONS), choices=list(METHOD_OPTIONS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from tqdm import tqdm

    length = args.length or (256 if args.quick else 1024)
    steps = args.steps or (150 if args.quick else 300)
    configs = [dict(method=m, length=length, steps=steps, batch=args.batch, classes=4, vocab=16, lr=args.lr,
                    device=args.device) for m in args.methods]
    rows = [run_worker(__file__, c, timeout=3600) for c in tqdm(configs, desc="methods", file=sys.stdout)]
    base = next((r for r in rows if r["method"] == "softmax"), None)
    table = [[r["method"], f"{r['accuracy']:.3f}", f"{r['step_s'] * 1e3:.0f}",
              f"{base['step_s'] / r['step_s']:.2f}x" if base else "-", f"{r['peak_mb']:.0f}",
              f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base and base["peak_mb"] > 0 else "-"] for r in rows]
    import torch

    print(f"\nFirst-token recall, T={length} (+1 classifier token), 4 classes (chance 0.25), 2-layer pre-norm "
          f"Transformer dim 64, {steps} AdamW steps of batch {args.batch}, {args.device}, {torch.get_num_threads()} threads")
    print_table(["method", "test acc", "step ms", "speed vs softmax", "peak MiB", "mem vs softmax"], table)
    save_results("long_sequence_classification", rows, plot)


if __name__ == "__main__":
    main()
