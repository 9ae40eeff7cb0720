"""The restricted-softmax flash engine's forward (csrc/restricted_softmax/flash/forward.h).

restricted_softmax_fwd_fused runs it for bfloat16 and float16 inputs with head dims up to 256; on
CPU tensors through the warp-operation layer's emulation (every lane of every warp, ldmatrix and
mma with the PTX ISA's fragment layouts, cp.async landing only at its wait, shared memory starting
as NaN). Every pattern kind is checked against softmax under Pattern.dense_mask in float64, and
each test counts the mma instructions the emulation executed, so it cannot pass on another path."""

import pytest
import torch

import linattn
from linattn import ops, reference
from linattn.ops.restricted import Pattern
from conftest import TOLERANCE, assert_close, compiled_kernel_rows

FWD = torch.ops.linattn.restricted_softmax_fwd_fused.default
HALF_TYPES = [torch.bfloat16, torch.float16]


def counters():
    names = ("mma", "ldmatrix_matrices", "ldmatrix_wavefronts", "shuffles", "read_bytes", "written_bytes")
    return dict(zip(names, torch.ops.linattn._warp_emulation_counters().tolist()))


def run(q, k, v, scale, pattern, engine=True):
    """The fused forward, asserting whether the flash engine's emulation ran it."""
    torch.ops.linattn._reset_warp_emulation_counters()
    out, lse = FWD(q, k, v, scale, *pattern.op_args())
    assert (counters()["mma"] > 0) == engine, "the flash engine did not run" if engine else "the engine ran"
    return out, lse


def make(B, H, Tq, Tk, D, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((Tq, D), (Tk, D), (Tk, dv))
    return [torch.randn(B, H, T, d, generator=g, dtype=torch.float64).to(dtype) for T, d in shapes]


def reference_forward(q, k, v, scale, pattern):
    fixed = None
    if pattern.positions is not None:
        p = pattern.positions
        fixed = p[:, :, :, None] == p[:, :, None, :]
    visible = pattern.dense_mask(q.shape[2], k.shape[2])
    return reference.masked_softmax_attention(q, k, v, visible, scale, bias=pattern.bias, fixed=fixed,
                                              softcap=pattern.softcap, alibi_slopes=pattern.alibi_slopes,
                                              return_lse=True)


def check(q, k, v, pattern, scale=0.3):
    out, lse = run(q, k, v, scale, pattern)
    ref_out, ref_lse = reference_forward(q, k, v, scale, pattern)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, TOLERANCE[q.dtype], "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without a visible key"
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], 1e-4, "lse")
    return out, lse


def ids(*shape, high=3, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def window_patterns(T):
    global_mask = torch.zeros(2, T, dtype=torch.bool)
    global_mask[0, [0, T // 2]] = True
    global_mask[1, T - 1] = True
    padding = torch.zeros(2, T, dtype=torch.bool)
    padding[1, T - T // 3:] = True
    return {
        "every key": Pattern(),
        "causal": Pattern(causal=True),
        "window (50, 20)": Pattern(window=(50, 20)),
        "causal window 70": Pattern(window=(70, -1), causal=True),
        "window one side": Pattern(window=(-1, 5)),
        "dilated": Pattern(window=(12, 12), dilation=3),
        "global tokens and padding": Pattern(window=(20, 20), global_mask=global_mask, key_padding_mask=padding),
        "segments": Pattern(window=(40, 40), q_segments=ids(2, 1, T), k_segments=ids(2, 1, T)),
    }


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(window_patterns(8)))
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_window_patterns(dtype, name, T):
    q, k, v = make(2, 3, T, T, 40, 24, dtype, seed=T)
    check(q, k, v, window_patterns(T)[name])


def layout_patterns(T, H):
    def layout(b, density=0.5, seed=3):
        n = -(-T // b)
        return torch.rand(H, n, n, generator=torch.Generator().manual_seed(seed)) < density

    positions = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(s)) for s in range(2)])[:, None]
    return {
        "block 64": Pattern(layout=layout(64), block_size=64),
        "block 16 causal": Pattern(layout=layout(16, 0.6), block_size=16, causal=True),
        "block 28 (not a divisor of the tile)": Pattern(layout=layout(28), block_size=28),
        "block 100 shared by heads": Pattern(layout=layout(100)[:1], block_size=100),
        "block 1 (a dense mask)": Pattern(layout=layout(1, 0.3), block_size=1),
        "bias, per-head segments, padding": Pattern(
            layout=torch.ones(1, 1, 1, dtype=torch.bool), block_size=T, bias=torch.randn(H, T, T),
            q_segments=ids(2, H, T, seed=1), k_segments=ids(2, H, T, seed=1),
            key_padding_mask=torch.arange(T).expand(2, T) >= T - 5),
        "shared-QK positions, causal": Pattern(layout=layout(32, 0.7), block_size=32, causal=True, positions=positions),
    }


def layout_case(name, dtype, T=150, H=2):
    """Pattern `name` of layout_patterns (its bias in `dtype`) and q, k, v (B=2, D=dv=32)."""
    pattern = layout_patterns(T, H)[name]
    if pattern.bias is not None:
        pattern = Pattern(**{**pattern.__dict__, "bias": pattern.bias.to(dtype)})
    return pattern, make(2, H, T, T, 32, 32, dtype, seed=5)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(layout_patterns(8, 1)))
def test_layout_patterns(dtype, name):
    pattern, (q, k, v) = layout_case(name, dtype)
    check(q, k, v, pattern)


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("D, dv", [(8, 8), (16, 40), (64, 64), (65, 63), (100, 128), (128, 128), (32, 200),
                                   (200, 72), (256, 256)])
def test_head_dims(dtype, D, dv):
    q, k, v = make(1, 2, 77, 77, D, dv, dtype, seed=D)
    check(q, k, v, Pattern(window=(30, 10)), scale=D ** -0.5)


@pytest.mark.parametrize("Tq, Tk", [(29, 141), (141, 29), (64, 1)])
def test_cross_attention_lengths(Tq, Tk):
    """T_q != T_k: the window aligned bottom-right, and a layout."""
    q, k, v = make(2, 2, Tq, Tk, 32, 32, torch.bfloat16, seed=Tq)
    check(q, k, v, Pattern(window=(20, 3)))
    layout = torch.rand(1, -(-Tq // 16), -(-Tk // 16), generator=torch.Generator().manual_seed(1)) < 0.5
    check(q, k, v, Pattern(layout=layout, block_size=16, causal=True))


def test_rows_without_keys_are_zero():
    """Rows that see no key (every key padded; a window past the keys) return 0 and lse −inf."""
    q, k, v = make(2, 2, 90, 90, 32, 32, torch.bfloat16, seed=2)
    padding = torch.zeros(2, 90, dtype=torch.bool)
    padding[1] = True
    out, lse = check(q, k, v, Pattern(window=(10, 10), key_padding_mask=padding))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all()
    q, k, v = make(1, 2, 200, 50, 32, 32, torch.bfloat16, seed=3)
    out, lse = check(q, k, v, Pattern(window=(-1, -1), causal=True))  # rows see keys up to i + T_k − T_q
    assert torch.isinf(lse[..., :149]).all() and torch.equal(out[..., :149, :], torch.zeros_like(out[..., :149, :]))


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_hidden_value_never_reaches_a_row(dtype, bad):
    """A key whose value holds Inf or NaN reaches exactly the rows that see it (the reference
    excludes hidden pairs rather than multiplying them by 0): at tile edges and inside; a padded
    key's value never reaches any row."""
    q, k, v = make(1, 2, 150, 150, 32, 24, dtype, seed=12)
    pattern = Pattern(window=(5, 5))
    for key in (0, 16, 63, 64, 100):
        v_bad = v.clone()
        v_bad[0, 1, key, 7] = bad
        out = run(q, k, v_bad, 0.3, pattern)[0]
        ref = reference_forward(q, k, v_bad, 0.3, pattern)[0]
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
        seen = torch.isfinite(ref)
        assert_close(out[seen], ref[seen], TOLERANCE[dtype], "rows that do not see the key")
    padding = torch.zeros(1, 150, dtype=torch.bool)
    padding[0, 70] = True
    v_bad = v.clone()
    v_bad[0, :, 70] = bad
    out, _ = check(q, k, v_bad, Pattern(window=(5, 5), key_padding_mask=padding))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_strided_and_unaligned_rows(dtype):
    """(B, T, H, D) layouts take 16-byte copies; a column-sliced v and a storage offset that breaks
    16-byte alignment take element loads."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 90, 3, 32, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    v = torch.randn(2, 3, 90, 40, generator=g).to(dtype)[..., 3:30]
    check(q, k, v, Pattern(window=(33, 7)))
    flat = torch.randn(2 * 3 * 90 * 32 + 1, generator=g).to(dtype)
    check(flat[1:].view(2, 3, 90, 32), k.contiguous(), v.contiguous(), Pattern(causal=True))


def test_other_dtypes_and_switch_run_the_operator(monkeypatch):
    """float32 and float64, and bf16 under LINATTN_TENSOR_CORES=0 or with too little shared memory,
    run restricted_softmax_fwd: the same results, no mma."""
    pattern = Pattern(window=(9, 9))
    for dtype in (torch.float32, torch.float64):
        q, k, v = make(1, 2, 70, 70, 16, 16, dtype)
        out, lse = run(q, k, v, 0.5, pattern, engine=False)
        ref = torch.ops.linattn.restricted_softmax_fwd(q, k, v, 0.5, *pattern.op_args())
        assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])
    q, k, v = make(1, 2, 70, 70, 256, 256, torch.bfloat16)
    monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", str(100 * 1024))  # not even one buffer fits at D = 256
    run(q, k, v, 0.1, pattern, engine=False)
    monkeypatch.setenv("LINATTN_EMULATED_SHARED_BYTES", str(227 * 1024))
    run(q, k, v, 0.1, pattern)
    monkeypatch.setenv("LINATTN_TENSOR_CORES", "0")
    run(q, k, v, 0.1, pattern, engine=False)


def test_sliding_window_traffic_and_bank_conflicts():
    """The issue's static figures at B=1 H=2 T=2048 D=64 bf16, window (256, 256): each query tile
    reads its queries once and the keys and values of its band's tiles once (nothing outside the
    band), writes out and lse once; ldmatrix without bank conflicts."""
    B, H, T, D, w = 1, 2, 2048, 64, 256
    q, k, v = make(B, H, T, T, D, D, torch.bfloat16, seed=6)
    pattern = Pattern(window=(w, w))
    run(q, k, v, D ** -0.5, pattern)
    c = counters()
    tiles = T // 64
    band_tiles = sum(min(tiles - 1, (i * 64 + 63 + w) // 64) - max(0, (i * 64 - w) // 64) + 1 for i in range(tiles))
    expected_reads = B * H * (T * D * 2 + band_tiles * 64 * 2 * D * 2)
    assert c["read_bytes"] == expected_reads, (c["read_bytes"], expected_reads)
    assert c["written_bytes"] == B * H * T * (D * 2 + 4)
    assert c["ldmatrix_wavefronts"] == c["ldmatrix_matrices"], "ldmatrix bank conflicts"
    assert c["mma"] == B * H * band_tiles * 4 * (D // 16 * 8 + 4 * D // 8)


def test_layout_tiles_visited_are_the_layouts():
    """A block layout with 64-key blocks: the engine reads exactly the set blocks' keys."""
    T, D = 640, 32
    layout = torch.rand(1, 10, 10, generator=torch.Generator().manual_seed(0)) < 0.3
    q, k, v = make(1, 1, T, T, D, D, torch.bfloat16, seed=1)
    check(q, k, v, Pattern(layout=layout, block_size=64))
    c = counters()
    query_tiles = int(layout.any(-1).sum())  # a query tile with no block set loads nothing
    assert c["read_bytes"] == query_tiles * 64 * D * 2 + int(layout.sum()) * 64 * 2 * D * 2


def test_global_tokens_are_gathered():
    """Longformer: each regular query tile visits its band and one tile of gathered global keys,
    and the global rows are one gathered tile visiting every key tile, so the mma count is the
    window's plus those (not a global token's whole tile per query tile)."""
    T, D, w = 1024, 32, 64
    global_mask = torch.zeros(1, T, dtype=torch.bool)
    global_mask[0, 5::64] = True  # one in every tile: 16
    q, k, v = make(1, 1, T, T, D, D, torch.bfloat16, seed=4)
    check(q, k, v, Pattern(window=(w, w), global_mask=global_mask))
    tiles = T // 64
    band_tiles = sum(min(tiles - 1, (i * 64 + 63 + w) // 64) - max(0, (i * 64 - w) // 64) + 1 for i in range(tiles))
    per_warp = 2 * 8 + 4 * 4  # scores over 2 k-steps of 16 and 8 key columns, P·V over 4 key steps and 4 columns
    assert counters()["mma"] == (band_tiles + tiles) * 4 * per_warp + tiles * 1 * per_warp


def test_packed_documents_skip_tiles_of_other_documents():
    """Causal attention over a packed batch of 8 documents of 64 tokens: each query tile visits
    only its own document's tile (the tile pairs whose segment ids cannot meet are skipped), so
    the mma count is 8 tiles' worth, not the 36 of the whole causal triangle."""
    T, D = 512, 32
    segments = (torch.arange(T) // 64).view(1, 1, T)
    q, k, v = make(1, 1, T, T, D, D, torch.bfloat16, seed=2)
    check(q, k, v, Pattern(causal=True, q_segments=segments, k_segments=segments))
    per_warp = 2 * 8 + 4 * 4
    assert counters()["mma"] == 8 * 4 * per_warp


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_packed_documents_of_uneven_lengths(dtype):
    """Documents crossing tile edges, per-head segment ids, a window and a layout."""
    T = 333
    lengths = [50, 7, 130, 1, 90, 55]
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, 1, T)
    segments = torch.cat([segments, segments.flip(-1)], 0).expand(2, 2, T).contiguous()
    q, k, v = make(2, 2, T, T, 32, 32, dtype, seed=7)
    check(q, k, v, Pattern(causal=True, q_segments=segments, k_segments=segments))
    check(q, k, v, Pattern(window=(40, 40), q_segments=segments, k_segments=segments))
    layout = torch.ones(1, 21, 21, dtype=torch.bool)
    check(q, k, v, Pattern(layout=layout, block_size=16, causal=True, q_segments=segments, k_segments=segments))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_many_global_tokens(dtype):
    """More global tokens than a tile holds (two gathered tiles), with padding and segments."""
    T = 300
    g = torch.Generator().manual_seed(3)
    global_mask = torch.rand(2, T, generator=g) < 0.3
    padding = torch.rand(2, T, generator=g) < 0.1
    q, k, v = make(2, 2, T, T, 32, 32, dtype, seed=6)
    check(q, k, v, Pattern(window=(10, 30), global_mask=global_mask, key_padding_mask=padding,
                           q_segments=ids(2, 1, T, high=2), k_segments=ids(2, 1, T, high=2)))


@pytest.mark.parametrize("name", ["window", "layout with bias"])
def test_autograd_opcheck_and_compile(name):
    """Through the public API under the fused switch: gradients (the backward recomputes from the
    engine's lse), opcheck, and torch.compile(fullgraph=True) equal to eager."""
    q, k, v = (t.requires_grad_() for t in make(1, 2, 70, 70, 32, 32, torch.bfloat16, seed=8))
    if name == "window":
        pattern = Pattern(window=(20, 20), causal=True)
    else:
        pattern = Pattern(layout=torch.ones(2, 5, 5, dtype=torch.bool).tril(), block_size=16,
                          bias=torch.randn(2, 70, 70).bfloat16().requires_grad_())
    with ops.fused_implementation():
        torch.ops.linattn._reset_warp_emulation_counters()
        out, lse = ops.restricted.restricted_softmax(q, k, v, 0.3, pattern)
        assert counters()["mma"] > 0
        out.float().square().sum().backward()
        compiled = torch.compile(lambda a, b, c: ops.restricted.restricted_softmax(a, b, c, 0.3, pattern),
                                 fullgraph=True)
        assert torch.equal(compiled(q, k, v)[0], out)
    leaves = [q, k, v] + ([pattern.bias] if pattern.bias is not None else [])
    grads = [t.grad for t in leaves]
    double = [t.detach().double().requires_grad_() for t in leaves]
    ref_pattern = Pattern(**{**pattern.__dict__, "bias": double[3] if len(double) > 3 else None})
    ref = reference_forward(*double[:3], 0.3, ref_pattern)[0]
    ref.square().sum().backward()
    for name_, grad, d in zip("qkvb", grads, double):
        assert_close(grad, d.grad, 2 * TOLERANCE[torch.bfloat16], f"grad {name_}")
    args = (q.detach(), k.detach(), v.detach(), 0.3, *pattern.op_args())
    torch.library.opcheck(FWD, args)


def test_compile_with_dynamic_lengths():
    """torch.compile(fullgraph=True, dynamic=True) over two lengths, a window and a layout (the
    plan built inside the graph): equal to eager, no recompilation per length."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    with ops.fused_implementation():
        def window(a, b, c):
            return ops.restricted.restricted_softmax(a, b, c, 0.3, Pattern(window=(9, 3), causal=True))[0]

        def layout(a, b, c):
            blocks = -(-a.shape[2] // 16)
            pattern = Pattern(layout=torch.ones(1, blocks, blocks, dtype=torch.bool).tril(), block_size=16)
            return ops.restricted.restricted_softmax(a, b, c, 0.3, pattern)[0]

        for fn in (window, layout):
            counter = CompileCounterWithBackend("inductor")
            compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
            for T in (70, 133):
                q, k, v = make(1, 2, T, T, 32, 32, torch.bfloat16, seed=T)
                assert torch.equal(compiled(q, k, v), fn(q, k, v))
            assert counter.frame_count == 1, f"{fn.__name__}: compiled {counter.frame_count} times"


def test_public_api_runs_the_engine():
    """linattn.sliding_window_attention under the fused switch runs the engine and matches the
    operator's default path."""
    q, k, v = make(2, 2, 100, 100, 32, 32, torch.bfloat16, seed=4)
    expected = linattn.sliding_window_attention(q, k, v, 17, causal=True)
    with ops.fused_implementation():
        torch.ops.linattn._reset_warp_emulation_counters()
        out = linattn.sliding_window_attention(q, k, v, 17, causal=True)
        assert counters()["mma"] > 0
    assert_close(out, expected.double(), TOLERANCE[torch.bfloat16], "fused vs default")


def test_cubins_hold_tensor_core_instructions_and_no_local_memory():
    """The compiled kernels (sm_80 and sm_90, bf16 and fp16; forward D = 64, 128, 256, backward key
    and query blocks D = 64, 128, 256; and at D = 256 their single-buffered blocks for GPUs whose
    blocks hold less shared memory, an A100's) use mma.sync (HMMA.16816.F32 in their SASS) and no
    local memory: no register spills, no stack."""
    rows = compiled_kernel_rows(lambda name: name.startswith("flash"))
    dtypes = ("BFloat16", "Half")
    archs = ("sm_80", "sm_90")
    instances = [(64, ""), (128, ""), (256, ""), (256, " single-buffered")]
    forward = {("flash", arch, d, dtype + single) for arch in archs for d, single in instances for dtype in dtypes}
    backward = {("flash-bwd", arch, d, f"{dtype} {block}{single}") for arch in archs for d, single in instances
                for dtype in dtypes for block in ("KeyBlock", "QueryBlock")}
    assert {(row["kernel"], row["arch"], row["dk"], row["dtype"]) for row in rows} == forward | backward
    for row in rows:
        name = f"{row['arch']} D={row['dk']} {row['dtype']}"
        assert row["hmma"] > 0, f"{name}: no tensor-core instructions"
        assert row["stack"] == 0 and row["local"] == 0, f"{name}: local memory (register spills)"


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
def test_cuda_graph_capture():
    """The forward and backward (window, and a layout whose plan ATen builds on the device) need no
    host synchronisation: captured in a CUDA graph, replay equals eager."""
    q, k, v = (t.cuda() for t in make(2, 2, 200, 200, 64, 64, torch.bfloat16, seed=5))
    layout = (torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.6).cuda()
    for pattern in (Pattern(window=(30, 30)), Pattern(layout=layout, block_size=64, causal=True)):
        args = (q, k, v, 0.125, *pattern.op_args())
        eager = FWD(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            FWD(*args)  # warm-up on the capturing stream
            with torch.cuda.graph(graph, stream=stream):
                captured = FWD(*args)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


@needs_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(window_patterns(8)) + list(layout_patterns(8, 1)))
def test_cuda_kernel_matches_reference(dtype, name):
    T, H = 333, 2
    pattern = {**window_patterns(T), **layout_patterns(T, H)}[name]
    if pattern.bias is not None:
        pattern = Pattern(**{**pattern.__dict__, "bias": pattern.bias.to(dtype)})
    on_gpu = Pattern(**{key: value.cuda() if isinstance(value, torch.Tensor) else value
                        for key, value in pattern.__dict__.items()})
    q, k, v = make(2, H, T, T, 64, 64, dtype, seed=3)
    out, lse = FWD(q.cuda(), k.cuda(), v.cuda(), 0.125, *on_gpu.op_args())
    ref_out, ref_lse = reference_forward(q, k, v, 0.125, pattern)
    assert_close(out.cpu(), ref_out, TOLERANCE[dtype], "out")
    finite = torch.isfinite(ref_lse)
    assert_close(lse.cpu()[finite], ref_lse[finite], 1e-4, "lse")
