"""The fused CUDA linear attention kernels (csrc/linear_attention/fused_scan.h).

On CPU tensors the fused operators run the kernels' block program with each thread block
emulated on the host (shared memory starting as NaN, as garbage would on a GPU), so every index,
mask, tile and chunk boundary is checked here without a GPU; on a CUDA machine the same tests
run the real kernels too (the "cuda" device), plus what only a GPU has: CUDA graphs, streams,
several devices."""
import os
import subprocess
import sys

import pytest
import torch

import linattn
from linattn import ops, reference
from conftest import TOLERANCE, assert_close

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
FWD = torch.ops.linattn.linear_attn_fwd_fused.default
BWD = torch.ops.linattn.linear_attn_bwd_fused.default


def inputs(B, H, Tq, Tk, m, dv, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    made = [torch.randn(B, H, T, d, generator=g, dtype=torch.float64).mul(scale)
            for T, d in ((Tq, m), (Tk, m), (Tk, dv))]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in made]


def state(B, H, m, dv, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, H, m, dv, generator=g, dtype=torch.float64)
    z = torch.rand(B, H, m, generator=g, dtype=torch.float64) * 2
    return tuple(t.to(device=device, dtype=torch.float32).requires_grad_() for t in (S, z))


def check(q, k, v, tol, initial_state=None, **options):
    """Output, final state and every gradient of the fused path against the float64 reference."""
    with ops.fused_implementation():
        out, (S, z) = linattn.linear_attention(q, k, v, initial_state=initial_state, output_final_state=True,
                                               **options)
    cpu = lambda t: None if t is None else t.detach().cpu().double().requires_grad_()  # noqa: E731
    ref_inputs = [cpu(t) for t in (q, k, v)]
    ref_state = None if initial_state is None else tuple(cpu(t) for t in initial_state)
    ref_options = {key: (val.cpu() if torch.is_tensor(val) else val) for key, val in options.items()}
    ref, (S_ref, z_ref) = reference.linear_attention(*ref_inputs, initial_state=ref_state, **ref_options)
    assert out.device == q.device and out.dtype == q.dtype
    assert_close(out.cpu(), ref, tol, "out")
    assert_close(S.cpu(), S_ref, tol, "final S")
    assert_close(z.cpu(), z_ref, tol, "final z")
    g = torch.Generator().manual_seed(11)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (ref, S_ref, z_ref)]
    leaves = [q, k, v] + list(initial_state or ())
    ref_leaves = ref_inputs + list(ref_state or ())
    loss = sum((a.double() * c.to(a.device)).sum() for a, c in zip((out, S, z), cot))
    loss_ref = sum((a * c).sum() for a, c in zip((ref, S_ref, z_ref), cot))
    for i, (a, b) in enumerate(zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_ref, ref_leaves))):
        assert a.dtype == leaves[i].dtype
        assert_close(a.cpu(), b, tol, f"grad of input {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 31, 32, 33, 97])
def test_matches_reference_every_dtype(device, causal, dtype, T):
    q, k, v = inputs(2, 3, T, T, 24, 40, dtype, device)
    check(q, k, v, TOLERANCE[dtype], causal=causal)


# Head dims from 16 to 256 with m != dv, across the 32-column tiles (one partial tile, exact
# multiples, the augmented column alone in a tile of its own at dv = 32·n).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m, dv", [(16, 16), (33, 31), (64, 128), (128, 64), (256, 16), (16, 256), (256, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(device, m, dv, causal):
    q, k, v = inputs(1, 2, 45, 45, m, dv, torch.float32, device, scale=0.3)
    check(q, k, v, TOLERANCE[torch.float32], causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
# (identity features may cancel in the normalizer: the API takes them unnormalized only)
@pytest.mark.parametrize("feature_map, normalize",
                         [("elu", True), ("elu", False), ("relu", True), ("relu", False), ("identity", False)])
def test_feature_maps_mask_and_state(device, causal, feature_map, normalize):
    q, k, v = inputs(2, 2, 70, 70, 12, 9, torch.float32, device, seed=5)
    mask = torch.zeros(2, 70, dtype=torch.bool, device=device)
    mask[0, 50:] = True
    mask[1, ::3] = True
    check(q, k, v, TOLERANCE[torch.float32], initial_state=state(2, 2, 12, 9, device), causal=causal,
          feature_map=feature_map, normalize=normalize, key_padding_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_lengths(device):
    q, k, v = inputs(2, 2, 40, 75, 20, 12, torch.float32, device)
    mask = torch.zeros(2, 75, dtype=torch.bool, device=device)
    mask[1, 60:] = True
    check(q, k, v, TOLERANCE[torch.float32], key_padding_mask=mask)
    q, k, v = inputs(1, 1, 75, 3, 20, 12, torch.float32, device)
    check(q, k, v, TOLERANCE[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs(device, causal):
    """(B, T, H, D) layouts transposed to (B, H, T, D), and a column-sliced v: no copies needed."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 50, 3, 16, generator=g).to(device).transpose(1, 2).requires_grad_() for _ in range(2))
    v_wide = torch.randn(2, 3, 50, 20, generator=g).to(device)
    v = v_wide[..., 2:15].requires_grad_()
    assert not q.is_contiguous() and not v.is_contiguous()
    check(q, k, v, TOLERANCE[torch.float32], causal=causal)


# (budget, m, dtype): the forward's chunk by fit_chunk's arithmetic (ScanProblem::shared_elements)
# is 16 rows on an A100 (163 KiB) for float64 at m = 256, 8 rows on sm_86 (99 KiB) at m = 200,
# and 8 rows for float32 at m = 100 in 24 KiB.
@pytest.mark.parametrize("budget, m, dtype", [(163 * 1024, 256, torch.float64), (99 * 1024, 200, torch.float64),
                                              (24 * 1024, 100, torch.float32)])
@pytest.mark.parametrize("causal", [False, True])
def test_shorter_chunks_when_shared_memory_is_small(monkeypatch, budget, m, dtype, causal):
    """The chunk shrinks from 32 to 16 or 8 rows where a block's shared memory is smaller
    (fit_chunk): emulated by lowering the emulation's budget."""
    monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", str(budget))
    q, k, v = inputs(1, 2, 53, 53, m, 40, dtype, "cpu", scale=0.3)
    check(q, k, v, TOLERANCE[dtype], causal=causal)


def test_too_large_for_shared_memory_raises_on_cpu(monkeypatch):
    """The CUDA operator falls back to the generic path; the emulation says why it cannot run."""
    monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", "1024")
    q, k, v = inputs(1, 1, 5, 5, 16, 16, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="shared memory"):
        FWD(q, k, v, None, None, 1, True, True, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_equals_generic_path(device):
    q, k, v = (t.detach() for t in inputs(2, 4, 200, 200, 64, 64, torch.float32, device))
    for causal in (False, True):
        fused = FWD(q, k, v, None, None, 1, causal, True, 1e-6)
        generic = torch.ops.linattn.linear_attn_fwd_generic(q, k, v, None, None, 1, causal, True, 1e-6)
        for a, b in zip(fused, generic):
            assert_close(a.cpu(), b.cpu().double(), 1e-5, "fused vs generic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(device, causal):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 37, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
               for d in (5, 5, 7))
    S = torch.randn(1, 2, 5, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    z = torch.rand(1, 2, 5, generator=g, dtype=torch.float64).to(device).add(1).requires_grad_()
    mask = torch.zeros(1, 37, dtype=torch.bool, device=device)
    mask[0, 30:] = True

    def fn(q, k, v, S, z):
        with ops.fused_implementation():
            out, (S1, z1) = linattn.linear_attention(q, k, v, causal=causal, initial_state=(S, z),
                                                     key_padding_mask=mask, output_final_state=True)
        return out, S1, z1

    assert torch.autograd.gradcheck(fn, (q, k, v, S, z))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(device, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, d, generator=g).to(device) for d in (8, 8, 6))
    S0 = torch.randn(2, 3, 8, 7, generator=g).to(device)
    mask = torch.zeros(2, 37, dtype=torch.bool, device=device)
    mask[1, 20:] = True
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), S0.requires_grad_(), mask, 1, causal, True,
            1e-6)
    torch.library.opcheck(FWD, args)
    out, final, normalizer = FWD(*args)
    for grad_final in (torch.randn_like(final), None):
        torch.library.opcheck(BWD, (torch.randn_like(out), grad_final, q.detach(), k.detach(), v.detach(),
                                    out.detach(), normalizer, S0.detach(), mask, 1, causal, True))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()

    def fn(q, k, v):
        return linattn.linear_attention(q, k, v, causal=True, output_final_state=True)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    with ops.fused_implementation():
        for T in (33, 70):
            q, k, v = inputs(2, 2, T, T, 16, 16, torch.float32, device, seed=T)
            eager = fn(q, k, v)
            got = compiled(q, k, v)
            assert_close(got[0].cpu(), eager[0].cpu().double(), 1e-6, "compiled out")
            ge = torch.autograd.grad(eager[0].sum(), (q, k, v))
            gc = torch.autograd.grad(got[0].sum(), (q, k, v))
            for a, b in zip(gc, ge):
                assert_close(a.cpu(), b.cpu().double(), 1e-6, "compiled gradient")


def test_set_cuda_backend_validates_and_restores():
    assert linattn.cuda_backend() in ("generic", "fused")
    with pytest.raises(ValueError, match="set_cuda_backend: name must be one of"):
        linattn.set_cuda_backend("triton")
    previous = linattn.cuda_backend()
    try:
        linattn.set_cuda_backend("fused")
        assert linattn.cuda_backend() == "fused"
        # CPU tensors keep the CPU kernel whatever the CUDA backend.
        assert ops.linear.forward_op("cpu") is torch.ops.linattn.linear_attn_fwd.default
        assert ops.linear.forward_op("cuda") is FWD
        linattn.set_cuda_backend("generic")
        assert ops.linear.forward_op("cuda") is torch.ops.linattn.linear_attn_fwd.default
    finally:
        linattn.set_cuda_backend(previous)


def test_environment_variable_chooses_backend():
    code = "import linattn; print(linattn.cuda_backend())"
    env = {**os.environ, "LINATTN_CUDA_BACKEND": "fused"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "fused"
    env["LINATTN_CUDA_BACKEND"] = "bogus"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "LINATTN_CUDA_BACKEND must be one of" in failed.stderr


def test_cuda_build_compiled_the_kernels():
    """A CUDA build of torch with a toolkit compiles the kernels (setup.py); then the operators
    have a CUDA implementation. A CPU-only build (a CPU torch, or LINATTN_BUILD_CUDA=0 as the
    sanitizer build) has the emulation alone."""
    from linattn import _build_info

    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("linattn::linear_attn_fwd_fused", "CUDA")
    assert has_cuda_kernel == bool(getattr(_build_info, "CUDA_KERNELS", False))
    if os.environ.get("CI") and torch.version.cuda is not None and getattr(_build_info, "CUDA_WANTED", True):
        assert has_cuda_kernel, "CI has a CUDA torch and nvcc: the fused kernels must have been compiled"


# --- What only a GPU has -------------------------------------------------------------------------

@needs_gpu
def test_cuda_graph_capture_and_replay():
    q, k, v = (t.detach() for t in inputs(2, 2, 100, 100, 32, 32, torch.float16, "cuda"))
    static_out = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        FWD(q, k, v, None, None, 1, True, True, 1e-6)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = FWD(q, k, v, None, None, 1, True, True, 1e-6)[0]
    for seed in (1, 2):
        fresh = [t.detach() for t in inputs(2, 2, 100, 100, 32, 32, torch.float16, "cuda", seed=seed)]
        for dst, src in zip((q, k, v), fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        expected = FWD(q, k, v, None, None, 1, True, True, 1e-6)[0]
        assert torch.equal(static_out, expected)


@needs_gpu
def test_non_default_stream():
    q, k, v = (t.detach() for t in inputs(2, 2, 300, 300, 64, 64, torch.float32, "cuda"))
    expected = FWD(q, k, v, None, None, 1, True, True, 1e-6)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = FWD(q, k, v, None, None, 1, True, True, 1e-6)[0]
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    q, k, v = (t.detach() for t in inputs(1, 2, 80, 80, 32, 32, torch.float32, "cuda:1"))
    out = FWD(q, k, v, None, None, 1, True, True, 1e-6)[0]
    assert out.device == torch.device("cuda:1")
    expected = FWD(q.cpu(), k.cpu(), v.cpu(), None, None, 1, True, True, 1e-6)[0]
    assert_close(out.cpu(), expected.double(), 1e-5, "cuda:1 vs emulation")
