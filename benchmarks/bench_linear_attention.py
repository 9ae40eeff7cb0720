"""Benchmark of linattn.linear_attention on the CPU against SDPA and pure PyTorch.

fp32, B=1, H=8, D=64, T from 256 to 65536; forward and forward+backward, causal and not.
Every implementation is timed in the same run, round-robin, and quoted as a median; ratios
are taken between numbers of this run only. Achieved GFLOP/s of linattn (forward, and
forward+backward with the backward counted as twice the forward) is shown next to the
machine's fp32 GEMM rate (torch.mm 2048×2048) measured in the same run. Extra rows: bf16
inputs (B=1, H=8, T=4096), and one long sequence (B=H=1, T=65536, causal: the
sequence-parallel kernel) on all threads and on one thread, next to the same tokens as two
independent heads of T/2 (the scaling this machine allows without sequence parallelism). Peak memory is measured in a
fresh process per point (peak RSS above the process's baseline).

    python -m benchmarks.bench_linear_attention            # full table (several minutes)
    python -m benchmarks.bench_linear_attention --quick    # smoke run, about a minute

Writes results/linear_attention.json and results/linear_attention.png.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

import linattn
from benchmarks.common import (current_rss_bytes, gemm_gflops, interleaved_medians, machine_info, median_time,
                               peak_rss_bytes,
                               reset_peak_rss,
                               run_child, write_results)
from benchmarks.linear_attention_formulations import linear_attention_chunked, linear_attention_einsum

B, H, D = 1, 8, 64
CHUNK = 64  # the causal chunk of the CPU kernel, for the FLOP count


def implementations(causal):
    """name -> fn(q, k, v) returning the attention output."""
    impls = {
        "linattn": lambda q, k, v: linattn.linear_attention(q, k, v, causal=causal),
        "pytorch": (lambda q, k, v: linear_attention_chunked(q, k, v)) if causal else linear_attention_einsum,
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    return impls


def linattn_flops(T, causal):
    """Useful FLOPs of the chunked algorithm (docs/methods.md §1), per forward."""
    per_head = 4 * T * D * D + (2 * T * CHUNK * 2 * D if causal else 0)
    return B * H * per_head


def make_inputs(T, requires_grad, heads=H, dtype=torch.float32):
    g = torch.Generator().manual_seed(T)
    return [torch.randn(B, heads, T, D, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def forward_backward(fn, q, k, v):
    out = fn(q, k, v)
    out.backward(torch.ones_like(out))
    q.grad = k.grad = v.grad = None


def check_agreement(T=257):
    """All formulations compute the same function (SDPA aside, which is another one)."""
    q, k, v = make_inputs(T, False)
    for causal in (False, True):
        impls = implementations(causal)
        a, b = impls["linattn"](q, k, v), impls["pytorch"](q, k, v)
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-5, f"linattn and the pure-PyTorch formulation disagree (causal={causal}): {err}"


def measure_memory(impl, T, causal):
    """Child-process entry: peak bytes above baseline for one forward+backward."""
    fn = implementations(causal)[impl]
    reset_peak_rss()
    baseline = current_rss_bytes()
    q, k, v = make_inputs(T, True)
    forward_backward(fn, q, k, v)
    peak = peak_rss_bytes() - baseline
    ideal = 3 * q.nbytes + q.nbytes + 3 * q.nbytes  # inputs + output + input gradients
    return {"peak_bytes": peak, "inputs_outputs_grads_bytes": ideal}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--out", default="results", help="folder for JSON and PNG")
    parser.add_argument("--sdpa-max-T", type=int, default=16384, help="longest T for quadratic SDPA")
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "T", "CAUSAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        impl, T, causal = args.memory_child
        print(json.dumps(measure_memory(impl, int(T), causal == "1")))
        return

    lengths = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384, 65536]
    memory_lengths = [4096] if args.quick else [65536]
    sdpa_max_T = min(args.sdpa_max_T, 4096) if args.quick else args.sdpa_max_T
    check_agreement()
    info = machine_info()
    gemm = gemm_gflops(reps=3 if args.quick else 7)
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}; fp32 GEMM {gemm:.1f} GFLOP/s")

    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is only for the progress bar
        def tqdm(x, **_):
            return x
    points = [(T, causal) for causal in (False, True) for T in lengths]
    for T, causal in tqdm(points, desc="linear attention", file=sys.stderr):
        impls = implementations(causal)
        if T > sdpa_max_T:
            impls.pop("sdpa")
        reps = 3 if (args.quick or T >= 16384) else 7
        q, k, v = make_inputs(T, False)
        with torch.no_grad():
            fwd = interleaved_medians({n: (lambda f=f: f(q, k, v)) for n, f in impls.items()}, reps)
        qg, kg, vg = make_inputs(T, True)
        fwd_bwd = interleaved_medians({n: (lambda f=f: forward_backward(f, qg, kg, vg)) for n, f in impls.items()},
                                      reps)
        row = {"T": T, "causal": causal, "forward_s": fwd, "forward_backward_s": fwd_bwd,
               "linattn_forward_gflops": linattn_flops(T, causal) / fwd["linattn"] / 1e9,
               "linattn_forward_backward_gflops": 3 * linattn_flops(T, causal) / fwd_bwd["linattn"] / 1e9}
        rows.append(row)

    extra = extra_rows(args.quick)

    memory = []
    for T in memory_lengths:
        for causal in (False, True):
            for impl in ("linattn", "pytorch"):
                m = run_child(["benchmarks.bench_linear_attention", "--memory-child", impl, str(T), str(int(causal))])
                memory.append({"T": T, "causal": causal, "impl": impl, **m})

    # The GEMM rate again after the run; the higher of the two is the reference (the
    # conservative choice when the machine's clock or load drifted during the run).
    gemm = max(gemm, gemm_gflops(reps=3 if args.quick else 7))
    print(f"fp32 GEMM rate used for %GEMM (best of before and after the run): {gemm:.1f} GFLOP/s")
    print_table(rows, memory, gemm)
    print_extra(extra, gemm)
    payload = {"machine": info, "gemm_gflops": gemm, "B": B, "H": H, "D": D, "dtype": "float32", "rows": rows,
               "extra_rows": extra, "memory": memory, "quick": args.quick, "cpu_isa": torch.ops.linattn.cpu_isa()}
    json_path, png_path = write_results(args.out, "linear_attention", payload, plot(rows))
    print(f"wrote {json_path} and {png_path}")


def extra_rows(quick):
    """bf16 at T=4096 (H=8), and one long causal sequence (H=1) on all threads and on one."""
    reps = 3 if quick else 7
    rows = []
    for causal in (False, True):
        impls = implementations(causal)
        impls.pop("sdpa")
        q, k, v = make_inputs(4096, True, dtype=torch.bfloat16)
        with torch.no_grad():
            fwd = interleaved_medians({n: (lambda f=f: f(q, k, v)) for n, f in impls.items()}, reps)
        fwd_bwd = interleaved_medians({n: (lambda f=f: forward_backward(f, q, k, v)) for n, f in impls.items()}, reps)
        rows.append({"what": "bf16", "T": 4096, "heads": H, "causal": causal, "threads": torch.get_num_threads(),
                     "forward_s": fwd, "forward_backward_s": fwd_bwd,
                     "linattn_forward_gflops": linattn_flops(4096, causal) / fwd["linattn"] / 1e9,
                     "linattn_forward_backward_gflops": 3 * linattn_flops(4096, causal) / fwd_bwd["linattn"] / 1e9})
    # One long sequence (the sequence-parallel kernel), and as the machine's own bound the same
    # tokens as two independent heads of half the length (no sequence parallelism needed).
    T = 16384 if quick else 65536
    all_threads = torch.get_num_threads()
    fn = implementations(True)["linattn"]
    for what, heads, length in (("B=H=1", 1, T), ("2 heads", 2, T // 2)):
        q, k, v = make_inputs(length, True, heads=heads)
        for threads in (all_threads, 1):
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    fwd = {"linattn": median_time(lambda: fn(q, k, v), reps)}
                fwd_bwd = {"linattn": median_time(lambda: forward_backward(fn, q, k, v), reps)}
            finally:
                torch.set_num_threads(all_threads)
            flops = linattn_flops(length, True) / H * heads
            rows.append({"what": what, "T": length, "heads": heads, "causal": True, "threads": threads,
                         "forward_s": fwd, "forward_backward_s": fwd_bwd,
                         "linattn_forward_gflops": flops / fwd["linattn"] / 1e9,
                         "linattn_forward_backward_gflops": 3 * flops / fwd_bwd["linattn"] / 1e9})
    return rows


def print_extra(extra, gemm):
    print(f"{'row':<8}{'mode':<8}{'T':>7}{'H':>3}{'thr':>4} | {'fwd ms':>8} {'%GEMM':>6} {'vs torch':>8} |"
          f" {'fwd+bwd ms':>10} {'%GEMM':>6} {'vs torch':>8}")
    for r in extra:
        f, fb = r["forward_s"], r["forward_backward_s"]

        def ratio(d):
            return f"{d['pytorch'] / d['linattn']:7.1f}x" if "pytorch" in d else f"{'-':>8}"

        print(f"{r['what']:<8}{'causal' if r['causal'] else 'full':<8}{r['T']:>7}{r['heads']:>3}{r['threads']:>4} |"
              f" {f['linattn'] * 1e3:8.2f} {100 * r['linattn_forward_gflops'] / gemm:5.0f}% {ratio(f)} |"
              f" {fb['linattn'] * 1e3:10.2f} {100 * r['linattn_forward_backward_gflops'] / gemm:5.0f}% {ratio(fb)}")
    for what, label in (("B=H=1", "one sequence (sequence-parallel kernel)"),
                        ("2 heads", "the same tokens as 2 independent heads (this machine's bound)")):
        scaling = [r for r in extra if r["what"] == what]
        if len(scaling) == 2:
            many, one = scaling
            print(f"thread scaling, {label}, causal, H={many['heads']} T={many['T']}: {many['threads']} threads "
                  f"vs 1: forward {one['forward_s']['linattn'] / many['forward_s']['linattn']:.2f}x, "
                  f"forward+backward {one['forward_backward_s']['linattn'] / many['forward_backward_s']['linattn']:.2f}x")


def print_table(rows, memory, gemm):
    header = (f"{'mode':<10}{'T':>7} | {'fwd ms':>8} {'GFLOP/s':>8} {'%GEMM':>6} {'vs sdpa':>8} {'vs torch':>8} |"
              f" {'fwd+bwd ms':>10} {'%GEMM':>6} {'vs sdpa':>8} {'vs torch':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        f, fb = r["forward_s"], r["forward_backward_s"]

        def ratio(d, other):
            return f"{d[other] / d['linattn']:7.1f}x" if other in d else f"{'-':>8}"

        print(f"{'causal' if r['causal'] else 'full':<10}{r['T']:>7} | {f['linattn'] * 1e3:8.2f}"
              f" {r['linattn_forward_gflops']:8.1f} {100 * r['linattn_forward_gflops'] / gemm:5.0f}%"
              f" {ratio(f, 'sdpa')} {ratio(f, 'pytorch')} | {fb['linattn'] * 1e3:10.2f}"
              f" {100 * r['linattn_forward_backward_gflops'] / gemm:5.0f}% {ratio(fb, 'sdpa')} {ratio(fb, 'pytorch')}")
    print("ratios: other implementation's median time / linattn's (higher = linattn faster)")
    for m in memory:
        print(f"peak memory fwd+bwd {m['impl']:<8} {'causal' if m['causal'] else 'full':<7} T={m['T']}: "
              f"{m['peak_bytes'] / 2**20:8.1f} MiB = {m['peak_bytes'] / m['inputs_outputs_grads_bytes']:.2f}x "
              f"inputs+outputs+grads ({m['inputs_outputs_grads_bytes'] / 2**20:.1f} MiB)")


def plot(rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, causal in enumerate((False, True)):
        for row_i, key in enumerate(("forward_s", "forward_backward_s")):
            ax = axes[row_i][col]
            sel = [r for r in rows if r["causal"] == causal]
            for impl in ("linattn", "pytorch", "sdpa"):
                pts = [(r["T"], r[key][impl] * 1e3) for r in sel if impl in r[key]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'causal' if causal else 'non-causal'} {'forward' if row_i == 0 else 'forward+backward'}")
            ax.set_xlabel("T")
            ax.set_ylabel("median ms")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(f"linear attention, fp32 CPU, B={B} H={H} D={D}")
    return fig


if __name__ == "__main__":
    main()
