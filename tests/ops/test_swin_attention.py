"""Swin window attention: linattn.swin_attention against the float64 reference (bias,
shifted-window regions, every dtype, gradients of q, k, v and the bias), the block-sparse
operator's pair terms through both implementations, and swap_attention on torchvision's and
timm's Swin models against the unswapped models."""
import copy

import pytest
import torch

import linattn
from linattn import reference
from linattn.swin import shifted_window_regions
from conftest import TOLERANCE, assert_close


def windows(G=8, H=3, N=49, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return make(G, H, N, D), make(G, H, N, D), make(G, H, N, D), make(H, N, N)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_matches_reference(implementation, dtype, shifted):
    q, k, v, bias = windows(dtype=dtype)
    regions = shifted_window_regions(14, 14, [7, 7], [3, 3]) if shifted else None  # 4 windows
    out = linattn.swin_attention(q, k, v, bias=bias, regions=regions)
    expected = reference.swin_attention(q, k, v, bias=bias, regions=regions)
    tol = max(TOLERANCE[dtype], 1e-6)
    assert out.dtype == dtype
    assert_close(out, expected, tol, "out")
    cot = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * cot).sum(), (q, k, v, bias))
    want = torch.autograd.grad((expected * cot).sum(), (q, k, v, bias))
    for name, a, b in zip(("q", "k", "v", "bias"), got, want):
        assert_close(a, b, tol * 3, f"d{name}")


def test_shared_bias_and_odd_window(implementation):
    q, k, v, _ = windows(G=6, H=2, N=13, D=5, dtype=torch.float64)
    bias = torch.randn(1, 13, 13, dtype=torch.float64, requires_grad=True)
    regions = torch.randint(0, 3, (3, 13), generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: linattn.swin_attention(a, b, c, bias=d, regions=regions, scale=0.7), (q, k, v, bias))


def test_regions_are_the_shifted_window_mask():
    # Same regions, same mask as torchvision builds (pairs of different regions get -100 there).
    regions = shifted_window_regions(21, 14, [7, 7], [3, 3])
    assert regions.shape == (6, 49)
    img = torch.zeros(21, 14)
    count = 0
    for h in ((0, -7), (-7, -3), (-3, None)):
        for w in ((0, -7), (-7, -3), (-3, None)):
            img[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    tv = img.view(3, 7, 2, 7).permute(0, 2, 1, 3).reshape(6, 49)
    assert torch.equal(regions[:, :, None] == regions[:, None, :], tv[:, :, None] == tv[:, None, :])


def pattern_args(layout, block_size, causal, bias, q_segments, k_segments, positions):
    """The restricted-softmax operator's pattern arguments of a layout with pair terms."""
    return (-1, -1, 1, causal, layout, block_size, None, None, q_segments, k_segments, positions, bias)


@pytest.mark.parametrize("suffix", ["", "_generic"])
def test_opcheck_pair_terms(suffix):
    q, k, v, bias = (t.detach() for t in windows(G=4, H=2, N=20, D=8))
    seg = torch.randint(0, 3, (4, 1, 20), generator=torch.Generator().manual_seed(0))
    pos = torch.randperm(20, generator=torch.Generator().manual_seed(1)).repeat(4, 2, 1)
    layout = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.7
    fwd = getattr(torch.ops.linattn, f"restricted_softmax_fwd{suffix}").default
    bwd = getattr(torch.ops.linattn, f"restricted_softmax_bwd{suffix}").default
    pattern = pattern_args(layout, 8, True, bias, seg, seg, pos)
    torch.library.opcheck(fwd, (q, k, v, 0.3) + pattern)
    out, lse = fwd(q, k, v, 0.3, *pattern)
    grad_lse = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0)
    torch.library.opcheck(bwd, (torch.randn_like(out), grad_lse, q, k, v, out, lse, 0.3) + pattern)


def test_pair_terms_kernel_equals_generic():
    q, k, v, bias = windows(G=3, H=2, N=70, D=8, dtype=torch.float64)
    seg = torch.randint(0, 4, (3, 2, 70), generator=torch.Generator().manual_seed(0))
    kseg = seg.masked_fill(torch.rand(3, 2, 70, generator=torch.Generator().manual_seed(3)) < 0.1, -1)
    pos = torch.stack([torch.randperm(70, generator=torch.Generator().manual_seed(i)) for i in range(6)]).view(3, 2, 70)
    layout = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(2)) < 0.6
    pattern = pattern_args(layout, 16, True, bias, seg, kseg, pos)
    results = []
    for suffix in ("", "_generic"):
        fwd = getattr(torch.ops.linattn, f"restricted_softmax_fwd{suffix}")
        bwd = getattr(torch.ops.linattn, f"restricted_softmax_bwd{suffix}")
        out, lse = fwd(q, k, v, 0.4, *pattern)
        grads = bwd(torch.ones_like(out), torch.ones_like(lse).masked_fill(torch.isinf(lse), 0), q, k, v, out, lse,
                    0.4, *pattern)
        results.append((out, lse) + tuple(grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-12, equal_nan=False), (a - b).abs().max()


def test_pair_term_errors():
    q, k, v, bias = (t.detach() for t in windows(G=2, H=2, N=10, D=4))
    layout = torch.ones(1, 1, 1, dtype=torch.bool)
    op = torch.ops.linattn.restricted_softmax_fwd
    with pytest.raises(RuntimeError, match=r"bias must have shape \(1 or H=2, T_q=10, T_k=10\)"):
        op(q, k, v, 1.0, layout=layout, block_size=10, bias=bias[:, :5])
    with pytest.raises(RuntimeError, match=r"q_segments and k_segments must be given together"):
        op(q, k, v, 1.0, layout=layout, block_size=10, q_segments=torch.zeros(2, 1, 10, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"positions must be an int64 tensor"):
        op(q, k, v, 1.0, layout=layout, block_size=10, positions=torch.zeros(2, 1, 10))
    with pytest.raises(ValueError, match=r"regions must be an int64 \(nW, N=10\) tensor with nW dividing G=2"):
        linattn.swin_attention(q, k, v, regions=torch.zeros(3, 10, dtype=torch.long))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v, bias = windows(G=4, H=2, N=16, D=8)
    regions = shifted_window_regions(8, 8, [4, 4], [2, 2])
    fn = lambda q, k, v, b: linattn.swin_attention(q, k, v, bias=b, regions=regions)
    got, eager = torch.compile(fn, fullgraph=True)(q, k, v, bias), fn(q, k, v, bias)
    assert_close(got, eager, 1e-6, "compiled")
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v, bias)), torch.autograd.grad(eager.sum(), (q, k, v, bias))):
        assert_close(a, b, 1e-6, "compiled gradient")


def _compare_models(model, x):
    swapped = linattn.swap_attention(copy.deepcopy(model), "linear")
    assert list(swapped.state_dict()) == list(model.state_dict())
    out, ref = swapped(x), model(x)
    assert_close(out, ref, 1e-5, "output")
    out.square().sum().backward()
    ref.square().sum().backward()
    grads = dict(swapped.named_parameters())
    for name, p in model.named_parameters():
        assert_close(grads[name].grad, p.grad, 1e-4, f"grad {name}")
    return swapped


@pytest.mark.parametrize("builder", ["swin_t", "swin_v2_t"])
def test_swin_swap_models_torchvision(builder):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(models, builder)(num_classes=10).eval()  # eval: no stochastic depth
    swapped = _compare_models(model, torch.randn(2, 3, 72, 88))  # odd grid: padding and shifts
    assert sum(type(m).__name__.startswith("Linattn") for m in swapped.modules()) == 12


def test_swin_swap_models_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10).eval()
    swapped = _compare_models(model, torch.randn(1, 3, 224, 224))
    # An exact swap that replaced nothing would pass the comparison too: count what it replaced.
    assert sum(type(m).__name__.startswith("Linattn") for m in swapped.modules()) == 12


def test_swapped_blocks_train_with_attention_dropout():
    """A torchvision and a timm block with attention dropout swap, and in training drop the
    operator's pairs: each equals its own attention in float64 with the keep mask of the seed it
    drew (ops.restricted.dropout_keep_mask); in eval mode they drop nothing."""
    models = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    block = models.ShiftedWindowAttention(32, [4, 4], [2, 2], 2, attention_dropout=0.3).double()
    swapped = linattn.swap_attention(torch.nn.Sequential(copy.deepcopy(block)))
    assert sum(type(m).__name__.startswith("Linattn") for m in swapped.modules()) == 1
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64)
    assert_close(swapped.eval()(x), block.eval()(x), 1e-12, "eval: no dropout")
    # In training: swin_attention's seed comes from torch's generator; draw the same one here.
    swapped.train()
    torch.manual_seed(7)
    out = swapped(x)
    torch.manual_seed(7)
    seed = linattn.ops.restricted.dropout_seed_from()
    calls = []
    original = linattn.swin.swin_attention

    def with_the_mask(q, k, v, *, bias=None, regions=None, scale=None, dropout_p=0.0, generator=None):
        calls.append(dropout_p)
        keep = linattn.ops.restricted.dropout_keep_mask(seed, *q.shape[:3], k.shape[2], dropout_p)
        return reference.swin_attention(q, k, v, bias=bias, regions=regions, scale=scale, keep=keep,
                                        dropout_p=dropout_p)

    linattn.swin.swin_attention = with_the_mask
    try:
        expected = linattn.swin.shifted_window_attention(
            x, block.qkv.weight, block.proj.weight, block.get_relative_position_bias(), block.window_size,
            block.num_heads, shift_size=block.shift_size, attention_dropout=0.3, qkv_bias=block.qkv.bias,
            proj_bias=block.proj.bias, training=True)
    finally:
        linattn.swin.swin_attention = original
    assert calls == [0.3]
    assert_close(out, expected, 1e-12, "training with dropout")
    assert not torch.allclose(out, swapped.eval()(x))
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, attn_drop_rate=0.2)
    swapped = linattn.swap_attention(model)
    assert sum(type(m).__name__.startswith("Linattn") for m in swapped.modules()) == 12
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert not torch.equal(swapped.train()(x), swapped(x))


def test_the_old_name_window_attention_still_works_and_warns():
    q, k, v = (torch.randn(4, 2, 9, 8) for _ in range(3))
    with pytest.warns(DeprecationWarning, match="linattn.swin_attention"):
        old = linattn.window_attention(q, k, v)
    assert torch.equal(old, linattn.swin_attention(q, k, v))
