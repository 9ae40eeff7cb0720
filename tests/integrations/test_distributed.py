"""linattn.distributed.context_parallel_linear_attention and context_parallel_delta_rule on 2 and 4
gloo processes of this machine: each rank's output slice and the gradients of its inputs (and the
decay's / initial state's, summed over ranks) must equal the single-process linear_attention /
delta_rule_attention on the whole sequence, in float64, for causal and non-causal attention,
decay and gates, key padding, states, uneven and empty slices; and a DDP-wrapped model with a
context-parallel layer must train like the single-process one."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import linattn
from linattn.distributed import context_parallel_delta_rule, context_parallel_linear_attention

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

B, H, D, DV = 2, 3, 5, 4
CONFIGS = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, decay=True),
    dict(causal=True, gate=True, decay=True),
    dict(causal=True, feature_map="relu", padding=True),
    dict(causal=False, padding=True),
    dict(causal=True, feature_map="identity", normalize=False, gate=True),
    dict(causal=True, gate=True, per_channel=True, decay=True),  # GLA-style gates, one per feature channel
]


def _inputs(T, config):
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, T, DV, generator=g, dtype=torch.float64)
    extra = {}
    if config.get("decay"):
        extra["decay"] = torch.tensor([1.0, 0.9, 0.6], dtype=torch.float64)
    if config.get("gate"):
        channels = (D,) if config.get("per_channel") else ()
        extra["gate"] = -torch.rand(B, H, T, *channels, generator=g, dtype=torch.float64)
    if config.get("padding"):
        extra["key_padding_mask"] = torch.rand(B, T, generator=g) < 0.3
    for name in ("causal", "feature_map", "normalize"):
        if name in config:
            extra[name] = config[name]
    return q, k, v, extra


def _slices(T, world):
    """Uneven slice bounds, one of them empty when there are enough ranks."""
    cuts = [0, 2, 2, 11, T][: world] + [T] if world == 4 else [0, 7, T]
    return list(zip(cuts[:-1], cuts[1:]))


def _worker(rank, world, init_file, reports):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        T = 23
        start, end = _slices(T, world)[rank]
        for config in CONFIGS:
            q, k, v, extra = _inputs(T, config)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            decay = extra.pop("decay", None)
            decay = None if decay is None else decay.clone().requires_grad_()
            weight = torch.randn(B, H, T, DV, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            whole = linattn.linear_attention(*leaves, decay=decay, **extra)
            (whole * weight).sum().backward()
            expected_grads = [t.grad[:, :, start:end] for t in leaves]
            expected_decay_grad = None if decay is None else decay.grad.clone()

            local = [t[:, :, start:end].clone().requires_grad_() for t in (q, k, v)]
            local_extra = dict(extra)
            if "gate" in extra:
                local_extra["gate"] = extra["gate"][:, :, start:end]
            if "key_padding_mask" in extra:
                local_extra["key_padding_mask"] = extra["key_padding_mask"][:, start:end]
            local_decay = None if decay is None else decay.detach().clone().requires_grad_()
            out = context_parallel_linear_attention(*local, decay=local_decay, **local_extra)
            (out * weight[:, :, start:end]).sum().backward()
            torch.testing.assert_close(out, whole[:, :, start:end].detach(), rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{config} output: {m}")
            for name, got, want in zip("qkv", local, expected_grads):
                torch.testing.assert_close(got.grad, want, rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f"{config} grad {name}: {m}")
            if local_decay is not None:  # each rank holds its part; DDP would sum them
                total = local_decay.grad.clone()
                dist.all_reduce(total)
                torch.testing.assert_close(total, expected_decay_grad, rtol=1e-9, atol=1e-9)
        _delta_rule_check(rank, start, end, T)
        _ddp_check(rank, world, start, end, T)
        reports.put(("passed", rank))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    except Exception as error:  # report to the parent (spawn's own error drops the message)
        reports.put(("failed", f"rank {rank}: {type(error).__name__}: {error}"))
        raise
    finally:
        dist.destroy_process_group()


DELTA_CONFIGS = [dict(causal=True, gated=True, state=True), dict(causal=True, gated=False, state=False),
                 dict(causal=False, gated=True, state=True), dict(causal=True, gated="per_channel", state=True)]


def _delta_rule_check(rank, start, end, T):
    """context_parallel_delta_rule: this rank's slice of the whole sequence's output and final
    state, and the gradients of its q, k, v, beta, gate (and of the initial state, summed)."""
    for config in DELTA_CONFIGS:
        g = torch.Generator().manual_seed(11)
        q, k = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(B, H, T, DV, generator=g, dtype=torch.float64)
        beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
        channels = (D,) if config["gated"] == "per_channel" else ()  # KDA: a gate per key channel
        gate = -0.3 * torch.rand(B, H, T, *channels, generator=g, dtype=torch.float64) if config["gated"] else None
        state = torch.randn(B, H, D, DV, generator=g, dtype=torch.float64) if config["state"] else None
        weight = torch.randn(B, H, T, DV, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        state_weight = torch.randn(B, H, D, DV, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        inputs = [t for t in (q, k, v, beta, gate, state)]
        whole_leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
        whole, whole_final = linattn.delta_rule_attention(
            *whole_leaves[:4], gate=whole_leaves[4], initial_state=whole_leaves[5], causal=config["causal"],
            output_final_state=True)
        ((whole * weight).sum() + (whole_final * state_weight).sum()).backward()

        cut = [None if t is None else (t[:, :, start:end] if t.dim() >= 3 and t is not state else t) for t in inputs]
        local = [None if t is None else t.clone().requires_grad_() for t in cut]
        out, final = context_parallel_delta_rule(*local[:4], gate=local[4], initial_state=local[5],
                                                 causal=config["causal"], output_final_state=True)
        # The final state is every rank's: its loss term counts once, on rank 0.
        loss = (out * weight[:, :, start:end]).sum() + (final * state_weight).sum() * (rank == 0)
        loss.backward()
        torch.testing.assert_close(out, whole[:, :, start:end].detach(), rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"delta {config} output: {m}")
        torch.testing.assert_close(final, whole_final.detach(), rtol=1e-10, atol=1e-10)
        for name, got, want in zip(("q", "k", "v", "beta", "gate"), local[:5], whole_leaves[:5]):
            if got is None:
                continue
            torch.testing.assert_close(got.grad, want.grad[:, :, start:end], rtol=1e-8, atol=1e-9,
                                       msg=lambda m: f"delta {config} grad {name}: {m}")
        if local[5] is not None:  # each rank holds its part of the initial state's gradient
            total = local[5].grad.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, whole_leaves[5].grad, rtol=1e-8, atol=1e-9)


class _Layer(torch.nn.Module):
    def __init__(self, parallel):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(6, 3 * 6, dtype=torch.float64)
        self.parallel = parallel

    def forward(self, x):  # x (B, T, 6) -> 2 heads of 3
        q, k, v = (t.unflatten(-1, (2, 3)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        attend = context_parallel_linear_attention if self.parallel else linattn.linear_attention
        return attend(q, k, v, causal=True).transpose(1, 2).flatten(2)


def _ddp_check(rank, world, start, end, T):
    x = torch.randn(2, T, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    single = _Layer(parallel=False)
    single(x).square().sum().backward()
    model = torch.nn.parallel.DistributedDataParallel(_Layer(parallel=True))
    # Each rank's loss is its slice's part of the whole loss; DDP averages gradients over ranks.
    (model(x[:, start:end]).square().sum() * world).backward()
    torch.testing.assert_close(model.module.qkv.weight.grad, single.qkv.weight.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world):
    context = mp.get_context("spawn")
    attempts = 5
    for attempt in range(attempts):
        reports = context.SimpleQueue()
        with tempfile.TemporaryDirectory() as folder:  # a fresh rendezvous file every attempt
            init_file = os.path.join(folder, "init")
            try:
                mp.spawn(_worker, args=(world, init_file, reports), nprocs=world, join=True)
                return
            except Exception as error:
                passed, failures = set(), []
                while not reports.empty():
                    kind, detail = reports.get()
                    (passed.add if kind == "passed" else failures.append)(detail)
                if failures:  # a check failed: its message, at once
                    raise AssertionError("\n".join(failures)) from error
                if len(passed) == world:  # every rank checked everything; gloo died tearing down
                    return
                # A worker killed by a signal before it reported is gloo's process group failing
                # to form or to talk ("terminate called without an active exception", now and
                # then on a loaded 2-core machine), not a wrong result: form it again.
                killed = isinstance(error, mp.ProcessExitedException) and error.signal_name is not None
                if not killed or attempt == attempts - 1:
                    raise AssertionError(f"a worker failed: {error}") from error


def test_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    q = torch.randn(1, 1, 3, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_linear_attention(q, q, q)
