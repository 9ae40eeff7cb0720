"""Linearize a causal language model and generate from a constant-size state (docs/guide/linearize.md).

A byte-level Transformer LM (softmax attention, examples/generate_text.py's blocks) is trained here
on the source of some Python standard-library modules, then linearized (linattn.linearize: the
pretrained weights kept, learned Hedgehog feature maps added) and fitted to its own softmax
(attention_transfer layer by layer, then end_to_end_transfer on the logits by KL). Measured on
the source of other, held-out modules: bits per byte of the original, of elu+1 linear attention
swapped in without transfer, and of the Hedgehog linear and hybrid (exact sliding window + the
first token as a sink, linear attention for the rest) students before and after the transfer.
Then every model generates through linattn.nn.DecodingCache: softmax from a key/value cache
that grows, the linearized models from a state whose size is fixed.

    python examples/linearize_decoder.py            # the README's table (about 10 minutes on 2 cores)
    python examples/linearize_decoder.py --quick    # a few steps, to see it run
    python examples/linearize_decoder.py --students gla linear   # GLA's student (learned per-channel gates)
    python examples/linearize_decoder.py --students gated_deltanet kda   # the delta-rule students

Writes results/linearize_decoder.json and .png (held-out bits per byte against transfer steps).
"""
import argparse
import copy
import json
import math
import os
import statistics
import sysconfig
import time

import _common  # noqa: F401  (sets up imports when run as a file)
from _common import print_table, save_results
from generate_text import Block

import torch
from torch import nn

import linattn
from linattn.conversion import attention_transfer, end_to_end_transfer, set_mode
from linattn.nn.methods import build_method

TRAIN_MODULES = ["argparse", "logging/__init__", "subprocess", "threading", "json/decoder", "json/encoder",
                 "pathlib/_local", "shutil", "tarfile", "zipfile/__init__", "socket", "inspect", "ast", "typing"]
EVAL_MODULES = ["configparser", "csv", "textwrap", "difflib", "calendar", "fractions", "statistics"]


class ByteLM(nn.Module):
    """Bytes in, next-byte logits out. Its input at t is the sum of embeddings of byte t and the
    three before it (each offset its own table: a causal convolution over bytes), then pre-norm
    Transformer blocks (examples/generate_text.py's) without position embeddings. Attention alone
    learns local order slowly without positions: after 300 steps the plain byte embedding was at
    3.29 bits per byte, this one at 1.52."""

    context = 3  # earlier bytes the input embedding reads

    def __init__(self, method="softmax", dim=128, heads=4, layers=4):
        super().__init__()
        self.embed = nn.ModuleList(nn.Embedding(256, dim) for _ in range(self.context + 1))
        self.blocks = nn.ModuleList(Block(dim, heads, method) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, tokens, cache=None, before=None):
        """tokens (B, T); before (B, 3): the bytes preceding them (default: spaces)."""
        if before is None:
            before = torch.full((tokens.shape[0], self.context), ord(" "), dtype=tokens.dtype, device=tokens.device)
        padded = torch.cat([before, tokens], dim=1)
        T, n = tokens.shape[1], self.context
        x = sum(embed(padded[:, n - shift:n - shift + T]) for shift, embed in enumerate(self.embed))
        for block in self.blocks:
            x = block(x, cache)
        return self.head(self.norm(x))


def corpus(modules) -> torch.Tensor:
    """The bytes of the modules' source files, one after another (files missing in this Python's
    layout are skipped)."""
    root, chunks = sysconfig.get_paths()["stdlib"], []
    for name in modules:
        path = os.path.join(root, name + ".py")
        if os.path.exists(path):
            with open(path, "rb") as f:
                chunks.append(f.read())
    return torch.tensor(list(b"\n".join(chunks)), dtype=torch.long)


def windows(data, count, length, generator):
    starts = torch.randint(0, data.numel() - length - 1, (count,), generator=generator)
    return torch.stack([data[s:s + length + 1] for s in starts])


def train_lm(data, steps, length, batch, seed=0):
    """The 'pretrained' model: softmax attention, trained from scratch here."""
    torch.manual_seed(seed)
    model = ByteLM("softmax")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        window = windows(data, batch, length, generator)
        loss = nn.functional.cross_entropy(model(window[:, :-1]).reshape(-1, 256), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def bits_per_byte(model, held_out: torch.Tensor) -> float:
    """Mean next-byte cross-entropy (bits) over held-out windows (B, length + 1)."""
    total = 0.0
    for rows in held_out.split(16):
        logits = model(rows[:, :-1])
        total += nn.functional.cross_entropy(logits.reshape(-1, 256), rows[:, 1:].reshape(-1), reduction="sum").item()
    return total / (held_out.shape[0] * (held_out.shape[1] - 1)) / math.log(2)


def swapped(model, method, **options):
    """A copy of `model` whose attention runs `method` (the same projections): the naive swap."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, linattn.nn.MultiheadAttention):
            module.core = build_method(method, num_heads=module.num_heads, head_dim=module.head_dim, **options)
            module.method = module.core.name
    return model


def linearize_and_transfer(original, student, window, batches, held_out, layer_steps, e2e_steps, every):
    """(rows of the table, the curve of held-out bits per byte against transfer steps)."""
    model = linattn.linearize(copy.deepcopy(original), method=student, feature_map="hedgehog", window=window,
                              global_tokens="first")
    label = f"Hedgehog {student}" + (f" (window {window} + sink)" if student == "hybrid" else "")
    curve = [(0, bits_per_byte(model, held_out))]
    rows = [(f"{label}, before transfer", curve[0][1])]

    def record(offset):
        def callback(step, history):
            if (step + 1) % every == 0:
                set_mode(model, "student")
                curve.append((offset + step + 1, bits_per_byte(model, held_out)))
        return callback

    start = time.perf_counter()
    attention_transfer(model, batches, steps=layer_steps, lr=1e-2, progress=False, callback=record(0))
    set_mode(model, "student")
    rows.append((f"... after {layer_steps} layer-wise steps", bits_per_byte(model, held_out)))
    end_to_end_transfer(model, batches, steps=e2e_steps, lr=3e-3, loss="kl", progress=False,
                        callback=record(layer_steps))
    set_mode(model, "student")
    rows.append((f"... and {e2e_steps} end-to-end steps (KL)", bits_per_byte(model, held_out)))
    seconds = time.perf_counter() - start
    return model, label, rows, curve, seconds


@torch.inference_mode()
def generate(model, prompt, tokens):
    """Samples `tokens` bytes after the prompt through a DecodingCache: (text, median ms per token,
    cache bytes at the end)."""
    generator = torch.Generator().manual_seed(0)
    cache = linattn.nn.DecodingCache()
    logits = model(prompt[None], cache)[:, -1]
    history, out, seconds = prompt[None], [], []
    for _ in range(tokens):
        token = torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=generator)
        out.append(token.item())
        start = time.perf_counter()
        logits = model(token, cache, before=history[:, -model.context:])[:, -1]
        seconds.append(time.perf_counter() - start)
        history = torch.cat([history[:, -model.context:], token], dim=1)
    return bytes(out).decode("utf-8", errors="replace"), 1e3 * statistics.median(seconds), cache.memory_bytes()


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in results["curves"].items():
        ax.plot([s for s, _ in curve], [b for _, b in curve], marker=".", label=label)
    ax.axhline(results["original_bpb"], color="k", linestyle="--", linewidth=1, label="original (softmax)")
    ax.axvline(results["layer_steps"], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="transfer step (layer-wise, then end-to-end)", ylabel="held-out bits per byte",
           title="linearizing a byte-level LM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything")
    parser.add_argument("--window", type=int, default=16, help="the hybrid's exact window (default 16)")
    parser.add_argument("--students", nargs="+", default=["linear", "hybrid"],
                        choices=["linear", "hybrid", "gla", "deltanet", "gated_deltanet", "kda"],
                        help="the students to transfer (default: linear hybrid; gla: linear with learned "
                             "per-channel gates; deltanet, gated_deltanet, kda: the delta rule)")
    parser.add_argument("--output", default=None, help="path prefix of the .json and .png (default "
                        "results/linearize_decoder)")
    args = parser.parse_args()
    quick = args.quick
    length, window = 256, args.window
    train_steps, layer_steps, e2e_steps = (30, 6, 4) if quick else (800, 400, 200)
    every = 2 if quick else 25
    torch.manual_seed(0)
    train, held = corpus(TRAIN_MODULES), corpus(EVAL_MODULES)
    generator = torch.Generator().manual_seed(1)
    held_out = windows(held, 16 if quick else 128, length, generator)
    batches = [windows(train, 16, length, generator)[:, :-1] for _ in range(8 if quick else 64)]
    print(f"training text {train.numel() / 1e3:.0f} kB, held-out text {held.numel() / 1e3:.0f} kB; "
          f"sequences of {length} bytes")

    start = time.perf_counter()
    original = train_lm(train, train_steps, length, 32)
    print(f"trained the softmax LM: {train_steps} steps in {time.perf_counter() - start:.0f} s")
    results = {"length": length, "window": window, "train_steps": train_steps, "layer_steps": layer_steps,
               "e2e_steps": e2e_steps, "rows": [], "curves": {}, "generation": []}
    results["original_bpb"] = bits_per_byte(original, held_out)
    rows = [("original (softmax)", results["original_bpb"]),
            ("elu+1 linear swapped in, no transfer", bits_per_byte(swapped(original, "linear"), held_out)),
            (f"sliding window {window} alone (exact softmax)",
             bits_per_byte(swapped(original, "local", window=(window, 0)), held_out))]
    students = {}
    for student in args.students:
        model, label, student_rows, curve, seconds = linearize_and_transfer(
            original, student, window, batches, held_out, layer_steps, e2e_steps, every)
        students[student] = model
        rows += student_rows
        results["curves"][label] = curve
        print(f"{label}: transfer {seconds:.0f} s")
    results["rows"] = [{"model": name, "bits_per_byte": bpb} for name, bpb in rows]
    print_table(["model", "held-out bits per byte"], [[name, f"{bpb:.3f}"] for name, bpb in rows])

    prompt, tokens = held[:128], 64 if quick else 2048
    table = []
    names = {"hybrid": f"Hedgehog hybrid (window {window} + sink)"}
    for name, model in [("softmax (key/value cache)", original)] + [(names.get(s, f"Hedgehog {s}"), students[s])
                                                                   for s in args.students]:
        text, ms, cache_bytes = generate(model, prompt, tokens)
        results["generation"].append({"model": name, "ms_per_token": ms, "cache_bytes": cache_bytes,
                                      "sample": text[:300]})
        table.append([name, f"{ms:.2f}", f"{cache_bytes / 2**10:.0f}"])
        print(f"\n--- {name}:\n{text[:300]}")
    print()
    print_table(["model", f"ms/token (median of {tokens})", f"cache KiB after {prompt.numel() + tokens} bytes"], table)
    if args.output is None:
        save_results("linearize_decoder", results, plot)
    else:
        with open(args.output + ".json", "w") as f:
            json.dump(results, f, indent=1)
        plot(results, args.output + ".png")


if __name__ == "__main__":
    main()
