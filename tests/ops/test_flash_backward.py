"""The restricted-softmax flash engine's backward (csrc/restricted_softmax/flash/backward.h).

restricted_softmax_bwd_fused runs it for bfloat16 and float16 inputs with head dims up to 256 (8
warps a block there, two per 16 rows, each with half of the gradients' columns); on CPU tensors
through the warp-operation layer's emulation. Gradients of q, k, v and the bias (lse's
cotangent included) are checked against float64 autograd through softmax under
Pattern.dense_mask, for every pattern kind; each test counts the mma instructions the emulation
executed, so it cannot pass on another path."""
import pytest
import torch

from linattn import ops
from linattn.ops.restricted import Pattern
from conftest import TOLERANCE, assert_close
from test_flash_forward import (HALF_TYPES, counters, layout_case, layout_patterns, make, reference_forward,
                                window_patterns)

FWD = torch.ops.linattn.restricted_softmax_fwd_fused.default
BWD = torch.ops.linattn.restricted_softmax_bwd_fused.default


def gradients(q, k, v, scale, pattern, engine=True):
    """The fused backward's (grad_q, grad_k, grad_v, grad_bias) for random cotangents of out and
    lse, and float64 autograd's."""
    out, lse = FWD(q, k, v, scale, *pattern.op_args())
    g = torch.Generator().manual_seed(11)
    w_out = torch.randn(out.shape, generator=g).to(q.dtype)
    w_lse = torch.randn(lse.shape, generator=g).masked_fill(torch.isinf(lse), 0)
    torch.ops.linattn._reset_warp_emulation_counters()
    grads = BWD(w_out, w_lse, q, k, v, out, lse, scale, *pattern.op_args())
    assert (counters()["mma"] > 0) == engine, "the flash backward did not run" if engine else "the engine ran"
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bias = pattern.bias.detach().double().requires_grad_() if pattern.bias is not None else None
    ref_out, ref_lse = reference_forward(*leaves, scale, Pattern(**{**pattern.__dict__, "bias": bias}))
    finite = torch.isfinite(ref_lse)
    loss = (ref_out * w_out.double()).sum() + (torch.where(finite, ref_lse, 0) * w_lse.double()).sum()
    loss.backward()
    expected = [t.grad for t in leaves] + ([bias.grad] if bias is not None else [])
    return grads, expected


def check(q, k, v, pattern, scale=0.3, tol=None):
    grads, expected = gradients(q, k, v, scale, pattern)
    tol = tol or 2 * TOLERANCE[q.dtype]
    for name, grad, ref in zip(("q", "k", "v", "bias"), grads, expected):
        assert grad.dtype == q.dtype
        assert_close(grad, ref, tol, f"grad {name}")
    if pattern.bias is None:
        assert grads[3].numel() == 0
    return grads


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(window_patterns(8)))
@pytest.mark.parametrize("T", [1, 64, 65, 150])
def test_window_patterns(dtype, name, T):
    q, k, v = make(2, 3, T, T, 40, 24, dtype, seed=T)
    check(q, k, v, window_patterns(T)[name])


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(layout_patterns(8, 1)))
def test_layout_patterns(dtype, name):
    pattern, (q, k, v) = layout_case(name, dtype)
    check(q, k, v, pattern)


@pytest.mark.parametrize("D, dv", [(8, 8), (16, 40), (64, 64), (65, 63), (100, 128), (128, 128), (128, 16),
                                   (129, 64), (40, 200), (256, 256), (250, 131)])
def test_head_dims(D, dv):
    q, k, v = make(1, 2, 77, 77, D, dv, torch.bfloat16, seed=D)
    check(q, k, v, Pattern(window=(30, 10)), scale=D ** -0.5)


@pytest.mark.parametrize("Tq, Tk", [(29, 141), (141, 29)])
def test_cross_attention_lengths(Tq, Tk):
    q, k, v = make(2, 2, Tq, Tk, 32, 32, torch.bfloat16, seed=Tq)
    check(q, k, v, Pattern(window=(20, 3)))
    layout = torch.rand(1, -(-Tq // 16), -(-Tk // 16), generator=torch.Generator().manual_seed(1)) < 0.5
    check(q, k, v, Pattern(layout=layout, block_size=16, causal=True))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_many_global_tokens(dtype):
    """Gathered global rows and keys (two tiles of each), with padding and segments: every pair's
    gradient once."""
    T = 300
    g = torch.Generator().manual_seed(3)
    global_mask = torch.rand(2, T, generator=g) < 0.3
    padding = torch.rand(2, T, generator=g) < 0.1
    segments = torch.randint(0, 2, (2, 1, T), generator=g)
    q, k, v = make(2, 2, T, T, 32, 32, dtype, seed=6)
    check(q, k, v, Pattern(window=(10, 30), global_mask=global_mask, key_padding_mask=padding,
                           q_segments=segments, k_segments=segments))


def test_packed_documents():
    """Tiles of other documents are skipped in both launches: gradients equal the reference."""
    T = 333
    lengths = [50, 7, 130, 1, 90, 55]
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, 1, T)
    segments = torch.cat([segments, segments.flip(-1)], 0).contiguous()
    q, k, v = make(2, 2, T, T, 32, 32, torch.bfloat16, seed=7)
    check(q, k, v, Pattern(causal=True, q_segments=segments, k_segments=segments))
    check(q, k, v, Pattern(window=(40, 40), q_segments=segments, k_segments=segments))


def test_bias_gradient_sums_over_batch_and_shared_heads():
    """Swin's case: a bias shared by the batch (and by the heads), with shifted-window segments."""
    T, H = 49, 3
    q, k, v = make(4, H, T, T, 32, 32, torch.bfloat16, seed=3)
    segments = torch.randint(0, 2, (4, 1, T), generator=torch.Generator().manual_seed(0))
    for heads in (H, 1):
        bias = torch.randn(heads, T, T, generator=torch.Generator().manual_seed(heads)).bfloat16()
        check(q, k, v, Pattern(layout=torch.ones(1, 1, 1, dtype=torch.bool), block_size=T, bias=bias,
                               q_segments=segments, k_segments=segments))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_head_dim_256_column_groups(dtype):
    """At D = 256 two warps share each 16 rows, one per half of the gradients' columns: with a
    bias (added to its gradient by one of them only), global tokens (gathered rows and keys) and a
    layout, every column of every gradient matches the reference."""
    T = 90
    q, k, v = make(2, 2, T, T, 256, 192, dtype, seed=4)
    bias = torch.randn(2, T, T, generator=torch.Generator().manual_seed(5)).to(dtype)
    check(q, k, v, Pattern(layout=torch.ones(1, 1, 1, dtype=torch.bool), block_size=T, bias=bias), scale=1 / 16)
    global_mask = torch.zeros(2, T, dtype=torch.bool)
    global_mask[0, [3, 70]] = True
    check(q, k, v, Pattern(window=(16, 16), global_mask=global_mask), scale=1 / 16)
    layout = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(6)) < 0.5
    check(q, k, v, Pattern(layout=layout, block_size=16, causal=True), scale=1 / 16)


def test_head_dim_256_reads_each_tile_once_for_both_column_groups():
    """The two warps of each 16 rows share the block's tiles: the D = 256 backward reads twice the
    bytes of the D = 128 one on the same pattern (rows twice as wide), not four times (a block per
    column half would read every tile twice)."""
    read = {}
    for D in (128, 256):
        q, k, v = make(1, 2, 300, 300, D, D, torch.bfloat16, seed=1)
        pattern = Pattern(window=(60, 60))
        out, lse = FWD(q, k, v, D ** -0.5, *pattern.op_args())
        torch.ops.linattn._reset_warp_emulation_counters()
        BWD(torch.ones_like(out), None, q, k, v, out, lse, D ** -0.5, *pattern.op_args())
        read[D] = counters()["read_bytes"]
    assert 1.9 < read[256] / read[128] <= 2.0


def test_rows_and_keys_without_pairs_get_zero_gradients():
    q, k, v = make(2, 2, 90, 90, 32, 32, torch.bfloat16, seed=2)
    padding = torch.zeros(2, 90, dtype=torch.bool)
    padding[1] = True
    padding[0, 40:] = True
    grads = check(q, k, v, Pattern(window=(10, 10), key_padding_mask=padding))
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))  # rows that see no key
    for grad in grads[1:3]:
        assert torch.equal(grad[0, :, 40:], torch.zeros_like(grad[0, :, 40:]))  # keys nobody sees


def test_strided_inputs_and_grad_out():
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 90, 3, 32, generator=g).bfloat16().transpose(1, 2) for _ in range(2))
    v = torch.randn(2, 3, 90, 40, generator=g).bfloat16()[..., 3:30]
    check(q, k, v, Pattern(window=(33, 7)))


def test_other_dtypes_and_too_little_shared_memory_run_the_operator(monkeypatch):
    """float32 runs the operator's own backward; so does D = 256 on a GPU whose blocks cannot hold
    even the single-buffered backward's 133 KiB of shared memory."""
    pattern = Pattern(window=(9, 9))
    q, k, v = make(1, 2, 70, 70, 16, 16, torch.float32)
    gradients(q, k, v, 0.1, pattern, engine=False)
    q, k, v = make(1, 2, 70, 70, 160, 64, torch.bfloat16)
    monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", str(130 * 1024))
    gradients(q, k, v, 0.1, pattern, engine=False)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_single_buffered_blocks_equal_double_buffered(dtype, monkeypatch):
    """At D = 256 an A100's blocks (163 KiB) hold one streamed-tile buffer, not two (forward 182 KiB,
    backward 199 KiB): the single-buffered kernels run there and give the very same bits (the same
    arithmetic in the same order; only when the next tile is loaded differs), over patterns that
    visit many tiles."""
    assert [torch.ops.linattn._flash_shared_bytes(256, 256, backward, buffers)
            for backward in (False, True) for buffers in (2, 1)] == [186144, 118288, 203776, 135680]
    T = 200
    q, k, v = make(2, 2, T, T, 256, 200, dtype, seed=12)
    global_mask = torch.zeros(2, T, dtype=torch.bool)
    global_mask[1, [5, 150]] = True
    layout = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(2)) < 0.6
    grad_out = torch.randn(2, 2, T, 200, generator=torch.Generator().manual_seed(3)).to(dtype)
    for pattern in (Pattern(window=(70, 70), global_mask=global_mask), Pattern(layout=layout, block_size=32)):
        results = []
        for kib in (227, 163):
            monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", str(kib * 1024))
            torch.ops.linattn._reset_warp_emulation_counters()
            out, lse = FWD(q, k, v, 1 / 16, *pattern.op_args())
            grads = BWD(grad_out, None, q, k, v, out, lse, 1 / 16, *pattern.op_args())
            assert counters()["mma"] > 0, "the engine did not run"
            results.append((out, lse, *grads[:3]))
        for double, single in zip(*results):
            assert torch.equal(double, single)
    check(q, k, v, Pattern(window=(70, 70), global_mask=global_mask), scale=1 / 16)  # (at 163 KiB)


def test_equals_the_cpu_kernel_backward():
    """The engine and the CPU kernel, from the same out and lse: equal up to bf16 rounding."""
    q, k, v = make(2, 2, 130, 130, 64, 64, torch.bfloat16, seed=9)
    pattern = Pattern(window=(40, 40), causal=True)
    out, lse = FWD(q, k, v, 0.125, *pattern.op_args())
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    fused = BWD(grad_out, None, q, k, v, out, lse, 0.125, *pattern.op_args())
    cpu = torch.ops.linattn.restricted_softmax_bwd(grad_out, None, q, k, v, out, lse, 0.125, *pattern.op_args())
    for a, b in zip(fused[:3], cpu[:3]):
        assert_close(a, b.double(), 2 * TOLERANCE[torch.bfloat16], "fused vs CPU kernel")


def test_opcheck_and_compile_through_autograd():
    q, k, v = (t.requires_grad_() for t in make(1, 2, 70, 70, 32, 32, torch.bfloat16, seed=8))
    pattern = Pattern(window=(20, 20))
    with ops.fused_implementation():
        out, _ = ops.restricted.restricted_softmax(q, k, v, 0.3, pattern)
        torch.ops.linattn._reset_warp_emulation_counters()
        out.float().sum().backward()
        assert counters()["mma"] > 0, "the backward did not run the engine"
    out, lse = FWD(q.detach(), k.detach(), v.detach(), 0.3, *pattern.op_args())
    args = (torch.ones_like(out), None, q.detach(), k.detach(), v.detach(), out, lse, 0.3, *pattern.op_args())
    torch.library.opcheck(BWD, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("name, D", [(name, 64) for name in list(window_patterns(8)) + list(layout_patterns(8, 1))]
                         + [("global tokens and padding", 256), ("causal window 70", 200)])
def test_cuda_kernels_match_reference(name, D):
    block_limit = torch.cuda.get_device_properties().shared_memory_per_block_optin
    if torch.ops.linattn._flash_shared_bytes(D, D, True, 1) > block_limit:
        pytest.skip("this GPU's blocks cannot hold the backward's shared memory at this head dim")
    T, H = 333, 2
    pattern = {**window_patterns(T), **layout_patterns(T, H)}[name]
    if pattern.bias is not None:
        pattern = Pattern(**{**pattern.__dict__, "bias": pattern.bias.bfloat16()})
    assert_gpu_backward_matches_emulation(*make(2, H, T, T, D, D, torch.bfloat16, seed=3), 0.125, pattern)


def assert_gpu_backward_matches_emulation(q, k, v, scale, pattern):
    """The fused forward on the GPU, then its backward there and in the CPU emulation, the
    gradients compared; returns the GPU's (out, lse) on the CPU."""
    on_gpu = Pattern(**{key: value.cuda() if isinstance(value, torch.Tensor) else value
                        for key, value in pattern.__dict__.items()})
    out, lse = FWD(q.cuda(), k.cuda(), v.cuda(), scale, *on_gpu.op_args())
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    gpu = BWD(grad_out.cuda(), None, q.cuda(), k.cuda(), v.cuda(), out, lse, scale, *on_gpu.op_args())
    emulated = BWD(grad_out, None, q, k, v, out.cpu(), lse.cpu(), scale, *pattern.op_args())
    for a, b in zip(gpu, emulated):
        if b.numel():
            assert_close(a.cpu(), b.double(), 2 * TOLERANCE[q.dtype], "GPU vs emulation")
    return out.cpu(), lse.cpu()
