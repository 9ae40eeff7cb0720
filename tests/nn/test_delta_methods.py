"""The methods "deltanet", "gated_deltanet" and "kda" of linattn.nn.MultiheadAttention (docs/methods.md
§11): β and the gate from the head's key as documented, the implicit weights, key padding that
writes nothing, dropout that skips keys, swap_attention into an encoder that then trains, and
torch.compile(fullgraph=True) equal to eager."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linattn
from linattn import reference
from linattn.delta_rule import l2_normalize

from conftest import assert_close, assert_compiled_module_equals_eager, assert_swapped_encoder_trains, module_heads

METHODS = ("deltanet", "gated_deltanet", "kda")


def module(method, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    m = linattn.nn.MultiheadAttention(16, 2, method=method, batch_first=True, dtype=dtype, **kwargs)
    with torch.no_grad():  # token-dependent β and gate, as after training
        for p in m.core.parameters():
            p.copy_(torch.randn_like(p))
    return m


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_the_module_computes_the_documented_recurrence(method, causal):
    m = module(method)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, _ = m(x, x, x, is_causal=causal, attn_mask=nn.Transformer.generate_square_subsequent_mask(9) if causal else None,
               need_weights=False)
    q, k, v = module_heads(m, x)
    core = m.core
    beta = torch.sigmoid(torch.einsum("nhtd,hd->nht", k, core.beta_weight) + core.beta_bias[:, None])
    gate = None
    if method == "gated_deltanet":
        gate = -core.A_log.exp()[:, None] * F.softplus(torch.einsum("nhtd,hd->nht", k, core.gate_weight)
                                                       + core.gate_bias[:, None])
        assert (gate <= 0).all()
    if method == "kda":  # one gate per key channel
        gate = -core.A_log.exp()[:, None, None] * F.softplus(torch.einsum("nhtd,hed->nhte", k, core.gate_weight)
                                                             + core.gate_bias[:, None])
        assert gate.shape == k.shape and (gate <= 0).all()
    ref, _ = reference.delta_rule(l2_normalize(q), l2_normalize(k), v, beta, gate=gate, causal=causal, scale=1.0)
    expected = m.out_proj(ref.transpose(1, 2).flatten(2))
    assert_close(out, expected, 1e-12, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_weights_are_the_matrix_the_output_applies(method, causal):
    m = module(method)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64) if causal else None
    out, weights = m(x, x, x, attn_mask=mask, is_causal=causal, average_attn_weights=False)
    _, _, v = module_heads(m, x)
    expected = m.out_proj((weights @ v).transpose(1, 2).flatten(2))
    assert weights.shape == (2, 2, 7, 7)
    assert_close(out, expected, 1e-12, method)
    if causal:
        assert weights.triu(1).abs().max() == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_padded_keys_write_nothing(method, causal):
    m = module(method)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 5:] = True
    padding[1, 2] = True  # a hole in the middle too
    mask = nn.Transformer.generate_square_subsequent_mask(8) if causal else None
    out, _ = m(x, x, x, key_padding_mask=padding, attn_mask=mask, is_causal=causal, need_weights=False)
    for b in range(2):
        kept = ~padding[b]
        xs = x[b:b + 1, kept]
        n = xs.shape[1]
        alone, _ = m(xs, xs, xs, attn_mask=nn.Transformer.generate_square_subsequent_mask(n) if causal else None,
                     is_causal=causal, need_weights=False)
        assert_close(out[b:b + 1, kept], alone, 1e-12, f"row {b}")


@pytest.mark.parametrize("method", METHODS)
def test_dropout_skips_whole_keys(method):
    m = module(method, dropout=1.0).train()  # every key skipped: nothing is written, out is the bias
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    out, _ = m(x, x, x, need_weights=False)
    assert_close(out, m.out_proj.bias.expand_as(out), 1e-12, method)
    m.dropout = 0.5
    a, b = m(x, x, x, need_weights=False)[0], m(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_swapped_encoder_trains_every_new_parameter(method):
    assert_swapped_encoder_trains(method)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_module_equals_eager(method):
    assert_compiled_module_equals_eager(module(method, dtype=torch.float32), torch.randn(2, 70, 16),
                                        nn.Transformer.generate_square_subsequent_mask(70))
