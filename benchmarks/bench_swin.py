"""Swin window attention: linattn's fused window kernel against torchvision's own Swin.

Two measurements, each round-robin in one run and quoted as medians:
  - whole model: torchvision swin_t forward+backward (train mode, batch B at 224 px) as built,
    and the same model after linattn.swap_attention (its 12 ShiftedWindowAttention blocks run
    linattn.shifted_window_attention);
  - attention alone, forward+backward, on Swin-T's four stage shapes (49-token windows with the
    relative-position bias and the shifted-window mask): linattn.swin_attention against
    torchvision's formulation (matmul, + bias, + mask, softmax, matmul).

    python -m benchmarks.bench_swin            # B = 4
    python -m benchmarks.bench_swin --quick    # B = 1, fewer repetitions

Writes results/swin.json. ratio > 1 means linattn is faster.
"""
import argparse
import copy

import torch

import linattn
from benchmarks.common import interleaved_medians, machine_info, write_results
from linattn.swin import shifted_window_regions

STAGES = [(56, 3), (28, 6), (14, 12), (7, 24)]  # (grid side, heads) of Swin-T at 224 px
WINDOW, HEAD_DIM = 7, 32


def torch_window_attention(q, k, v, bias, mask):
    attn = (q * HEAD_DIM ** -0.5) @ k.transpose(-2, -1) + bias
    if mask is not None:
        windows = mask.shape[0]
        attn = (attn.view(-1, windows, *attn.shape[1:]) + mask[None, :, None]).view(attn.shape)
    return attn.softmax(-1) @ v


def attention_rows(batch, reps):
    rows = []
    for side, heads in STAGES:
        windows = (side // WINDOW) ** 2
        G, N = batch * windows, WINDOW * WINDOW
        q, k, v = (torch.randn(G, heads, N, HEAD_DIM, requires_grad=True) for _ in range(3))
        bias = torch.randn(heads, N, N, requires_grad=True)
        shifted = side > WINDOW
        regions = shifted_window_regions(side, side, [WINDOW] * 2, [WINDOW // 2] * 2) if shifted else None
        mask = None if regions is None else (regions[:, None, :] != regions[:, :, None]).float() * -100.0
        grad = torch.randn(G, heads, N, HEAD_DIM)
        fns = {
            "torch": lambda: torch_window_attention(q, k, v, bias, mask).backward(grad),
            "linattn": lambda: linattn.swin_attention(q, k, v, bias=bias, regions=regions).backward(grad),
        }
        t = interleaved_medians(fns, reps)
        rows.append({"stage_grid": side, "heads": heads, "windows": G, "torch_ms": t["torch"] * 1e3,
                     "linattn_ms": t["linattn"] * 1e3, "ratio": t["torch"] / t["linattn"]})
    return rows


def model_row(batch, reps):
    from torchvision.models import swin_t

    torch.manual_seed(0)
    model = swin_t().train()
    swapped = linattn.swap_attention(copy.deepcopy(model), "linear")
    x = torch.randn(batch, 3, 224, 224)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    t = interleaved_medians({"torchvision": lambda: step(model), "linattn": lambda: step(swapped)}, reps)
    return {"batch": batch, "torchvision_ms": t["torchvision"] * 1e3, "linattn_ms": t["linattn"] * 1e3,
            "ratio": t["torchvision"] / t["linattn"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    batch, reps = (1, 3) if args.quick else (4, 7)
    info = machine_info()
    print(f"# {info}")
    rows = attention_rows(batch, reps * 3)
    print("\nwindow attention fwd+bwd (N=49, D=32, bias + shifted mask)")
    print(f"{'grid':>5} {'heads':>5} {'windows':>7} {'torch ms':>9} {'linattn ms':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['stage_grid']:>5} {r['heads']:>5} {r['windows']:>7} {r['torch_ms']:>9.2f} {r['linattn_ms']:>10.2f} "
              f"{r['ratio']:>5.2f}x")
    model = model_row(batch, reps)
    print(f"\nswin_t fwd+bwd, batch {batch} at 224 px: torchvision {model['torchvision_ms']:.0f} ms, "
          f"swapped {model['linattn_ms']:.0f} ms, ratio {model['ratio']:.2f}x")
    json_path, _ = write_results(args.out, "swin", {"machine": info, "attention": rows, "model": model})
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
