"""Benchmark of linattn.forgetting_attention (the Forgetting Transformer, docs/methods.md §5.1) on the
CPU (fp32, B=1, H=8, D=64, causal) against what a PyTorch user has without it: SDPA with the
decay matrix D_ij = c_i − c_j as a dense float mask (built in the call, so the gates train through
it), FlexAttention with the decay as a score_mod (compiled forward only: its compiled CPU backward is
not supported), fla's naive_forgetting_attn (dense einsums) when fla is installed, and linattn's own
causal softmax without gates (what the gates cost). Round-robin in one process, medians; GFLOP/s
counts 2·T²·D per head (the causal half of 4·T²·D), next to the machine's fp32 GEMM rate.

    python -m benchmarks.bench_forgetting            # T 1024, 4096, 16384 (~5 min)
    python -m benchmarks.bench_forgetting --quick    # T 1024, 4096 (~1 min)

Writes results/forgetting.json.
"""
import argparse

import torch
import torch.nn.functional as F

import linattn
from benchmarks.common import gemm_gflops, interleaved_medians, machine_info, write_results

B, H, D = 1, 8, 64
BASELINE = "linattn"
PLAIN = "linattn causal softmax (no gates)"


def make_inputs(T, requires_grad):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(B, H, T, generator=g) + 3)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, log_f)]


def dense_decay(log_f, T):
    """The (B, H, T, T) float mask: c_i − c_j below the diagonal, −inf above."""
    c = log_f.cumsum(-1)
    decay = c.unsqueeze(-1) - c.unsqueeze(-2)
    return decay.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))


def implementations(T, dense_max):
    """name -> (fn(q, k, v, log_f), trainable on the CPU)."""
    impls = {
        BASELINE: (lambda q, k, v, f: linattn.forgetting_attention(q, k, v, f), True),
        PLAIN: (lambda q, k, v, f: linattn.sliding_window_attention(q, k, v, -1, causal=True), True),
    }
    if T <= dense_max:
        impls["sdpa dense decay mask"] = (
            lambda q, k, v, f: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_decay(f, T)), True)
        try:
            from fla.ops.forgetting_attn.naive import naive_forgetting_attn
        except ImportError:
            naive_forgetting_attn = None
        if naive_forgetting_attn is not None:
            impls["fla naive"] = (lambda q, k, v, f: naive_forgetting_attn(
                *(x.transpose(1, 2) for x in (q, k, v, f))).transpose(1, 2), True)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # pragma: no cover - older torch
        create_block_mask = None
    if create_block_mask is not None and T <= 16384:
        block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T, device="cpu")
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(flex_attention, dynamic=False)

        def flex(q, k, v, f):
            c = f.cumsum(-1)
            return compiled(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - c[b, h, j],
                            block_mask=block_mask)

        impls["flex score_mod (compiled fwd)"] = (flex, False)
    return impls


def check_agreement(T=300):
    x = make_inputs(T, False)
    outs = {n: fn(*x) for n, (fn, _) in implementations(T, T).items() if n != PLAIN}
    for name, out in outs.items():
        err = (out - outs[BASELINE]).abs().max().item()
        assert err < 1e-4, f"{name} disagrees with linattn: max error {err:.2e}"


def forward_backward(fn):
    def run(*x):
        out = fn(*x)
        out.backward(torch.ones_like(out))
        for t in x:
            t.grad = None
    return run


def measure(T, reps, dense_max):
    impls = implementations(T, dense_max)
    x = make_inputs(T, False)
    with torch.no_grad():
        fwd = interleaved_medians({n: (lambda f=f: f(*x)) for n, (f, _) in impls.items()}, reps)
    xg = make_inputs(T, True)
    both = interleaved_medians({n: (lambda f=f: forward_backward(f)(*xg)) for n, (f, train) in impls.items() if train},
                               max(1, reps // 2))
    return {"T": T, "forward_s": fwd, "forward_backward_s": both}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default by mode)")
    args = parser.parse_args()
    torch.manual_seed(0)
    check_agreement()
    info = machine_info()
    lengths = args.lengths or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    reps, dense_max = (3, 4096) if args.quick else (5, 4096)
    gemm = gemm_gflops()
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}; fp32 GEMM {gemm:.1f} GFLOP/s")
    rows = [measure(T, reps, dense_max) for T in lengths]
    print(f"\nforgetting attention, causal, B={B} H={H} D={D}, fp32; median ms (ratio = other's time / linattn's)")
    for r in rows:
        T = r["T"]
        work = 2 * T * T * D * B * H
        for label, key in (("fwd", "forward_s"), ("fwd+bwd", "forward_backward_s")):
            t = r[key][BASELINE]
            line = f"T={T:>6} {label:>7} {t * 1e3:8.1f} ms"
            if key == "forward_s":
                line += f" {work / t / 1e9:6.1f} GFLOP/s ({work / t / 1e9 / gemm:4.0%} GEMM)"
            for n, other in r[key].items():
                if n != BASELINE:
                    line += f" | {n} {other * 1e3:.1f} ms ({other / t:.2f}x)"
            print(line)
    write_results(args.out, "forgetting", {"machine": info, "gemm_gflops": gemm, "B": B, "H": H, "D": D,
                                           "rows": rows})


if __name__ == "__main__":
    main()
