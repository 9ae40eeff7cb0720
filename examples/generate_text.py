"""Generation with a constant-size state: a small causal character-level Transformer LM, trained
for a few hundred steps on a text that ships with Python (the source of its argparse module),
once with linear attention and once with softmax attention, then generating token by token
through linattn.nn.DecodingCache: linear attention carries a fixed (S, z) state per layer,
softmax a key/value cache that grows with the context. The plot shows per-token latency and
cache memory against context length: flat against growing.

    python examples/generate_text.py            # generates 16384 tokens per model
    python examples/generate_text.py --quick    # 100 training steps, 4096 tokens

Prints samples and a table, writes results/generate_text.{json,png}.
"""
import argparse
import statistics
import time

import _common  # noqa: F401  (sets up imports when run as a file)
from _common import print_table, save_results

import torch
from torch import nn

import linattn


class Block(nn.Module):
    def __init__(self, dim, heads, method):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = linattn.nn.MultiheadAttention(dim, heads, batch_first=True, method=method)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cache=None):
        h = self.norm1(x)
        if cache is None:
            # The mask accompanies the is_causal hint (as torch's MultiheadAttention wants it for
            # softmax); the kernelized methods go by the hint alone.
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
            h = self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        else:
            h = self.attn(h, h, h, need_weights=False, cache=cache)[0]
        x = x + h
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    """Bytes in, next-byte logits out; no position embeddings (causal attention orders tokens by
    itself), so it runs at any context length."""

    def __init__(self, method, dim=128, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, method) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens, cache=None):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cache)
        return self.norm(x) @ self.embed.weight.T


def training_text() -> torch.Tensor:
    path = argparse.__file__
    with open(path, "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long)


def train(method, data, steps, seed=0):
    torch.manual_seed(seed)
    model = CharLM(method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    length, batch = 128, 32
    for step in range(steps):
        starts = torch.randint(0, data.numel() - length - 1, (batch,))
        window = torch.stack([data[s:s + length + 1] for s in starts])
        logits = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


@torch.inference_mode()
def generate(model, prompt, tokens, record_every):
    """Samples `tokens` bytes after the prompt; returns (text, per-token seconds, [(context, cache bytes)])."""
    generator = torch.Generator().manual_seed(0)
    cache = linattn.nn.DecodingCache()
    logits = model(prompt[None], cache)[:, -1]  # the prompt in one chunk
    out, seconds, memory = [], [], []
    for i in range(tokens):
        token = torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=generator)
        out.append(token.item())
        start = time.perf_counter()
        logits = model(token, cache)[:, -1]
        seconds.append(time.perf_counter() - start)
        if (i + 1) % record_every == 0:
            memory.append((prompt.numel() + i + 1, cache.memory_bytes()))
    return bytes(out).decode("utf-8", errors="replace"), seconds, memory


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        contexts = [p["context"] for p in row["points"]]
        left.plot(contexts, [p["ms_per_token"] for p in row["points"]], label=row["method"])
        right.plot(contexts, [p["cache_mib"] for p in row["points"]], label=row["method"])
    left.set(xlabel="context length (tokens)", ylabel="ms per generated token (median)",
             title="decoding latency (2-layer char LM)")
    right.set(xlabel="context length (tokens)", ylabel="cache MiB", title="decoding cache memory")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 training steps, 4096 generated tokens")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens generated per model (default 16384)")
    args = parser.parse_args()
    steps = args.steps or (100 if args.quick else 300)
    tokens = args.tokens or (4096 if args.quick else 16384)
    bucket = max(tokens // 32, 16)
    torch.set_num_threads(torch.get_num_threads())
    data = training_text()
    prompt = data[:64]
    rows = []
    for method in ("linear", "softmax"):
        start = time.perf_counter()
        model, loss = train(method, data, steps)
        trained = time.perf_counter() - start
        text, seconds, memory = generate(model, prompt, tokens, bucket)
        points = [
            {"context": context, "ms_per_token": 1e3 * statistics.median(seconds[i * bucket:(i + 1) * bucket]),
             "cache_mib": bytes_ / 2**20}
            for i, (context, bytes_) in enumerate(memory)
        ]
        rows.append({"method": method, "train_steps": steps, "final_loss": loss, "train_seconds": trained,
                     "points": points, "sample": text[:400]})
        print(f"\n--- {method}: loss {loss:.3f} after {steps} steps ({trained:.0f} s); sample:\n{text[:400]}")
    print()
    table = []
    for row in rows:
        first, last = row["points"][0], row["points"][-1]
        table.append([row["method"], f"{row['final_loss']:.3f}", f"{first['ms_per_token']:.3f}",
                      f"{last['ms_per_token']:.3f}", f"{first['cache_mib']:.3f}", f"{last['cache_mib']:.2f}"])
    first_ctx, last_ctx = rows[0]["points"][0]["context"], rows[0]["points"][-1]["context"]
    print_table(["method", "loss", f"ms/token @{first_ctx}", f"ms/token @{last_ctx}",
                 f"cache MiB @{first_ctx}", f"cache MiB @{last_ctx}"], table)
    save_results("generate_text", rows, plot)


if __name__ == "__main__":
    main()
