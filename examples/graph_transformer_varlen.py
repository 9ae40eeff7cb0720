"""A graph transformer on packed graphs: each torch_geometric graph is one sequence of its nodes,
and the batch goes to linear attention packed, with `cu_seqlens` = the batch's `ptr` (no padding
to the largest graph). Trains a 2-layer transformer on a data set built here, then times the
same model with the graphs padded to the largest one (key padding mask) instead.

The task (generated, no download): each graph is an Erdős–Rényi graph of 10-150 nodes whose nodes
carry one of 4 colours; the label says whether colour 0 outnumbers colour 1 — a question about
the whole graph, which attention answers by mixing all nodes. Node features: the colour one-hot
and the node's degree (from edge_index), so the graph's structure is part of the input.

Needs torch_geometric (`pip install torch_geometric`; an optional extra of linattn).

    python examples/graph_transformer_varlen.py            # 4000 graphs, 4 epochs
    python examples/graph_transformer_varlen.py --quick    # 1000 graphs, 2 epochs
"""
import argparse
import statistics
import sys
import time

import _common  # noqa: F401  (sets up imports when run as a file)
from _common import print_table

import torch
from torch import nn

import linattn

try:
    from torch_geometric.data import Data
    from torch_geometric.loader import DataLoader
    from torch_geometric.utils import degree, erdos_renyi_graph, scatter, to_dense_batch
except ImportError:  # pragma: no cover - optional extra
    sys.exit("This example needs torch_geometric: pip install torch_geometric")

COLOURS = 4


def make_graphs(count, seed):
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for _ in range(count):
        nodes = int(torch.randint(10, 151, (1,), generator=g))
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        edges = erdos_renyi_graph(nodes, edge_prob=3.0 / nodes)
        colour = torch.randint(0, COLOURS, (nodes,), generator=g)
        features = torch.cat([nn.functional.one_hot(colour, COLOURS).float(),
                              degree(edges[0], nodes).unsqueeze(1) / 4], dim=1)
        label = int((colour == 0).sum() > (colour == 1).sum())
        graphs.append(Data(x=features, edge_index=edges, y=torch.tensor([label])))
    return graphs


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attend(self, h, batch, padded):
        """Linear attention within each graph: packed with cu_seqlens, or padded to the largest."""
        if not padded:
            # (total, dim) -> (1, H, total, hd): every graph's nodes are one packed sequence.
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(0, 1).unsqueeze(0) for t in self.qkv(h).chunk(3, -1))
            out = linattn.linear_attention(q, k, v, cu_seqlens=batch.ptr.to(torch.int32))
            return out.squeeze(0).transpose(0, 1).flatten(1)
        dense, present = to_dense_batch(self.qkv(h), batch.batch)  # (N, longest, 3·dim)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in dense.chunk(3, -1))
        out = linattn.linear_attention(q, k, v, key_padding_mask=~present)
        return out.transpose(1, 2).flatten(2)[present]

    def forward(self, x, batch, padded):
        x = x + self.out(self.attend(self.norm1(x), batch, padded))
        return x + self.mlp(self.norm2(x))


class GraphTransformer(nn.Module):
    def __init__(self, dim=64, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Linear(COLOURS + 1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, 2)

    def forward(self, batch, padded=False):
        x = self.embed(batch.x)
        for block in self.blocks:
            x = block(x, batch, padded)
        return self.head(scatter(x, batch.batch, dim=0, reduce="mean"))


def accuracy(model, loader):
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            right += int((model(batch).argmax(-1) == batch.y).sum())
            total += batch.num_graphs
    model.train()
    return right / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1000 graphs, 2 epochs")
    args = parser.parse_args()
    count, epochs = (1000, 2) if args.quick else (4000, 4)
    train = DataLoader(make_graphs(count, seed=0), batch_size=64, shuffle=True)
    test = DataLoader(make_graphs(count // 4, seed=1), batch_size=128)
    torch.manual_seed(0)
    model = GraphTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    step_ms = {"packed (cu_seqlens)": [], "padded (key_padding_mask)": []}
    for epoch in range(epochs):
        for batch in train:
            # Every 4th step is also timed padded (same weights, gradients discarded), for comparison.
            for name, padded in (("packed (cu_seqlens)", False), ("padded (key_padding_mask)", True)):
                if padded and len(step_ms[name]) * 4 > len(step_ms["packed (cu_seqlens)"]):
                    continue
                start = time.perf_counter()
                loss = nn.functional.cross_entropy(model(batch, padded=padded), batch.y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                step_ms[name].append((time.perf_counter() - start) * 1e3)
                if not padded:
                    optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy(model, test):.3f}")
    packed, padded = (statistics.median(v) for v in step_ms.values())
    nodes = sum(g.num_nodes for g in train.dataset)
    print()
    print_table(["attention", "median ms / step (64 graphs)", "time vs packed"],
                [["packed (cu_seqlens)", f"{packed:.1f}", "1.00x"],
                 ["padded (key_padding_mask)", f"{padded:.1f}", f"{padded / packed:.2f}x"]])
    print(f"\n{count} graphs, {nodes} nodes; test accuracy {accuracy(model, test):.3f} (chance ~0.5)")


if __name__ == "__main__":
    main()
