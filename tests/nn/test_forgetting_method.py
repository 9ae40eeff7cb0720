"""The method "forgetting" of linattn.nn.MultiheadAttention (the Forgetting Transformer, docs/methods.md
§5.1): the forget gate from the head's key as documented and its initial decays, the implicit
weights, key padding, dropout in the operator, windows and soft-capping, token-by-token decoding equal
to the whole sequence, swap_attention into an encoder that then trains its gates, and
torch.compile(fullgraph=True) equal to eager."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linattn
from linattn import reference

from conftest import assert_close, assert_compiled_module_equals_eager, assert_swapped_encoder_trains, module_heads


def module(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    m = linattn.nn.MultiheadAttention(16, 2, method="forgetting", batch_first=True, dtype=dtype, **kwargs)
    with torch.no_grad():  # token-dependent gates, as after training
        m.core.forget_weight.copy_(torch.randn_like(m.core.forget_weight))
        m.core.forget_bias.copy_(torch.randn_like(m.core.forget_bias) + 2)
    return m


def causal_mask(n, dtype=torch.float32):
    return nn.Transformer.generate_square_subsequent_mask(n, dtype=dtype)


def test_initial_gates_decay_slowly():
    m = linattn.nn.MultiheadAttention(16, 4, method="forgetting", batch_first=True)
    x = torch.randn(1, 5, 16)
    _, k, _ = module_heads(m, x)
    rates = -m.core.log_forget(k)[0, :, 0]  # the same for every token at first
    torch.testing.assert_close(rates, torch.logspace(-5, -3, 4), rtol=1e-4, atol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("options", [{}, {"window": 3, "softcap": 2.0}])
def test_the_module_computes_the_documented_attention(causal, options):
    m = module(**options)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, weights = m(x, x, x, is_causal=causal, attn_mask=causal_mask(9, torch.float64) if causal else None,
                     average_attn_weights=False)
    q, k, v = module_heads(m, x)
    core = m.core
    log_f = F.logsigmoid(torch.einsum("nhtd,hd->nht", k, core.forget_weight) + core.forget_bias[:, None])
    if "softcap" in options:  # the reference's scores capped: cap(s) = c·tanh(s / c), as the method does
        visible = linattn.window_mask(9, 9, options["window"], causal=causal, batch=2)
        bias = reference.forget_decay(log_f, 9, 9)
        ref = reference.masked_softmax_attention(q, k, v, visible, q.shape[-1] ** -0.5, bias=bias,
                                                 softcap=options["softcap"])
    else:
        ref = reference.forgetting_attention(q, k, v, log_f, causal=causal)
    assert_close(out, m.out_proj(ref.transpose(1, 2).flatten(2)), 1e-12, "out")
    assert_close(out, m.out_proj((weights @ v).transpose(1, 2).flatten(2)), 1e-12, "weights")
    if causal:
        assert weights.triu(1).abs().max() == 0


def test_padded_keys_are_not_seen():
    m = module()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 5:] = True
    out, _ = m(x, x, x, key_padding_mask=padding, need_weights=False)
    alone, _ = m(x[:1, :5], x[:1, :5], x[:1, :5], need_weights=False)
    assert_close(out[:1, :5], alone, 1e-12, "padded row")


def test_dropout_in_the_operator():
    m = module(dropout=0.5).train()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.manual_seed(1)
    out, weights = m(x, x, x, average_attn_weights=False)
    _, _, v = module_heads(m, x)
    assert_close(out, m.out_proj((weights @ v).transpose(1, 2).flatten(2)), 1e-12, "dropped weights")
    a, b = m(x, x, x, need_weights=False)[0], m(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("window", [-1, 4])
def test_decoding_token_by_token_equals_the_whole_sequence(window):
    m = module(window=window).eval()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    whole, _ = m(x, x, x, attn_mask=causal_mask(11, torch.float64), is_causal=True, need_weights=False)
    cache = linattn.nn.DecodingCache()
    prompt, _ = m(x[:, :4], x[:, :4], x[:, :4], need_weights=False, cache=cache)
    steps = [prompt] + [m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], need_weights=False, cache=cache)[0]
                        for t in range(4, 11)]
    assert_close(torch.cat(steps, 1), whole, 1e-12, "decoded")
    assert cache.seen_tokens(m) == 11


def test_swapped_encoder_trains_its_gates():
    assert_swapped_encoder_trains("forgetting")


def test_compiled_module_equals_eager():
    assert_compiled_module_equals_eager(module(dtype=torch.float32), torch.randn(2, 70, 16), causal_mask(70))
