"""The delta rule (DeltaNet, Gated DeltaNet, KDA) on a CUDA GPU: linattn's tensor-core forward and
backward ("fused": the fused backend) and its device-generic path against
flash-linear-attention's Triton chunk kernels when importable, with SDPA's causal flash softmax at
the same shape as the yardstick users compare with; forward and forward+backward, medians of
CUDA-event timings. Each row gives the forward's time over its memory floor (reading q, k, v, β,
g — KDA's a gate per key channel — and writing o once at the rate of a device-to-device copy
measured in the same run) and its
tensor-core rate (the chunkwise algorithm's multiply-adds per chunk of 64: K Kᵀ, T·[K | V], W·S,
Q Kᵀ, Q·S, P·u, Kᵀ·u).

    python -m benchmarks.bench_delta_cuda [--quick] [--out results]

Needs a GPU; prints a table and writes results/bench_delta_cuda.json."""
import argparse

import torch
import torch.nn.functional as F

import linattn
from benchmarks.bench_cuda import copy_bandwidth, time_into
from benchmarks.common import write_results

# (B, H, D): Gated DeltaNet layers of current hybrid models use 16-32 heads of 128.
CONFIGS = {(8, 16, 128): ([4096], [1024, 4096, 16384]), (1, 16, 128): ([16384], [4096, 16384, 65536])}


# A gate per token, none, a gate per key channel (KDA) last: under gpu_check.sh's time limit the
# rows written so far survive (measure writes the JSON after every row), and KDA's Triton kernels
# are the slowest to compile.
KINDS = ("gated", "plain", "kda")


def flash_linear_attention():
    try:
        from fla.ops.delta_rule import chunk_delta_rule  # flash-linear-attention, optional
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    try:
        from fla.ops.kda import chunk_kda
    except ImportError:  # (versions before KDA)
        chunk_kda = None
    return chunk_delta_rule, chunk_gated_delta_rule, chunk_kda


def implementations(kind, fla):
    def linattn_with(backend):
        def run(q, k, v, beta, g):
            linattn.set_cuda_backend(backend)
            return linattn.delta_rule_attention(q, k, v, beta, gate=None if kind == "plain" else g)
        return run

    impls = {"fused": linattn_with("fused"), "generic": linattn_with("generic"),
             "sdpa": lambda q, k, v, beta, g: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    if fla is not None and (kind != "kda" or fla[2] is not None):
        plain, gated_rule, kda = fla

        def run_fla(q, k, v, beta, g):
            # (B, T, H, D) layouts; q and k L2-normalised inside the kernel, as linattn's default.
            q, k, v, beta = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), beta.transpose(1, 2)
            if kind == "kda":
                return kda(q, k, v, g.transpose(1, 2), beta, use_qk_l2norm_in_kernel=True)[0]
            if kind == "gated":
                return gated_rule(q, k, v, g.transpose(1, 2), beta, use_qk_l2norm_in_kernel=True)[0]
            return plain(q, k, v, beta, use_qk_l2norm_in_kernel=True)[0]
        impls["fla"] = run_fla
    return impls


def chunk_multiply_adds(B, H, T, D):
    """The chunkwise forward's tensor-core multiply-adds (C = 64): per chunk K Kᵀ and Q Kᵀ (lower
    halves, C²D/2 each), T·K and T·V (C²D/2 each), W·S, Q·S and Kᵀ·u (C D² each), P·u (C²D/2)."""
    C = 64
    chunks = -(-T // C)
    return B * H * chunks * (5 * C * C * D / 2 + 3 * C * D * D)


def measure(args):
    fla = flash_linear_attention()
    reps = 3 if args.quick else 7
    bandwidth = copy_bandwidth(reps)
    rows = []
    previous_backend = linattn.cuda_backend()

    def payload(rows):
        return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bytes_per_s=bandwidth,
                    fla=fla is not None, rows=rows)

    dtype = torch.bfloat16
    for (B, H, D), (quick_lengths, lengths) in CONFIGS.items():
        for kind in KINDS:
            for T in quick_lengths if args.quick else lengths:
                q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
                beta = torch.rand(B, H, T, device="cuda", dtype=dtype).requires_grad_()
                channels = (D,) if kind == "kda" else ()
                g = (-0.05 * torch.rand(B, H, T, *channels, device="cuda")).to(dtype).requires_grad_()
                grad = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
                io_bytes = 4 * B * H * T * D * q.element_size() + B * H * T * beta.element_size()
                io_bytes += 0 if kind == "plain" else g.numel() * g.element_size()
                floor_ms = io_bytes / bandwidth * 1e3
                for name, fn in implementations(kind, fla).items():
                    if name == "sdpa" and (T > args.sdpa_max_T or kind != "gated"):
                        continue  # one softmax row per shape is enough
                    row = dict(B=B, H=H, D=D, T=T, kind=kind, impl=name, floor_ms=floor_ms)
                    inputs = (q, k, v, beta, g)
                    if time_into(row, lambda: fn(*inputs),
                                 lambda: torch.autograd.grad(fn(*inputs), (q, k, v, beta), grad), reps):
                        row["fwd_vs_floor"] = row["fwd_ms"] / floor_ms
                        if name != "sdpa":
                            row["fwd_tflops"] = 2 * chunk_multiply_adds(B, H, T, D) / (row["fwd_ms"] * 1e-3) / 1e12
                    rows.append(row)
                    print(_format(row), flush=True)
                    write_results(args.out, "bench_delta_cuda", payload(rows))
    linattn.set_cuda_backend(previous_backend)
    return payload(rows)


def _format(row):
    if "fwd_bwd_ms" not in row:
        times = row["error"]
    else:
        times = (f"fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row['fwd_bwd_ms']:9.3f} ms  "
                 f"fwd/floor {row['fwd_vs_floor']:6.2f}x  {row.get('fwd_tflops', float('nan')):6.1f} TFLOP/s")
    return (f"B={row['B']} H={row['H']} D={row['D']} T={row['T']:6d} {row['kind']:5s} "
            f"{row['impl']:8s} {times}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one length per shape, three repetitions")
    parser.add_argument("--out", default="results")
    parser.add_argument("--sdpa-max-T", type=int, default=16384, help="longest T for quadratic SDPA")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_delta_cuda needs a CUDA GPU")
    results = measure(args)
    print(f"device {results['device']}, copy {results['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")


if __name__ == "__main__":
    main()
