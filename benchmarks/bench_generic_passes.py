"""The device-generic linear attention (csrc/linear_attention/generic*.cpp): how many ATen operations
one call issues and how many bytes they allocate. On a GPU each operation that computes is a
kernel launch and each allocation a pass over memory; CUDA tensors run this path until the fused
kernels are proven on hardware, so these counts are its cost there. B=2 H=4 T=1024 D=64 bf16,
elu+1 features, normalized, forward (linear_attn_fwd_generic) and backward (linear_attn_bwd_generic),
causal, non-causal, causal with a fading state (per-token log factors: decay and gates), and
packed sequences (cu_seqlens) causal and not:

  - operations: the operator's direct ATen calls; "computing" leaves out views and empty
    allocations (no kernel);
  - bytes: what those calls allocate, as a multiple of the q, k, v and output bytes.

Counted twice, with a dispatch mode that sees every ATen call the operator's kernel makes:
  - on CPU tensors (the issue's measure);
  - on Meta tensors, which take the branches a CUDA tensor takes: bf16 products accumulate into
    fp32 through bmm's out_dtype overload, which CUDA and Meta have and the CPU has not (there the
    operands are widened first, which costs the CPU row its extra operations and bytes).

Targets (issue 25, item 6), for the forward: causal ≤ 20 operations and ≤ 4x the bytes,
non-causal ≤ 10 and ≤ 2x (the operations that compute, i.e. kernel launches).

    python -m benchmarks.bench_generic_passes

Writes results/generic_passes.json.
"""
import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linattn  # noqa: F401  (registers the operators)
from benchmarks.common import machine_info, write_results

VIEWS = {"view", "reshape", "transpose", "narrow", "select", "unsqueeze", "expand", "as_strided", "slice",
         "empty", "empty_like", "t", "alias", "detach", "squeeze", "movedim"}
ELU = 1
TARGETS = {True: (20, 4.0), False: (10, 2.0)}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _storage(t):
    return t.untyped_storage()._cdata


class DirectCalls(TorchDispatchMode):
    """Records the ATen calls a linattn operator's kernel makes itself (not those they make in
    turn) and the bytes of the fresh tensors they return."""

    def __init__(self, op, key=torch._C.DispatchKey.CompositeExplicitAutograd):
        super().__init__()
        self.op, self.key, self.calls, self.allocated = op, key, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.op:  # run its kernel (for self.key) with this mode active, so that its calls come here
            with self:
                return func._op_dk(self.key, *args, **kwargs)
        if func is torch.ops.aten.baddbmm.dtype_out and kwargs["out"].is_meta:
            # PyTorch's Meta decomposition of this overload misreads its arguments; its result is
            # `out`, which already has the product's shape and dtype (CUDA's kernel checks them).
            result = kwargs["out"]
        else:
            result = func(*args, **kwargs)
        inputs = {_storage(t) for t in _tensors(args) + _tensors(list(kwargs.values()))}
        self.calls.append(func.overloadpacket.__name__)
        self.allocated += sum(t.nbytes for t in _tensors(result) if _storage(t) not in inputs)
        return result


class LaunchCalls(DirectCalls):
    """DirectCalls that tells launches from calls returning (a view of) an input without writing it:
    `to` a dtype the tensor has, `contiguous` of a contiguous tensor, `flatten`/`unflatten` (named
    "view:<call>"). A call that writes into an input (`add_`, `index_put_`, `out=`) is a launch."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = super().__torch_dispatch__(func, types, args, kwargs)
        if func is not self.op and not func._schema.is_mutable:
            inputs = {_storage(t) for t in _tensors(args) + _tensors(list(kwargs.values()))}
            outputs = _tensors(result)
            if outputs and all(_storage(t) in inputs for t in outputs):
                self.calls[-1] = "view:" + self.calls[-1]
        return result

    def launches(self):
        """The calls that compute: a kernel launch each on a GPU."""
        return sum(1 for call in self.calls if call not in VIEWS and not call.startswith("view:"))


def count(op, *args, key=torch._C.DispatchKey.CompositeExplicitAutograd):
    op(*args)  # warm: the first call may set up caches
    mode = DirectCalls(op, key)
    with mode:
        op(*args)
    return Counter(mode.calls), mode.allocated


def measure(device, causal, B=2, H=4, T=1024, D=64, dtype=torch.bfloat16, gated=False, packed=False):
    """gated: a fading state (per-token log factors, the decay and gate path; causal only); packed:
    the same B·T rows as one packed batch of three documents (cu_seqlens 0, 600, 1400, B·T)."""
    g = torch.Generator().manual_seed(0)
    shape = (1, H, B * T, D) if packed else (B, H, T, D)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(3))
    log_decay = (-0.1 * torch.rand(shape[:3], generator=g)).to(device) if gated else None
    cu_seqlens = torch.tensor([0, 600, 1400, B * T], dtype=torch.int32, device=device) if packed else None
    io_bytes = 4 * q.numel() * q.element_size()
    fwd = torch.ops.linattn.linear_attn_fwd_generic.default
    args = (q, k, v, None, None, ELU, causal, True, 1e-6, log_decay, cu_seqlens)
    out, state, normalizer = fwd(*args)
    grad = torch.randn(out.shape, generator=g).to(dtype).to(device)
    bwd = torch.ops.linattn.linear_attn_bwd_generic.default
    bwd_args = (grad, None, q, k, v, out, normalizer, None, None, ELU, causal, True, state, log_decay, cu_seqlens)
    rows = []
    for name, op, op_args in (("forward", fwd, args), ("backward", bwd, bwd_args)):
        counts, allocated = count(op, *op_args)
        computing = sum(n for call, n in counts.items() if call not in VIEWS)
        rows.append({"device": device, "pass": name, "causal": causal, "gated": gated, "packed": packed,
                     "operations": sum(counts.values()), "computing": computing,
                     "bytes_ratio": allocated / io_bytes, "ops": dict(counts)})
    return rows


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    forms = ((True, False, False), (False, False, False), (True, True, False), (True, False, True),
             (False, False, True))  # (causal, gated, packed)
    rows = [row for device in ("cpu", "meta") for causal, gated, packed in forms
            for row in measure(device, causal, gated=gated, packed=packed)]
    print(f"{'tensors':<8} {'pass':<9} {'causal':<7} {'gated':<6} {'packed':<7} {'operations':>10} {'computing':>9} "
          f"{'bytes / qkvo':>12}   target (computing, bytes)")
    for row in rows:
        plain = not (row["gated"] or row["packed"])
        target = TARGETS[row["causal"]] if row["pass"] == "forward" and plain else ("-", "-")
        print(f"{row['device']:<8} {row['pass']:<9} {str(row['causal']):<7} {str(row['gated']):<6} "
              f"{str(row['packed']):<7} {row['operations']:>10} {row['computing']:>9} {row['bytes_ratio']:>11.1f}x"
              f"   {target[0]}, {target[1]}x")
    path, _ = write_results("results", "generic_passes", {"machine": machine_info(), "rows": rows})
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
