"""Learnable feature maps (linattn/nn/learned_feature_maps.py, docs/methods.md §10): against their
float64 definitions, gradcheck, positivity, and trained end to end through the fused linear kernel."""
import pytest
import torch

import linattn
from linattn.nn.learned_feature_maps import HedgehogFeatureMap, MLPFeatureMap, learned_feature_map


def test_hedgehog_is_its_definition():
    torch.manual_seed(0)
    fmap = HedgehogFeatureMap(3, 5, features=4).double()
    with torch.no_grad():
        fmap.weight.normal_()
        fmap.bias.normal_()
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    expected = []
    for h in range(3):
        z = x[:, h] @ fmap.weight[h] + fmap.bias[h]
        expected.append(torch.cat([torch.exp(z) / torch.exp(z).sum(-1, keepdim=True),
                                   torch.exp(-z) / torch.exp(-z).sum(-1, keepdim=True)], -1))
    torch.testing.assert_close(fmap(x), torch.stack(expected, 1), rtol=1e-12, atol=1e-12)
    assert fmap.feature_dim == 8 and fmap(x).shape == (2, 3, 7, 8)


def test_t2r_is_its_definition_and_starts_as_relu():
    fmap = MLPFeatureMap(2, 4).double()
    x = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(fmap(x), torch.relu(x))  # W = I, b = 0 at first
    with torch.no_grad():
        fmap.weight.normal_()
    expected = torch.stack([torch.relu(x[:, h] @ fmap.weight[h] + fmap.bias[h]) for h in range(2)], 1)
    torch.testing.assert_close(fmap(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["hedgehog", "t2r"])
def test_gradcheck(name):
    fmap = learned_feature_map(name, 2, 3).double()
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(fmap, {"weight": w, "bias": b}, (x,)),
                                    (x, fmap.weight, fmap.bias))


def test_hedgehog_features_are_positive_and_bounded_at_any_magnitude():
    fmap = HedgehogFeatureMap(1, 4)
    x = torch.tensor([[[[1e4, -1e4, 0.0, 3.0]]]])
    features = fmap(x)
    assert torch.isfinite(features).all() and (features >= 0).all() and (features <= 1).all()


def test_trains_end_to_end_through_the_fused_kernel():
    """The map's gradients through linear_attention (fused kernel, feature_map=None) equal those of
    the same attention written densely in float64."""
    torch.manual_seed(1)
    fmap = HedgehogFeatureMap(2, 4).double()
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    out = linattn.linear_attention(fmap(q), fmap(k), v, causal=True, feature_map=None)
    grads = torch.autograd.grad(out.square().sum(), list(fmap.parameters()))
    weights = (fmap(q) @ fmap(k).transpose(-1, -2)).tril()
    dense = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)
    expected = torch.autograd.grad(dense.square().sum(), list(fmap.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="heads must be an int >= 1"):
        HedgehogFeatureMap(0, 4)
    with pytest.raises(ValueError, match=r"expected \(B, H=2, T, d=4\)"):
        HedgehogFeatureMap(2, 4)(torch.randn(1, 3, 5, 4))
    with pytest.raises(ValueError, match="learned feature_map must be one of"):
        learned_feature_map("elu", 2, 4)
