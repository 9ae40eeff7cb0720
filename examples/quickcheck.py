"""Quick check: linattn.linear_attention against the float64 reference, in every dtype,
causal and not, forward and backward; then one recurrent (chunk-by-chunk) run that must equal
the whole-sequence result. Prints a table; exits non-zero on any mismatch."""
import sys

import torch

import linattn
from linattn import reference

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 333, 64
    ok = True
    print(f"linattn {linattn.__version__}, torch {torch.__version__}, B={B} H={H} T={T} D={D}")
    print(f"{'dtype':<10}{'causal':<8}{'out err':>10}{'grad err':>10}{'tol':>8}  result")
    for dtype, tol in TOLERANCE.items():
        for causal in (False, True):
            q, k, v = (torch.randn(B, H, T, D).to(dtype).requires_grad_() for _ in range(3))
            out = linattn.linear_attention(q, k, v, causal=causal)
            ref, _ = reference.linear_attention(q, k, v, causal=causal)
            g = torch.randn_like(ref)
            grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
            grads_ref = torch.autograd.grad(ref, (q, k, v), g)
            e_out = rel(out, ref)
            e_grad = max(rel(a, b) for a, b in zip(grads, grads_ref))
            passed = e_out <= tol and e_grad <= tol
            ok &= passed
            print(f"{str(dtype)[6:]:<10}{str(causal):<8}{e_out:10.1e}{e_grad:10.1e}{tol:8.0e}  {'ok' if passed else 'FAIL'}")

    q, k, v = (torch.randn(1, H, T, D) for _ in range(3))
    whole = linattn.linear_attention(q, k, v, causal=True)
    state, pieces = None, []
    for start in range(0, T, 100):
        piece, state = linattn.linear_attention(q[:, :, start:start + 100], k[:, :, start:start + 100],
                                                v[:, :, start:start + 100], causal=True,
                                                initial_state=state, output_final_state=True)
        pieces.append(piece)
    e = rel(torch.cat(pieces, dim=2), whole)
    ok &= e <= 1e-5
    print(f"chunk-by-chunk with carried state vs whole sequence: {e:.1e}  {'ok' if e <= 1e-5 else 'FAIL'}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
