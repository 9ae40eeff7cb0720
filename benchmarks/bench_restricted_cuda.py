"""Restricted softmax on a CUDA GPU (issue 26): linattn's flash engine (the "fused" backend) and
its generic path against compiled FlexAttention with the same BlockMask and, where the dense mask
fits, SDPA; forward and forward+backward, medians of CUDA-event timings, bf16.

Patterns at B=4 H=16 T=16384 D=64, B=1 H=32 T=65536 D=128 and (Gemma's local layers' head dim)
B=2 H=8 T=16384 D=256: sliding windows w = 256 and 1024
(causal and both sides), Longformer (w = 512 with 16 global tokens) and BigBird (blocks of 64: 3
band blocks, 2 global, 3 random per row); at window 256 causal also the flash engine with
attention dropout 0.1 (FlexAttention has none). --quick: the first shape and four patterns (window 256
causal, window 1024, Longformer, BigBird): each pattern compiles FlexAttention's kernels anew. An
implementation that fails at a point (FlexAttention's kernels at D = 256 may not fit a GPU's
shared memory) gets a row saying why, and the run goes on.
TFLOP/s count the work the pattern needs (4·D per visible pair forward, 2.5x that
forward+backward, as FlashAttention counts); the
"peak" row is FlexAttention on full causal attention at the same shape, the tensor-core rate the
issue's 50% target refers to.

    python -m benchmarks.bench_restricted_cuda [--quick] [--out results]

Needs a GPU; prints a table and writes results/bench_restricted_cuda.json."""
import argparse

import torch

from benchmarks.bench_cuda import cuda_median_ms
from benchmarks.common import write_results
from linattn import ops
from linattn.ops.restricted import Pattern

SHAPES = {"quick": [(4, 16, 16384, 64)], "full": [(4, 16, 16384, 64), (1, 32, 65536, 128), (2, 8, 16384, 256)]}
QUICK_PATTERNS = ("window 256 causal", "window 1024", "longformer 512 + 16 global", "bigbird 64 (3+2+3)")


def visible_pairs(mask_mod, B, T, device, rows=1024):
    """The pairs a FlexAttention mask_mod keeps, summed over the batch (one head), by row chunks."""
    b = torch.arange(B, device=device)[:, None, None]
    keys = torch.arange(T, device=device)[None, None, :]
    total = 0
    for start in range(0, T, rows):
        queries = torch.arange(start, min(T, start + rows), device=device)[None, :, None]
        total += int(mask_mod(b, 0, queries, keys).expand(B, -1, -1).sum())
    return total


def patterns(B, T, device):
    """(name, linattn Pattern, the same pattern as a FlexAttention mask_mod)."""
    out = []
    for w in (256, 1024):
        for causal in (True, False):
            right = 0 if causal else w
            out.append((f"window {w}{' causal' if causal else ''}", Pattern(window=(w, w), causal=causal),
                        lambda b, h, q, k, w=w, r=right: (q - k <= w) & (k - q <= r)))
    glob = torch.zeros(B, T, dtype=torch.bool, device=device)
    glob[:, torch.linspace(0, T - 1, 16, device=device).long()] = True
    out.append(("longformer 512 + 16 global", Pattern(window=(512, 512), global_mask=glob),
                lambda b, h, q, k: ((q - k).abs() <= 512) | glob[b, q] | glob[b, k]))
    n = T // 64
    g = torch.Generator(device="cpu").manual_seed(0)
    layout = torch.zeros(n, n, dtype=torch.bool)
    rows = torch.arange(n)
    for d in (-1, 0, 1):
        layout[rows, (rows + d).clamp(0, n - 1)] = True
    layout[:, :2] = True
    layout[:2, :] = True
    for r in range(n):
        layout[r, torch.randint(0, n, (3,), generator=g)] = True
    layout = layout.to(device)
    out.append(("bigbird 64 (3+2+3)", Pattern(layout=layout[None], block_size=64),
                lambda b, h, q, k: layout[q // 64, k // 64]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    rows = []
    for B, H, T, D in SHAPES["quick" if args.quick else "full"]:
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        scale = D ** -0.5

        def timed(run):
            fwd = cuda_median_ms(lambda: run())
            both = cuda_median_ms(lambda: run().backward(grad))
            return fwd, both

        def failed(pattern_name, impl, error):
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            rows.append({"shape": (B, H, T, D), "pattern": pattern_name, "impl": impl, "error": message})
            print(f"B={B} H={H} T={T} D={D} {pattern_name:28s} {impl:16s} failed: {message}", flush=True)
            torch.cuda.empty_cache()

        causal_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T)
        peak_rate = None  # FlexAttention's causal TFLOP/s forward, None where it failed
        try:
            peak_fwd, peak_both = timed(lambda: flex(q, k, v, block_mask=causal_mask, scale=scale))
            causal_flops = 4 * D * T * (T + 1) / 2 * B * H
            peak_rate = causal_flops / peak_fwd / 1e9
            rows.append({"shape": (B, H, T, D), "pattern": "full causal (peak)", "impl": "flex",
                         "fwd_ms": peak_fwd, "fwd_bwd_ms": peak_both, "fwd_tflops": peak_rate,
                         "fwd_bwd_tflops": 2.5 * causal_flops / peak_both / 1e9})
        except Exception as error:  # noqa: BLE001 - a failing row is reported, not fatal
            failed("full causal (peak)", "flex", error)
        for name, pattern, mask_mod in patterns(B, T, "cuda"):
            if args.quick and name not in QUICK_PATTERNS:
                continue
            block_mask = create_block_mask(mask_mod, B if pattern.global_mask is not None else None, None, T, T)
            visible = visible_pairs(mask_mod, B, T, "cuda")  # over the batch
            implementations = {"flex": lambda: flex(q, k, v, block_mask=block_mask, scale=scale)}
            for backend in ("fused", "generic"):
                def run(backend=backend):
                    ops.set_cuda_backend(backend)
                    return ops.restricted.restricted_softmax(q, k, v, scale, pattern)[0]
                implementations[f"linattn {backend}"] = run
            if name == "window 256 causal":  # the flash engine's attention dropout (its keep bits drawn in registers)
                dropped = Pattern(**{**pattern.__dict__, "dropout_p": 0.1,
                                     "dropout_seed": ops.restricted.dropout_seed_from()})

                def run_dropped():
                    ops.set_cuda_backend("fused")
                    return ops.restricted.restricted_softmax(q, k, v, scale, dropped)[0]
                implementations["linattn fused p=0.1"] = run_dropped
            for impl, run in implementations.items():
                try:
                    fwd, both = timed(run)
                except Exception as error:  # noqa: BLE001 - a failing row is reported, not fatal
                    failed(name, impl, error)
                    continue
                flops = 4 * D * visible * H
                of_peak = flops / fwd / 1e9 / peak_rate if peak_rate else None
                rows.append({"shape": (B, H, T, D), "pattern": name, "impl": impl, "fwd_ms": fwd, "fwd_bwd_ms": both,
                             "fwd_tflops": flops / fwd / 1e9, "fwd_bwd_tflops": 2.5 * flops / both / 1e9,
                             "fwd_of_peak": of_peak})
                print(f"B={B} H={H} T={T} D={D} {name:28s} {impl:16s} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  "
                      f"{rows[-1]['fwd_tflops']:6.1f} / {rows[-1]['fwd_bwd_tflops']:6.1f} TFLOP/s "
                      + (f"({of_peak:.0%} of FlexAttention's causal rate)" if of_peak else "(no FlexAttention peak)"),
                      flush=True)
    ops.set_cuda_backend("generic")
    path, _ = write_results(args.out, "bench_restricted_cuda", {"device": torch.cuda.get_device_name(), "rows": rows})
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
