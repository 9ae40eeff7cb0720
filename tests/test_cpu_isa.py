"""The CPU kernels are compiled once per x86 instruction set (csrc/common/cpu_isa.h) and the
widest one the CPU supports runs. Every build this CPU can run must compute the same functions:
each is run in a subprocess under LINATTN_CPU_ISA and compared with the float64 reference and
with the default build, forward and backward, at odd sizes, in every dtype."""
import os
import subprocess
import sys

import pytest
import torch

import linattn
from linattn import reference

ISAS = ("base", "avx2", "avx512")
SUPPORTED = ISAS[: ISAS.index(torch.ops.linattn.cpu_isa()) + 1]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Run in a subprocess: computes every kernel's outputs and input gradients and saves them.
WORKER = r"""
import sys, torch, linattn
torch.manual_seed(0)
results = {"isa": torch.ops.linattn.cpu_isa()}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    q, k, v = [torch.randn(2, 3, 77, 19, dtype=dtype).requires_grad_() for _ in range(3)]
    calls = {
        "linear": lambda: linattn.linear_attention(q, k, v),
        "linear_causal": lambda: linattn.linear_attention(q, k, v, causal=True),
        "window": lambda: linattn.sliding_window_attention(q, k, v, 9),
        "block": lambda: linattn.block_sparse_attention(
            q, k, v, linattn.bigbird_layout(77, 16, num_random=1, num_global=1, generator=torch.Generator().manual_seed(3)), 16),
    }
    for name, call in calls.items():
        out = call()
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results[(name, str(dtype))] = [t.detach() for t in (out, *grads)]
torch.save(results, sys.argv[1])
"""


def run_build(isa, path):
    env = dict(os.environ, LINATTN_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", WORKER, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpu_isa")
    return {isa: run_build(isa, folder / f"{isa}.pt") for isa in SUPPORTED}


def reference_results(name, dtype):
    torch.manual_seed(0)
    for d in DTYPES:  # the same draws as the worker
        q, k, v = [torch.randn(2, 3, 77, 19, dtype=d) for _ in range(3)]
        if d == dtype:
            break
    q, k, v = [t.double().requires_grad_() for t in (q, k, v)]
    calls = {
        "linear": lambda: reference.linear_attention(q, k, v)[0],
        "linear_causal": lambda: reference.linear_attention(q, k, v, causal=True)[0],
        "window": lambda: reference.sliding_window_attention(q, k, v, 9),
        "block": lambda: reference.block_sparse_attention(
            q, k, v, linattn.bigbird_layout(77, 16, num_random=1, num_global=1, generator=torch.Generator().manual_seed(3)), 16),
    }
    out = calls[name]()
    return [out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))]


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ("linear", "linear_causal", "window", "block"))
def test_every_build_matches_reference_and_default(builds, isa, dtype, name):
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU does not run the {isa} build (widest: {SUPPORTED[-1]})")
    got = builds[isa][(name, str(dtype))]
    assert builds[isa]["isa"] == isa
    expected = reference_results(name, dtype)
    for what, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        err = ((g.double() - e).norm() / e.norm().clamp_min(1e-30)).item()
        assert err < TOLERANCE[dtype], f"{isa} {name} {dtype} {what}: relative error {err:.2e}"
    # Builds differ only by vector width and fused multiply-adds: rounding-level differences.
    default = builds[SUPPORTED[-1]][(name, str(dtype))]
    for what, g, d in zip(("out", "dq", "dk", "dv"), got, default):
        torch.testing.assert_close(g, d, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], msg=f"{isa} vs default: {what}")


def test_unknown_isa_is_a_clear_error():
    env = dict(os.environ, LINATTN_CPU_ISA="sse9")
    proc = subprocess.run([sys.executable, "-c", "import torch, linattn; torch.ops.linattn.cpu_isa()"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "LINATTN_CPU_ISA must be one of base, avx2, avx512" in proc.stderr and "'sse9'" in proc.stderr
