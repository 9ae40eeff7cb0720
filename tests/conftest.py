import contextlib
import functools
import pathlib

import pytest
import torch

import linattn
from linattn import ops

# Relative-norm tolerances against the float64 reference (docs/methods.md).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


# The implementations of linear attention: the CPU kernel, the device-generic ATen path (what
# CUDA tensors run by default) and the fused CUDA kernels' block program (on CPU tensors, an
# emulation of their thread blocks; linattn.set_cuda_backend("fused") on a GPU).
LINEAR_IMPLEMENTATIONS = ("cpu_kernel", "generic", "fused")


@contextlib.contextmanager
def use_implementation(name):
    with ops.generic_implementation(name == "generic"), ops.fused_implementation(name == "fused"):
        yield


@pytest.fixture(params=["cpu_kernel", "generic"])
def implementation(request):
    """Runs a test once through the fused CPU kernel and once through the device-generic
    ATen implementation that CUDA tensors execute."""
    with use_implementation(request.param):
        yield request.param


@pytest.fixture(params=LINEAR_IMPLEMENTATIONS)
def linear_implementation(request):
    """As `implementation`, plus the fused CUDA kernels' block program (linear attention)."""
    with use_implementation(request.param):
        yield request.param


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, where ‖expected‖ is at least 1e-2 per element in RMS.

    The floor matters where the exact result is ~0 through cancellation (the gradient of a
    normalized output with respect to q when there is a single key is O(eps), say): there any
    finite-precision result is all rounding, and only an absolute bound means anything."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    scale = max(expected.norm().item(), 1e-2 * expected.numel() ** 0.5)
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def log_factors(decay, gate, B, H, T):
    """The (B, H, T) float64 log factors of a fading state: log γ of a per-head decay (H,) plus the
    log-gates (B, H, T), either or both None; differentiable in both. Per-channel gates (B, H, T, m)
    give (B, H, T, m) factors."""
    channels = tuple(gate.shape[3:]) if gate is not None else ()
    log_f = torch.zeros(B, H, T, *channels, dtype=torch.float64)
    if decay is not None:
        log_f = log_f + decay.double().log().view(1, H, 1, *(1 for _ in channels))
    if gate is not None:
        log_f = log_f + gate.double()
    return log_f


def gated_inputs(B, H, T, m, dv, dtype, seed, strength=1.0):
    """q, k, v (B, H, T, ·) of `dtype`, a per-head decay γ (H,) and (B, H, T) log-gates for a fading
    state, float32 (strength scales how fast it fades: 1 forgets over a few dozen tokens, 30 within
    a token)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64).to(dtype) for d in (m, m, dv))
    g = torch.Generator().manual_seed(seed + 1)
    decay = torch.rand(H, generator=g, dtype=torch.float64) * 0.1 + 0.9
    gate = -torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.1 * strength
    return q, k, v, decay.float(), gate.float()


def fading_extremes(m, dv, strength):
    """B=2 H=2 T=150 gated inputs (gated_inputs, bf16) at one of the fading extremes — strength 0:
    no fading at all (decay 1, gates 0); 30: a state that forgets within a token — with a key
    padding mask (sequence 1 padded from row 100, key 3 of sequence 0) and an initial state
    (S0, z0), z0 in [0, 2). Returns q, k, v, decay, gate, mask, (S0, z0)."""
    B, H, T = 2, 2, 150
    q, k, v, decay, gate = gated_inputs(B, H, T, m, dv, torch.bfloat16, seed=5, strength=strength)
    if strength == 0.0:
        decay = torch.ones_like(decay)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, 100:] = True
    mask[0, 3] = True
    g = torch.Generator().manual_seed(9)
    state = (torch.randn(B, H, m, dv, generator=g), torch.rand(B, H, m, generator=g) * 2)
    return q, k, v, decay, gate, mask, state


def gated_reference(q, k, v, decay, gate, **options):
    """linattn.reference.decayed_linear_attention (float64) with the log factors of decay and gate."""
    from linattn import reference
    return reference.decayed_linear_attention(q, k, v, log_factors(decay, gate, *gate.shape), **options)


def assert_same_gradients(ours, theirs, inputs, names, tol=1e-9, seed=9):
    """ours(*inputs) and theirs(*inputs) return tuples of outputs: their gradients for the same random
    cotangents must agree, input by input (named in the message)."""
    a, b = ours(*inputs), theirs(*inputs)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in a]
    grads_a = torch.autograd.grad(sum((x * w).sum() for x, w in zip(a, weights)), inputs)
    grads_b = torch.autograd.grad(sum((x * w).sum() for x, w in zip(b, weights)), inputs)
    for name, x, y in zip(names, grads_a, grads_b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m, name=name: f"d{name}: {m}")


def assert_compiled_module_equals_eager(module, x, mask):
    """A causal self-attention training step of `module` on x under torch.compile(fullgraph=True):
    the loss and every parameter's gradient equal eager's."""
    torch._dynamo.reset()

    def loss(mod):
        return mod(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0].square().mean()

    eager = loss(module)
    eager_grads = torch.autograd.grad(eager, list(module.parameters()))
    compiled = torch.compile(loss, fullgraph=True)(module)
    compiled_grads = torch.autograd.grad(compiled, list(module.parameters()))
    assert_close(compiled, eager, 1e-5, "loss")
    for a, b in zip(compiled_grads, eager_grads):
        assert_close(a, b, 1e-4, "grad")


def assert_swapped_encoder_trains(method):
    """swap_attention puts `method` into both layers of a small causal encoder, and one training step
    gives every parameter of the new cores a nonzero gradient."""
    from torch import nn

    import linattn

    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                    enable_nested_tensor=False)
    linattn.swap_attention(encoder, method=method)
    cores = [layer.self_attn.core for layer in encoder.layers]
    assert [type(c).name for c in cores] == [method, method]  # two layers replaced
    x = torch.randn(3, 10, 16)
    encoder(x, mask=nn.Transformer.generate_square_subsequent_mask(10), is_causal=True).square().mean().backward()
    for core in cores:
        for name, p in core.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def module_heads(module, x):
    """The (N, H, L, hd) q, k, v heads a linattn.nn.MultiheadAttention makes of self-attention input x."""
    q, k, v = torch.nn.functional.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    return [t.unflatten(-1, (module.num_heads, module.head_dim)).transpose(1, 2) for t in (q, k, v)]


def assert_close(actual, expected, tol, what=""):
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# The repository's root (tests are grouped in ops/, nn/, integrations/ and gpu/ below this file).
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def compiled_kernel_rows(kernel):
    """The compiled tensor-core kernels of family `kernel` (benchmarks/bench_tensor_core.py's
    KERNELS: a name, or a predicate on it) as cuobjdump reads them from the built library: registers,
    stack, local memory and HMMA count per instance. Skips in a build without CUDA kernels or
    without cuobjdump / nvdisasm, which CI must have (install.sh installs them)."""
    import os

    from linattn import _build_info

    if not getattr(_build_info, "CUDA_KERNELS", False):
        pytest.skip("a build without the CUDA kernels")
    from benchmarks.bench_tensor_core import find_tool

    if find_tool("cuobjdump") is None or find_tool("nvdisasm") is None:
        assert not os.environ.get("CI"), "CI installs nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm (install.sh)"
        pytest.skip("cuobjdump / nvdisasm not installed")
    wanted = kernel if callable(kernel) else (lambda name: name == kernel)
    return [row for row in _all_kernel_rows(linattn._C.__file__) if wanted(row["kernel"])]


def assert_tensor_cores_without_local_memory(rows, instances):
    """The compiled kernels' rows: for sm_80 and sm_90, `instances` of them in all, each holding
    tensor-core instructions (HMMA.16816.F32) and no local memory (no register spills, no stack)."""
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    assert len(rows) == instances
    for row in rows:
        name = f"{row['arch']} DK={row['dk']} DV={row['dv']} {row['dtype']}"
        assert row["hmma"] > 0, f"{name}: no tensor-core instructions"
        assert row["stack"] == 0 and row["local"] == 0, f"{name}: local memory (register spills)"


@functools.lru_cache(maxsize=1)
def _all_kernel_rows(library):
    """Every compiled kernel's row, read once per session (cuobjdump over the whole library takes
    about 100 s here; five test files ask)."""
    from benchmarks.bench_tensor_core import cubin_figures

    return tuple(cubin_figures(library)[0])


# --- the methods of linattn.nn.MultiheadAttention, as the module and GPU tests build them ---

METHOD_OPTIONS = {
    "softmax": {},
    "linear": {},
    "linear-relu": {"feature_map": "relu"},
    "performer": {"nb_features": 48, "seed": 0},
    "performer-relu": {"nb_features": 48, "kernel": "relu", "seed": 0},
    "efficient": {},
    "linformer": {"max_seq_len": 40, "k": 12, "sharing": "none"},
    "linformer-headwise": {"max_seq_len": 40, "k": 12},
    "linformer-kv": {"max_seq_len": 40, "k": 12, "sharing": "kv"},
    "local": {"window": 5},
    "local-dilated": {"window": (7, 3), "dilation": 2},
    "longformer": {"window": 4, "global_tokens": 2},
    "bigbird": {"block_size": 8, "num_random": 1, "seed": 3},
    "hybrid": {"window": 4},
    "reformer": {"n_hashes": 2, "bucket_size": 8, "seed": 1},
    "additive": {},
    "additive-window": {"window": 3},
}
CAUSAL = {"softmax", "linear", "performer", "local", "bigbird", "hybrid", "reformer", "additive"}


def build_module(name, embed=24, heads=3, **kwargs):
    """linattn.nn.MultiheadAttention for METHOD_OPTIONS[name] (name: method[-variant])."""
    method = name.split("-")[0]
    options = METHOD_OPTIONS[name]
    kwargs.setdefault("batch_first", True)
    return linattn.nn.MultiheadAttention(embed, heads, method=method, **options, **kwargs)
