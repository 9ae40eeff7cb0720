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

# The repository root: the worker subprocesses import this file as tests.ops.test_cpu_isa from it.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ISAS = ("base", "avx2", "avx512")
SUPPORTED = ISAS[: ISAS.index(torch.ops.linattn.cpu_isa()) + 1]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Run in a subprocess: computes every kernel's outputs and input gradients and saves them.
WORKER = r"""
import sys, torch, linattn
from tests.ops.test_cpu_isa import edge_inputs, swin_bias
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
        "swin": lambda: linattn.swin_attention(q[:, :, :49], k[:, :, :49], v[:, :, :49], bias=swin_bias(dtype),
                                                 regions=linattn.swin.shifted_window_regions(7, 14, [7, 7], [3, 3])),
        "window_edge": lambda: linattn.sliding_window_attention(*edge_inputs(q, k, v), 9),
    }
    for name, call in calls.items():
        out = call()
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results[(name, str(dtype))] = [t.detach() for t in (out, *grads)]
torch.save(results, sys.argv[1])
"""


def swin_bias(dtype):
    """A Swin relative-position bias for 3 heads of 7×7 windows, the same in every process."""
    return torch.randn(3, 49, 49, generator=torch.Generator().manual_seed(5)).to(dtype)


def edge_inputs(q, k, v):
    """q, k, v with a NaN key row and an infinite value entry: the rows whose window holds them
    get NaN, the others must not (the reductions of each build skip masked and NaN scores)."""
    k = torch.where(torch.arange(77).view(1, 1, 77, 1) == 5, float("nan"), k)
    v = torch.where(torch.arange(77).view(1, 1, 77, 1) == 60, float("inf"), v)
    return q, k, v


def run_build(isa, path):
    env = dict(os.environ, LINATTN_CPU_ISA=isa, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
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
        "swin": lambda: reference.swin_attention(q[:, :, :49], k[:, :, :49], v[:, :, :49], bias=swin_bias(torch.float64),
                                                   regions=linattn.swin.shifted_window_regions(7, 14, [7, 7], [3, 3])),
    }
    out = calls[name]()
    return [out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))]


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ("linear", "linear_causal", "window", "block", "swin"))
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


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_build_handles_nan_and_inf_alike(builds, isa, dtype):
    """A NaN key and an infinite value reach exactly the rows whose window holds them, in every
    build (their row reductions are written per instruction set)."""
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU does not run the {isa} build (widest: {SUPPORTED[-1]})")
    out = builds[isa][("window_edge", str(dtype))][0]
    rows_with_nan = out.isnan().any(-1)
    expected = torch.zeros(77, dtype=torch.bool)
    expected[:5 + 10] = True  # |i - 5| <= 9 sees the NaN key
    assert torch.equal(rows_with_nan, expected.expand_as(rows_with_nan))
    assert out[..., 51:70, :].isinf().any() and out[..., 20:50, :].isfinite().all()
    default = builds[SUPPORTED[-1]][("window_edge", str(dtype))]
    for what, g, d in zip(("out", "dq", "dk", "dv"), builds[isa][("window_edge", str(dtype))], default):
        torch.testing.assert_close(g, d, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], equal_nan=True,
                                   msg=f"{isa} vs default: {what}")
