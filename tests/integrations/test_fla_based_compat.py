"""linattn.fla_compat's Based (linattn/fla_based.py: linear attention on second-order Taylor features)
against the float64 dense form (weights 1 + a + a²/2, a = scale · q_t · k_s, causal, normalized
with eps 1e-6 or not), gradients, bfloat16, compile; fla's naive reference when installed."""
import pytest
import torch

from linattn import fla_compat
from linattn.fla_based import taylor_features

from conftest import assert_close


def make(B=2, T=45, H=2, K=16, V=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g).to(dtype) for _ in range(2))
    return q, k, torch.randn(B, T, H, V, generator=g).to(dtype)


def dense(q, k, v, scale=None, use_norm=True):
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    a = (q * scale) @ k.transpose(-1, -2)
    weights = (1 + a + a * a / 2).tril()
    out = weights @ v
    if use_norm:
        out = out / (weights.sum(-1, keepdim=True) + 1e-6)
    return out.transpose(1, 2)


def test_taylor_features_give_the_expansion():
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    a = (x * y).sum(-1)
    phi_x, phi_y = taylor_features(x), taylor_features(y)
    assert phi_x.shape == (5, 1 + 7 + 28)
    assert_close((phi_x * phi_y).sum(-1), 1 + a + a * a / 2, 1e-12, "φ(x)·φ(y)")


@pytest.mark.parametrize("name", ["parallel_based", "fused_chunk_based"])
@pytest.mark.parametrize("use_norm", [True, False])
def test_based_matches_the_dense_form(name, use_norm):
    q, k, v = make(seed=1)
    out = getattr(fla_compat, name)(q, k, v, use_norm=use_norm)
    assert out.shape == v.shape and out.is_contiguous()
    assert_close(out, dense(q, k, v, use_norm=use_norm), 1e-5, "out")
    out = getattr(fla_compat, name)(q, k, v, scale=0.1, use_norm=use_norm)
    assert_close(out, dense(q, k, v, scale=0.1, use_norm=use_norm), 1e-5, "out with a scale")


def test_gradients_and_a_wider_key_dim():
    q, k, v = (x.double().requires_grad_() for x in make(T=30, K=24, seed=2))
    out = fla_compat.parallel_based(q, k, v)
    ref = dense(q, k, v)
    assert_close(out, ref, 1e-12, "out")
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, 1e-10, f"grad {name}")


def test_bfloat16_inputs():
    q, k, v = make(seed=3, dtype=torch.bfloat16)
    out = fla_compat.parallel_based(q, k, v)
    assert out.dtype == torch.bfloat16
    assert_close(out, dense(q, k, v), 2e-2, "out")


def test_compiles_with_fullgraph():
    q, k, v = make(seed=4)
    compiled = torch.compile(fla_compat.parallel_based, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v), fla_compat.parallel_based(q, k, v))


def test_bad_shapes_raise_naming_them():
    q, k, v = make(T=5)
    with pytest.raises(ValueError, match="q and k must be"):
        fla_compat.parallel_based(q, k[..., :3], v)


def test_agrees_with_flash_linear_attentions_naive_reference():
    naive = pytest.importorskip("fla.ops.based.naive")
    q, k, v = make(seed=5)
    out = fla_compat.parallel_based(q, k, v)
    ref = naive.naive_parallel_based(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert_close(out, ref.double(), 1e-5, "out vs fla")
