"""Why the delta rule exists: multi-query associative recall (MQAR, Arora et al. 2023, "Zoology").

Each sequence lists P key–value pairs, then asks for the P keys again in another order; after each
asked key the model must produce its value. A small causal model (2 blocks of a short causal
convolution — the previous-token mixing that every one of these architectures uses — then
attention, then an MLP; d_model 64, 2 heads of 32, no position embedding) is trained from scratch
with the same budget for each attention method: softmax (exact, a cache that grows with the
context), linear attention (elu+1: a fixed-size state that only accumulates), GLA (the same state
fading channel by channel by learned gates), DeltaNet, Gated DeltaNet and KDA (a fixed-size state that
overwrites what it mispredicts). Recall accuracy on held-out
sequences is reported per number of pairs (sequence length 4P).

    python examples/associative_recall.py            # the README's table (a few minutes on 2 cores)
    python examples/associative_recall.py --quick    # a few steps, to see it run
    python examples/associative_recall.py --d-model 128 --steps 1000 --methods linear deltanet
    python examples/associative_recall.py --task overwrite --pairs 8 16 32 --steps 2000   # keys reassigned

Writes results/associative_recall.json and .png (accuracy against P; --output changes the prefix).
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import linattn

METHODS = ("softmax", "linear", "gla", "deltanet", "gated_deltanet", "kda")
KEYS, VALUES = 128, 128  # token ids: keys 0..127, values 128..255


def batch(pairs: int, size: int, generator: torch.Generator):
    """(tokens (size, 4·pairs), targets with -100 where nothing is asked): the pairs k v k v …,
    then the same keys shuffled, each followed by its value."""
    keys = torch.argsort(torch.rand(size, KEYS, generator=generator), dim=1)[:, :pairs]
    values = torch.randint(KEYS, KEYS + VALUES, (size, pairs), generator=generator)
    order = torch.argsort(torch.rand(size, pairs, generator=generator), dim=1)
    asked, answers = keys.gather(1, order), values.gather(1, order)
    tokens = torch.stack([torch.stack([keys, values], 2).flatten(1), torch.stack([asked, answers], 2).flatten(1)], 1)
    tokens = tokens.flatten(1)
    targets = torch.full_like(tokens, -100)
    targets[:, 2 * pairs::2] = answers  # predicted at each asked key's position: the next token
    return tokens, targets


def overwrite_batch(pairs: int, size: int, generator: torch.Generator):
    """The overwrite variant: the P pairs, then every key again (in another order) with a new value,
    then the keys asked in a third order, each to be answered with its latest value. A state that
    only accumulates holds both values of every key; the delta rule replaces the old one."""
    keys = torch.argsort(torch.rand(size, KEYS, generator=generator), dim=1)[:, :pairs]
    first = torch.randint(KEYS, KEYS + VALUES, (size, pairs), generator=generator)
    # The new value differs from the old one (else a stale answer would count as right).
    latest = KEYS + (first - KEYS + torch.randint(1, VALUES, (size, pairs), generator=generator)) % VALUES
    again = torch.argsort(torch.rand(size, pairs, generator=generator), dim=1)
    order = torch.argsort(torch.rand(size, pairs, generator=generator), dim=1)
    parts = [(keys, first), (keys.gather(1, again), latest.gather(1, again)), (keys.gather(1, order), latest.gather(1, order))]
    tokens = torch.cat([torch.stack(part, 2).flatten(1) for part in parts], 1)
    targets = torch.full_like(tokens, -100)
    targets[:, 4 * pairs::2] = latest.gather(1, order)
    return tokens, targets


TASKS = {"recall": (batch, 4), "overwrite": (overwrite_batch, 6)}  # (batch maker, tokens per pair)


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, method: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=4, groups=d_model, padding=3)  # causal after the cut
        self.attn = linattn.nn.MultiheadAttention(d_model, heads, batch_first=True, method=method)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        T = x.shape[1]
        h = self.norm1(x)
        h = h + self.conv(h.transpose(1, 2))[..., :T].transpose(1, 2)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class RecallModel(nn.Module):
    def __init__(self, method: str, d_model: int = 64, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(KEYS + VALUES, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, method) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, KEYS + VALUES)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def accuracy(model, pairs: int, sequences: int, seed: int, task: str = "recall") -> float:
    generator = torch.Generator().manual_seed(seed)
    tokens, targets = TASKS[task][0](pairs, sequences, generator)
    with torch.no_grad():
        predicted = model(tokens).argmax(-1)
    asked = targets != -100
    return (predicted[asked] == targets[asked]).float().mean().item()


def train(method: str, pair_counts, steps: int, batch_size: int, lr: float, seed: int, log_every: int,
          d_model: int = 64, heads: int = 2, task: str = "recall"):
    torch.manual_seed(seed)
    model = RecallModel(method, d_model=d_model, heads=heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for step in range(steps):
        pairs = pair_counts[step % len(pair_counts)]  # every length in turn
        tokens, targets = TASKS[task][0](pairs, batch_size, generator)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  {method:>15} step {step + 1:>5}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")
    return model.eval(), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps and short sequences, to see it run")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--pairs", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--task", choices=sorted(TASKS), default="recall",
                        help="recall: each key once; overwrite: each key twice, the latest value asked")
    parser.add_argument("--output", default=None, help="results prefix (default results/associative_recall[_overwrite])")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.pairs, args.batch_size = 20, [4, 8], 16
    if args.output is None:
        args.output = "results/associative_recall" + ("" if args.task == "recall" else "_" + args.task)
    per_pair = TASKS[args.task][1]
    results = {"task": args.task, "pairs": args.pairs, "steps": args.steps, "d_model": args.d_model, "heads": args.heads,
               "accuracy": {}, "train_seconds": {}}
    for method in args.methods:
        model, seconds = train(method, args.pairs, args.steps, args.batch_size, args.lr, args.seed,
                               log_every=0 if args.quick else 500, d_model=args.d_model, heads=args.heads,
                               task=args.task)
        results["accuracy"][method] = [accuracy(model, p, 256, seed=10_000 + p, task=args.task) for p in args.pairs]
        results["train_seconds"][method] = seconds
    width = max(len(m) for m in args.methods)
    print(f"\nrecall accuracy on held-out sequences ({args.steps} training steps each)")
    print(f"{'method':>{width}} " + " ".join(f"{f'P={p} (T={per_pair * p})':>13}" for p in args.pairs) + "   train s")
    for method in args.methods:
        row = " ".join(f"{a:>13.3f}" for a in results["accuracy"][method])
        print(f"{method:>{width}} {row}   {results['train_seconds'][method]:7.0f}")
    folder = os.path.dirname(args.output)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(results, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for method in args.methods:
        axis.plot(args.pairs, results["accuracy"][method], marker="o", label=method)
    axis.set_xscale("log", base=2)
    axis.set_xlabel(f"key-value pairs P (sequence length {per_pair}P)")
    axis.set_ylabel("recall accuracy")
    axis.set_ylim(0, 1.02)
    axis.legend()
    title = "Multi-query associative recall" if args.task == "recall" else "Recall of overwritten values"
    axis.set_title(f"{title}, d_model {args.d_model}, {args.heads} heads")
    figure.savefig(args.output + ".png", dpi=120, bbox_inches="tight")
    print(f"\nwrote {args.output}.json and .png")


if __name__ == "__main__":
    main()
