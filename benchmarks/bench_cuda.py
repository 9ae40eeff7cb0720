"""Linear attention on a CUDA GPU: linattn's fused kernels and its generic path against SDPA
(flash backend where it applies) and flash-linear-attention when importable ("fused" runs the
tensor-core forward and backward for bf16, "fused-simt" the same calls on the SIMT kernels); forward and
forward+backward, medians of CUDA-event timings. Linear attention on a GPU is bound by memory
traffic, so each row also gives the bandwidth of reading q, k, v and writing o once, next to a
device-to-device copy measured in the same run (the floor of the issue's targets).

    python -m benchmarks.bench_cuda [--quick] [--out results]

Needs a GPU; prints a table and writes results/bench_cuda.json."""
import argparse
import os
import statistics

import torch
import torch.nn.functional as F

import linattn
from benchmarks.common import write_results

# (B, H, D): lengths with --quick (the CUDA issue's target points), lengths otherwise.
CONFIGS = {(8, 32, 128): ([4096, 16384], [1024, 4096, 16384]), (1, 8, 64): ([65536], [1024, 4096, 16384, 65536])}


def cuda_median_ms(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(reps):
    """Bytes read plus written per second by a device-to-device copy of 1 GiB."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def time_into(row, forward, forward_backward, reps):
    """row["fwd_ms"] and row["fwd_bwd_ms"] (medians of `reps`), or row["error"]: one failing
    implementation must not end a GPU run. Returns whether both timings are there."""
    try:
        row["fwd_ms"] = cuda_median_ms(forward, reps)
        row["fwd_bwd_ms"] = cuda_median_ms(forward_backward, reps)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as error:  # noqa: BLE001 - reported in the row
        row["error"] = f"{type(error).__name__}: {error}"[:300]
    torch.cuda.empty_cache()
    return "fwd_bwd_ms" in row


def flash_linear_attention():
    """FLA's chunk kernels for plain, gated (a log-gate per token) and GLA (per channel) linear
    attention, or None when it does not import."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn  # flash-linear-attention, optional
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_linear_attn, chunk_simple_gla, chunk_gla


def implementations(causal, fla, gate=None):
    """name -> fn(q, k, v) at one point; with a (B, H, T) log-gate, or a (B, H, T, D) one (GLA), only
    those that take one."""
    def linattn_with(backend):
        def run(q, k, v):
            linattn.set_cuda_backend(backend)
            return linattn.linear_attention(q, k, v, causal=causal, gate=gate)
        return run

    def bthd(t):
        return t.transpose(1, 2)

    if gate is not None:
        impls = {"fused": linattn_with("fused"), "generic": linattn_with("generic")}
        if fla is not None and gate.dim() == 3:
            # FLA's simple GLA: the same per-token scalar log-gate, no feature map, no normalizer.
            impls["fla"] = lambda q, k, v: bthd(fla[1](bthd(q), bthd(k), bthd(v), g=bthd(gate))[0])
        elif fla is not None:
            # FLA's GLA: the same per-channel log-gates, no feature map, no normalizer.
            impls["fla"] = lambda q, k, v: bthd(fla[2](bthd(q), bthd(k), bthd(v), g=bthd(gate))[0])
        return impls

    # "fused-simt" is the fused backend with LINATTN_TENSOR_CORES=0, which measure() sets around
    # both its timings (the backward runs outside the call).
    impls = {"fused": linattn_with("fused"), "fused-simt": linattn_with("fused"), "generic": linattn_with("generic"),
             "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    if fla is not None and causal:
        # FLA's chunk kernel takes (B, T, H, D) and has no normalizer: the same memory traffic.
        impls["fla"] = lambda q, k, v: bthd(fla[0](bthd(q), bthd(k), bthd(v), normalize=False)[0])
    return impls


def points(causal, dtype, lengths, quick):
    """(T, gating) at one configuration: "" none, "gated" a log-gate per token, "gla" one per channel;
    the fading rows causal only, in bf16 (the issue's target dtype); GLA at the shortest length only
    with --quick (a lent GPU's minutes)."""
    kinds = ("", "gated", "gla") if causal and dtype == torch.bfloat16 else ("",)
    return [(T, g) for T in lengths for g in kinds if g != "gla" or not quick or T == lengths[0]]


def measure(args):
    fla = flash_linear_attention()
    reps = 3 if args.quick else 7
    bandwidth = copy_bandwidth(reps)
    rows = []
    previous_backend = linattn.cuda_backend()
    for (B, H, D), (quick_lengths, lengths) in CONFIGS.items():
        for dtype in (torch.bfloat16, torch.float32):
            for causal in (True, False):
                for T, gating in points(causal, dtype, quick_lengths if args.quick else lengths, args.quick):
                    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
                    grad = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
                    # log-gates in [log 0.9, 0): a state that fades over tens of tokens, as trained GLA's do
                    gate_shape = (B, H, T) if gating == "gated" else (B, H, T, D)
                    gate = torch.rand(gate_shape, device="cuda").mul(-0.105) if gating else None
                    io_bytes = 4 * B * H * T * D * q.element_size()
                    floor_ms = io_bytes / bandwidth * 1e3
                    for name, fn in implementations(causal, fla, gate).items():
                        if name == "sdpa" and T > args.sdpa_max_T:
                            continue
                        if name == "fused-simt" and (dtype == torch.float32 or args.quick):
                            # float32 has no tensor-core path ("fused" is the SIMT kernel); --quick
                            # leaves out the superseded SIMT kernel to fit a lent GPU's minutes
                            continue
                        row = dict(B=B, H=H, D=D, T=T, dtype=str(dtype).split(".")[-1], causal=causal,
                                   gated=bool(gating), gla=gating == "gla", impl=name, floor_ms=floor_ms)
                        if name == "fused-simt":
                            os.environ["LINATTN_TENSOR_CORES"] = "0"
                        try:
                            if time_into(row, lambda: fn(q, k, v),
                                         lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad), reps):
                                row["fwd_vs_floor"] = row["fwd_ms"] / floor_ms
                        finally:
                            os.environ.pop("LINATTN_TENSOR_CORES", None)
                        rows.append(row)
                        print(_format(row), flush=True)
    linattn.set_cuda_backend(previous_backend)
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bytes_per_s=bandwidth,
                fla=fla is not None, rows=rows)


def _format(row):
    times = (f"fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row['fwd_bwd_ms']:9.3f} ms  fwd/floor {row['fwd_vs_floor']:6.2f}x"
             if "fwd_bwd_ms" in row else row["error"])
    return (f"B={row['B']} H={row['H']} D={row['D']} T={row['T']:6d} {row['dtype']:8s} "
            f"{'causal' if row['causal'] else 'full  '} {_gating(row):5s} {row['impl']:8s} {times}")


def _gating(row):
    return "gla" if row.get("gla") else "gated" if row.get("gated") else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two lengths, three repetitions")
    parser.add_argument("--out", default="results")
    parser.add_argument("--sdpa-max-T", type=int, default=16384, help="longest T for quadratic SDPA")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda needs a CUDA GPU")
    payload = measure(args)
    print(f"device {payload['device']}, copy {payload['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")
    write_results(args.out, "bench_cuda", payload)


if __name__ == "__main__":
    main()
