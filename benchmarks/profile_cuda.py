"""The program scripts/gpu_profile.sh runs under Nsight Compute (ncu): one call, forward and
backward, of each tensor-core engine at the CUDA issues' benchmark shapes, bfloat16 — linear
attention (causal, B=8 H=32 D=128 T=4096), the delta rule (the same shape, H=16) and the flash
engine (sliding window 256, causal, B=4 H=16 T=16384 D=64) — so that the profile says what
limits each kernel (occupancy, warp stalls, issue slots, memory throughput) where the benchmark
only says how long it took. No warm-up: ncu replays each kernel on its own.

    python -m benchmarks.profile_cuda [--only linear|delta|flash]
"""
import argparse

import torch

import linattn
from linattn import ops
from linattn.ops.restricted import Pattern


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)


def linear():
    q, k, v = (randn(8, 32, 4096, 128) for _ in range(3))
    out = linattn.linear_attention(q, k, v, causal=True)
    out.backward(torch.randn_like(out))


def delta():
    q, k, v = (randn(8, 16, 4096, 128) for _ in range(3))
    beta = torch.rand(8, 16, 4096, device="cuda", dtype=torch.bfloat16).requires_grad_()
    out = linattn.delta_rule_attention(q, k, v, beta)
    out.backward(torch.randn_like(out))


def flash():
    q, k, v = (randn(4, 16, 16384, 64) for _ in range(3))
    out = ops.restricted.restricted_softmax(q, k, v, 64 ** -0.5, Pattern(window=(256, 256), causal=True))[0]
    out.backward(torch.randn_like(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("linear", "delta", "flash"))
    args = parser.parse_args()
    linattn.set_cuda_backend("fused")
    for name, run in (("linear", linear), ("delta", delta), ("flash", flash)):
        if args.only in (None, name):
            run()
            torch.cuda.synchronize()
            print(f"profiled: {name}", flush=True)


if __name__ == "__main__":
    main()
