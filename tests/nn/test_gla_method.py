"""The method "gla" of linattn.nn.MultiheadAttention (gated linear attention, docs/methods.md §1):
the per-channel log-gates from the head's key as documented (and their initial range), the implicit
weights, key padding that writes and fades nothing, dropout that skips keys, causal only, decoding
token by token through a DecodingCache, swap_attention into an encoder that then trains, and
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
    m = linattn.nn.MultiheadAttention(16, 2, method="gla", batch_first=True, dtype=dtype, **kwargs)
    with torch.no_grad():  # token-dependent gates, as after training
        for p in m.core.parameters():
            p.copy_(torch.randn_like(p))
    return m


def causal_mask(n, dtype=torch.float32):
    return nn.Transformer.generate_square_subsequent_mask(n, dtype=dtype)


def test_initial_gates_fade_slowly_and_do_not_depend_on_the_token():
    m = linattn.nn.MultiheadAttention(16, 2, method="gla", batch_first=True)
    k = torch.randn(3, 2, 5, 8)
    gate = m.core.log_gates(k)
    assert gate.shape == (3, 2, 5, 8)
    torch.testing.assert_close(gate, gate[:1, :1, :1].expand_as(gate))  # the same for every token and head
    rates = -gate[0, 0, 0].double()
    torch.testing.assert_close(rates, torch.logspace(-4, -2, 8, dtype=torch.float64), rtol=1e-5, atol=0)


def test_the_module_computes_the_documented_recurrence():
    m = module()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, _ = m(x, x, x, is_causal=True, attn_mask=causal_mask(9), need_weights=False)
    q, k, v = module_heads(m, x)
    core = m.core
    gate = F.logsigmoid(torch.einsum("nhtd,hed->nhte", k, core.gates.weight) + core.gates.bias[:, None]) / 16
    assert (gate <= 0).all() and gate.shape == (2, 2, 9, 8)
    ref, _ = reference.decayed_linear_attention(q, k, v, gate)
    assert_close(out, m.out_proj(ref.transpose(1, 2).flatten(2)), 1e-12, "gla")


def test_weights_are_the_matrix_the_output_applies():
    m = module()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    out, weights = m(x, x, x, attn_mask=causal_mask(7, torch.float64), is_causal=True, average_attn_weights=False)
    _, _, v = module_heads(m, x)
    assert weights.shape == (2, 2, 7, 7) and weights.triu(1).abs().max() == 0
    assert_close(out, m.out_proj((weights @ v).transpose(1, 2).flatten(2)), 1e-12, "gla")


def test_padded_keys_write_and_fade_nothing():
    m = module()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 5:] = True
    padding[1, 2] = True  # a hole in the middle: the later tokens must not see it fade the state
    out, _ = m(x, x, x, key_padding_mask=padding, attn_mask=causal_mask(8), is_causal=True, need_weights=False)
    for b in range(2):
        kept = ~padding[b]
        xs = x[b:b + 1, kept]
        alone, _ = m(xs, xs, xs, attn_mask=causal_mask(xs.shape[1]), is_causal=True, need_weights=False)
        assert_close(out[b:b + 1, kept], alone, 1e-12, f"row {b}")


def test_dropout_skips_whole_keys():
    m = module(dropout=1.0).train()  # every key dropped: the output is the projection's bias
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    out, _ = m(x, x, x, attn_mask=causal_mask(6), is_causal=True, need_weights=False)
    assert_close(out, m.out_proj.bias.expand_as(out), 1e-12, "gla")
    m.dropout = 0.5
    a = m(x, x, x, attn_mask=causal_mask(6), is_causal=True, need_weights=False)[0]
    b = m(x, x, x, attn_mask=causal_mask(6), is_causal=True, need_weights=False)[0]
    assert not torch.allclose(a, b)


def test_causal_only():
    m = module()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="causal only"):
        m(x, x, x)


def test_decoding_token_by_token_equals_the_whole_sequence():
    m = module().eval()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    whole, _ = m(x, x, x, attn_mask=causal_mask(11), is_causal=True, need_weights=False)
    cache = linattn.nn.DecodingCache()
    pieces = [m(x[:, :4], x[:, :4], x[:, :4], need_weights=False, cache=cache)[0]]  # a prompt, then tokens
    for t in range(4, 11):
        xt = x[:, t:t + 1]
        pieces.append(m(xt, xt, xt, need_weights=False, cache=cache)[0])
    assert_close(torch.cat(pieces, 1), whole, 1e-12, "decoded")


def test_swapped_encoder_trains_every_new_parameter():
    assert_swapped_encoder_trains("gla")


def test_compiled_module_equals_eager():
    assert_compiled_module_equals_eager(module(dtype=torch.float32), torch.randn(2, 70, 16), causal_mask(70))
