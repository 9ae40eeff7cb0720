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
    python -m benchmarks.bench_swin --device cuda --dtype bfloat16 --batch 32 --quick
                                               # on a GPU: linattn's fused backend (the flash
                                               # engine) against torchvision's, both in bfloat16

Writes results/swin.json (swin_cuda.json on a GPU). ratio > 1 means linattn is faster.
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


def synchronized(fns, device):
    """On a GPU each timed call ends when its kernels do."""
    if device == "cpu":
        return fns

    def wrap(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return {name: wrap(fn) for name, fn in fns.items()}


def attention_rows(batch, reps, device="cpu", dtype=torch.float32):
    rows = []
    for side, heads in STAGES:
        windows = (side // WINDOW) ** 2
        G, N = batch * windows, WINDOW * WINDOW
        make = dict(device=device, dtype=dtype)
        q, k, v = (torch.randn(G, heads, N, HEAD_DIM, **make, requires_grad=True) for _ in range(3))
        bias = torch.randn(heads, N, N, **make, requires_grad=True)
        shifted = side > WINDOW
        regions = shifted_window_regions(side, side, [WINDOW] * 2, [WINDOW // 2] * 2) if shifted else None
        if regions is not None:
            regions = regions.to(device)
        mask = None if regions is None else (regions[:, None, :] != regions[:, :, None]).to(dtype) * -100.0
        grad = torch.randn(G, heads, N, HEAD_DIM, **make)
        fns = {
            "torch": lambda: torch_window_attention(q, k, v, bias, mask).backward(grad),
            "linattn": lambda: linattn.swin_attention(q, k, v, bias=bias, regions=regions).backward(grad),
        }
        t = interleaved_medians(synchronized(fns, device), reps)
        rows.append({"stage_grid": side, "heads": heads, "windows": G, "torch_ms": t["torch"] * 1e3,
                     "linattn_ms": t["linattn"] * 1e3, "ratio": t["torch"] / t["linattn"]})
    return rows


def model_row(batch, reps, device="cpu", dtype=torch.float32):
    from torchvision.models import swin_t

    torch.manual_seed(0)
    model = swin_t().train().to(device=device, dtype=dtype)
    swapped = linattn.swap_attention(copy.deepcopy(model), "linear")
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).float().sum().backward()

    fns = {"torchvision": lambda: step(model), "linattn": lambda: step(swapped)}
    t = interleaved_medians(synchronized(fns, device), reps)
    return {"batch": batch, "torchvision_ms": t["torchvision"] * 1e3, "linattn_ms": t["linattn"] * 1e3,
            "ratio": t["torchvision"] / t["linattn"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    batch, reps = (1, 3) if args.quick else (4, 7)
    batch = args.batch or batch
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda"):
        linattn.set_cuda_backend("fused")  # the flash engine
    info = machine_info()
    print(f"# {info} {args.device} {args.dtype}")
    rows = attention_rows(batch, reps * 3, args.device, dtype)
    print("\nwindow attention fwd+bwd (N=49, D=32, bias + shifted mask)")
    print(f"{'grid':>5} {'heads':>5} {'windows':>7} {'torch ms':>9} {'linattn ms':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['stage_grid']:>5} {r['heads']:>5} {r['windows']:>7} {r['torch_ms']:>9.2f} {r['linattn_ms']:>10.2f} "
              f"{r['ratio']:>5.2f}x")
    model = model_row(batch, reps, args.device, dtype)
    print(f"\nswin_t fwd+bwd, batch {batch} at 224 px: torchvision {model['torchvision_ms']:.0f} ms, "
          f"swapped {model['linattn_ms']:.0f} ms, ratio {model['ratio']:.2f}x")
    name = "swin" if args.device == "cpu" else "swin_cuda"
    json_path, _ = write_results(args.out, name, {"machine": info, "device": args.device, "dtype": args.dtype,
                                                  "attention": rows, "model": model})
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
