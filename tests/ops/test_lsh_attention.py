"""linattn.lsh_attention (Reformer) against the float64 reference written with dense masks
(no sorting), at lengths that are not multiples of the chunk, causal and not, with padding,
every dtype, gradients, gradcheck, both implementations; and against full softmax restricted
to same-bucket pairs when one chunk holds the whole sequence."""
import pytest
import torch

import linattn
from linattn import lsh, reference
from conftest import TOLERANCE, assert_close


def inputs(B=2, H=2, T=45, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return make(B, H, T, D), make(B, H, T, D)


def expected(qk, v, n_hashes, bucket_size, seed, **options):
    """The reference with the rotations lsh_attention draws from a generator seeded `seed`."""
    T, D = qk.shape[2], qk.shape[3]
    rotations = lsh.lsh_rotations(n_hashes, D, lsh.lsh_buckets_count(T, bucket_size),
                                  generator=torch.Generator().manual_seed(seed), dtype=qk.dtype)
    return reference.lsh_attention(qk, v, lsh.lsh_buckets(qk, rotations), bucket_size, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,bucket_size", [(45, 8), (64, 16), (7, 4)])
def test_matches_reference(implementation, dtype, causal, T, bucket_size):
    qk, v = inputs(T=T, dtype=dtype)
    pad = torch.zeros(2, T, dtype=torch.bool)
    pad[1, -3:] = True
    options = dict(causal=causal, key_padding_mask=pad)
    out = linattn.lsh_attention(qk, v, n_hashes=3, bucket_size=bucket_size,
                                generator=torch.Generator().manual_seed(7), **options)
    want = expected(qk, v, 3, bucket_size, 7, **options)  # buckets hashed from the same (rounded) inputs
    tol = max(TOLERANCE[dtype], 1e-6)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, want, tol, "out")
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * cot).sum(), (qk, v))
    ref = torch.autograd.grad((want * cot).sum(), (qk, v))
    for name, a, b in zip(("qk", "v"), got, ref):
        assert_close(a, b, tol * 3, f"d{name}")


def test_one_chunk_is_same_bucket_softmax():
    qk, v = inputs(T=30)
    rotations = lsh.lsh_rotations(1, 8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = linattn.lsh_attention(qk, v, n_hashes=1, bucket_size=32, rotations=rotations)
    buckets = lsh.lsh_buckets(qk, rotations)[:, :, 0]
    same = buckets[..., :, None] == buckets[..., None, :]
    k = torch.nn.functional.normalize(qk, dim=-1)
    scores = (qk @ k.transpose(-1, -2)) * 8 ** -0.5
    eye = torch.eye(30, dtype=torch.bool)
    scores = torch.where(eye, torch.full_like(scores, -1e5), scores).masked_fill(~same, float("-inf"))
    assert_close(out, torch.softmax(scores, -1) @ v, 1e-12, "same-bucket softmax")


def test_gradcheck(implementation):
    qk, v = inputs(B=1, H=1, T=13, D=4)
    rotations = lsh.lsh_rotations(2, 4, lsh.lsh_buckets_count(13, 4), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64)
    # Hashing is piecewise constant: fixed buckets within gradcheck's tiny perturbations.
    assert torch.autograd.gradcheck(
        lambda a, b: linattn.lsh_attention(a, b, n_hashes=2, bucket_size=4, causal=True, rotations=rotations), (qk, v))


def test_reproducible_with_generator_and_any_length():
    qk, v = inputs(T=101, dtype=torch.float32)
    a = linattn.lsh_attention(qk, v, bucket_size=16, generator=torch.Generator().manual_seed(5))
    b = linattn.lsh_attention(qk, v, bucket_size=16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (2, 2, 101, 8)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    qk, v = inputs(T=40, dtype=torch.float32)
    rotations = lsh.lsh_rotations(2, 8, lsh.lsh_buckets_count(40, 8), generator=torch.Generator().manual_seed(0))
    fn = lambda a, b: linattn.lsh_attention(a, b, n_hashes=2, bucket_size=8, causal=True, rotations=rotations)
    got, eager = torch.compile(fn, fullgraph=True)(qk, v), fn(qk, v)
    assert_close(got, eager, 1e-6, "compiled")
    for a, b in zip(torch.autograd.grad(got.sum(), (qk, v)), torch.autograd.grad(eager.sum(), (qk, v))):
        assert_close(a, b, 1e-5, "compiled gradient")


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_drops_each_rounds_pairs(implementation, causal):
    """Attention dropout per round, in the operator's sorted rows: output and gradients equal the
    float64 reference whose rounds drop the pairs lsh_dropout_keep gives in token order (the
    rounds weighted by their undropped logsumexps)."""
    qk, v = inputs(T=45)
    padding = torch.zeros(2, 45, dtype=torch.bool)
    padding[1, 38:] = True
    rotations = lsh.lsh_rotations(2, 8, lsh.lsh_buckets_count(45, 8), generator=torch.Generator().manual_seed(1),
                                  dtype=torch.float64)
    out = linattn.lsh_attention(qk, v, n_hashes=2, bucket_size=8, causal=causal, key_padding_mask=padding,
                                rotations=rotations, dropout_p=0.3, generator=torch.Generator().manual_seed(3))
    seed = linattn.ops.restricted.dropout_seed_from(torch.Generator().manual_seed(3))
    buckets = lsh.lsh_buckets(qk, rotations)
    keep = lsh.lsh_dropout_keep(seed, buckets, 0.3)
    assert 0.6 < keep.double().mean().item() < 0.8
    want = reference.lsh_attention_weights(qk, buckets, 8, causal=causal, key_padding_mask=padding, keep=keep,
                                           dropout_p=0.3) @ v
    undropped = linattn.lsh_attention(qk, v, n_hashes=2, bucket_size=8, causal=causal, key_padding_mask=padding,
                                      rotations=rotations)
    assert not torch.allclose(out, undropped)
    assert_close(out, want, 1e-10, "out")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for got, ref in zip(torch.autograd.grad(out, [qk, v], g), torch.autograd.grad(want, [qk, v], g)):
        assert_close(got, ref, 1e-9, "grad")


def test_errors():
    qk, v = inputs()
    with pytest.raises(ValueError, match="n_hashes must be an int >= 1"):
        linattn.lsh_attention(qk, v, n_hashes=0)
    with pytest.raises(ValueError, match=r"rotations must have shape \(n_hashes=4, D=8, n_buckets/2=3\)"):
        linattn.lsh_attention(qk, v, bucket_size=8, rotations=torch.randn(4, 8, 2))


def test_reformer_method_redraws_rotations_in_training():
    """redraw_in_training: fresh rotations from torch's generator at every training forward (the
    Reformer paper's stochastic hashing), the fixed hash rotations in eval."""
    torch.manual_seed(0)
    module = linattn.nn.MultiheadAttention(16, 2, method="reformer", batch_first=True, dtype=torch.float64,
                                           n_hashes=2, bucket_size=4, redraw_in_training=True)
    core = module.core
    q, v = torch.randn(1, 2, 40, 8, dtype=torch.float64), torch.randn(1, 2, 40, 8, dtype=torch.float64)
    options = dict(causal=False, key_padding_mask=None, attn_mask=None, dropout_p=0.0, need_weights=False)
    core.train()
    torch.manual_seed(5)
    first = core(q, q, v, **options)[0]
    second = core(q, q, v, **options)[0]
    assert not torch.allclose(first, second), "training calls should hash differently"
    torch.manual_seed(5)
    rotations = torch.randn(2, 8, linattn.lsh.lsh_buckets_count(40, 4) // 2, dtype=torch.float64)
    expected = linattn.lsh_attention(q, v, n_hashes=2, bucket_size=4, rotations=rotations)
    torch.testing.assert_close(first, expected)
    core.eval()
    fixed = core(q, q, v, **options)[0]
    torch.testing.assert_close(core(q, q, v, **options)[0], fixed)
    torch.testing.assert_close(fixed, linattn.lsh_attention(q, v, n_hashes=2, bucket_size=4,
                                                            rotations=core.rotations(40, q.device, q.dtype)))
    with pytest.raises(ValueError, match="redraw_in_training"):
        linattn.nn.MultiheadAttention(16, 2, method="reformer", redraw_in_training="yes")
