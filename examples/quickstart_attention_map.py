# %% [markdown]
# # linattn quick start: swap a model's attention, look at the attention it computes
#
# Notebook-style (each `# %%` is a cell in VS Code / Jupyter); also runs as a script:
#     python examples/quickstart_attention_map.py
# Writes results/quickstart_attention_map.png.

# %%
import copy

import _common  # noqa: F401  (sets up imports when run as a file)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

import linattn
from _common import RESULTS

torch.manual_seed(0)

# %% [markdown]
# An ordinary PyTorch Transformer encoder, built on `torch.nn.MultiheadAttention`.

# %%
layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()

# %% [markdown]
# One line swaps every attention module for linattn's, keeping the weights. `method="softmax"`
# reproduces the original exactly; `"linear"` is kernelized linear attention (O(T) cost).

# %%
linear_model = linattn.swap_attention(copy.deepcopy(model), method="linear")
softmax_model = linattn.swap_attention(copy.deepcopy(model), method="softmax")
print(linear_model.layers[0].self_attn)

x = torch.randn(1, 48, 64)
with torch.no_grad():
    same = torch.allclose(softmax_model(x), model(x), atol=1e-5)
    print(f"softmax swap reproduces the original model: {same}")
    print(f"linear swap output shape: {tuple(linear_model(x).shape)}")

# %% [markdown]
# `need_weights=True` returns the attention matrix each method applies. Linear attention never
# forms it (that is the point), so it is computed only on request, in O(T²) memory; the output
# equals `weights @ values` exactly. Here: the first layer, causal, on the same input.

# %%
causal_mask = nn.Transformer.generate_square_subsequent_mask(48)
maps = {}
with torch.no_grad():
    for name, m in (("softmax", softmax_model), ("linear (elu+1)", linear_model)):
        attention = m.layers[0].self_attn
        _, weights = attention(x, x, x, attn_mask=causal_mask, is_causal=True, need_weights=True)
        maps[name] = weights[0]
    performer = linattn.nn.MultiheadAttention(64, 4, batch_first=True, method="performer", nb_features=256, seed=0)
    performer.load_state_dict(softmax_model.layers[0].self_attn.state_dict())
    _, weights = performer.eval()(x, x, x, attn_mask=causal_mask, is_causal=True, need_weights=True)
    maps["performer (256 features)"] = weights[0]

fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4))
for ax, (name, weights) in zip(axes, maps.items()):
    image = ax.imshow(weights, cmap="viridis")
    ax.set(title=name, xlabel="key position", ylabel="query position")
    fig.colorbar(image, ax=ax, fraction=0.046)
fig.suptitle("causal attention of layer 1, averaged over heads (same weights)")
fig.tight_layout()
RESULTS.mkdir(exist_ok=True)
path = RESULTS / "quickstart_attention_map.png"
fig.savefig(path, dpi=110, bbox_inches="tight")
for name, weights in maps.items():
    print(f"{name:>26}: rows sum to 1: {torch.allclose(weights.sum(-1), torch.ones(48), atol=1e-4)}, "
          f"upper triangle zero: {bool((weights.triu(1) == 0).all())}")
print(f"attention maps: {path}")
