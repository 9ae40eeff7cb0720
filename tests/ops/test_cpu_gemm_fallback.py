"""The portable GEMM loop, used where torch exports no BLAS, gives the same results."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch, linattn
    from linattn import reference
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        for causal in (False, True):
            q, k, v = (torch.randn(2, 3, 150, 20, dtype=dtype, requires_grad=True) for _ in range(3))
            out = linattn.linear_attention(q, k, v, causal=causal)
            ref, _ = reference.linear_attention(q, k, v, causal=causal)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < tol, (dtype, causal, err)
            g = torch.autograd.grad(out.sum(), (q, k, v))
            gr = torch.autograd.grad(ref.sum(), (q, k, v))
            for a, b in zip(g, gr):
                err = ((a.double() - b).norm() / b.norm()).item()
                assert err < tol * 10, (dtype, causal, err)
    print("ok")
    """
)


def test_reference_gemm_loop():
    env = dict(os.environ, LINATTN_CPU_GEMM="reference")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
