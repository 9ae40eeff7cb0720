"""Each method of linattn.nn.MultiheadAttention against a float64 multi-head reference built from
the module's own weights, plus the method-specific behaviour (errors, dropout, redraws, compile)."""
import pytest
import torch
from torch import nn

import linattn
from linattn import reference
from conftest import CAUSAL, METHOD_OPTIONS, assert_close, build_module as _build

def _reference(module, query, key, value, key_padding_mask, causal):
    """The module's forward in float64 with linattn.reference's formulas (batch_first inputs)."""
    E, H = module.embed_dim, module.num_heads
    W, b = module.in_proj_weight.double(), module.in_proj_bias.double()
    heads = lambda x, w, bias: (x.double() @ w.T + bias).view(x.shape[0], x.shape[1], H, -1).transpose(1, 2)
    q, k, v = heads(query, W[:E], b[:E]), heads(key, W[E:2 * E], b[E:2 * E]), heads(value, W[2 * E:], b[2 * E:])
    core, method = module.core, module.method
    if method == "softmax":
        out = reference.softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    elif method == "linear":
        out, _ = reference.linear_attention(q, k, v, causal=causal, feature_map=core.feature_map, eps=core.eps,
                                            key_padding_mask=key_padding_mask)
    elif method == "performer":
        out = reference.performer_attention(q, k, v, core.projection, causal=causal, kernel=core.kernel, eps=0.0,
                                            key_padding_mask=key_padding_mask)
    elif method in ("local", "longformer"):
        global_mask = None
        if method == "longformer":
            global_mask = (torch.arange(key.shape[1]) < core.global_tokens).expand(key.shape[0], key.shape[1])
        out = reference.sliding_window_attention(q, k, v, core.window, causal=causal, dilation=core.dilation,
                                                 global_mask=global_mask, key_padding_mask=key_padding_mask)
    elif method == "hybrid":
        g = torch.sigmoid(core.gate.double())[None, :, None, None]
        linear, _ = reference.linear_attention(q, k, v, causal=causal, feature_map=core.linear.feature_map,
                                               eps=core.linear.eps, key_padding_mask=key_padding_mask)
        local = reference.sliding_window_attention(q, k, v, core.local.window, causal=causal,
                                                   key_padding_mask=key_padding_mask)
        out = g * linear + (1 - g) * local
    elif method == "bigbird":
        out = reference.block_sparse_attention(q, k, v, core.layout(key.shape[1], key.device), core.block_size,
                                               causal=causal, key_padding_mask=key_padding_mask)
    elif method == "efficient":
        out = reference.efficient_attention(q, k, v, key_padding_mask=key_padding_mask)
    elif method == "reformer":  # shared QK: the query projection is the keys too
        buckets = linattn.lsh.lsh_buckets(q, core.rotations(q.shape[2], q.device, q.dtype))
        out = reference.lsh_attention(q, v, buckets, core.bucket_size, causal=causal, key_padding_mask=key_padding_mask)
    elif method == "additive":
        out = reference.additive_attention(q, k, v, core.w, window=core.window, causal=causal,
                                           key_padding_mask=key_padding_mask)
    else:
        out = reference.linformer_attention(q, k, v, core.E, core.value_projection(), key_padding_mask=key_padding_mask)
    out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], E)
    return out @ module.out_proj.weight.double().T + module.out_proj.bias.double()


@pytest.mark.parametrize("name", list(METHOD_OPTIONS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("length", [1, 37])
def test_method_matches_reference(name, causal, masked, length):
    method = name.split("-")[0]
    if causal and method not in CAUSAL:
        pytest.skip("non-causal method")
    torch.manual_seed(0)
    module = _build(name)
    if method == "performer":
        module.core.eps = 1e-300  # the reference has no stabilizer, so no eps to scale (≈ 0)
    if method == "hybrid":
        with torch.no_grad():
            module.core.gate.copy_(torch.tensor([-1.0, 0.5, 2.0]))  # an uneven mix per head
    g = torch.Generator().manual_seed(1)
    x = (0.5 * torch.randn(2, length, 24, generator=g)).requires_grad_()
    mask = (torch.rand(2, length, generator=g) < 0.3) if masked else None
    if mask is not None:
        mask[:, 0] = False
    attn_mask = nn.Transformer.generate_square_subsequent_mask(length) if causal else None
    out, weights = module(x, x, x, key_padding_mask=mask, attn_mask=attn_mask, is_causal=causal,
                          need_weights=True, average_attn_weights=False)
    expected = _reference(module, x, x, x, mask, causal)
    assert_close(out, expected, 1e-5, "output")
    g_out = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [x, module.in_proj_weight], g_out)
    want = torch.autograd.grad(expected, [x, module.in_proj_weight], g_out.double())
    for a, b in zip(got, want):
        assert_close(a, b, 1e-5, "gradient")
    # The returned weights are what the method applies: out = out_proj(weights @ v).
    assert weights.shape == (2, 3, length, length)
    v = (x @ module.in_proj_weight[48:].T + module.in_proj_bias[48:]).view(2, length, 3, 8).transpose(1, 2)
    rebuilt = module.out_proj((weights @ v).transpose(1, 2).reshape(2, length, 24))
    assert_close(rebuilt, out, 1e-5, "weights @ v")
    if causal:
        assert torch.all(weights.triu(1) == 0)
    # need_weights=False takes the fast path and must give the same output.
    fast, none = module(x, x, x, key_padding_mask=mask, attn_mask=attn_mask, is_causal=causal, need_weights=False)
    assert none is None
    assert_close(fast, out, 1e-5, "need_weights=False")


@pytest.mark.parametrize("name", list(METHOD_OPTIONS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_method_dtypes_and_layouts(name, batch_first):
    torch.manual_seed(0)
    module = _build(name, batch_first=batch_first).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    inputs = x if batch_first else x.transpose(0, 1)
    out64 = module(inputs, inputs, inputs, need_weights=False)[0]
    sample = inputs[0] if batch_first else inputs[:, 0]
    unbatched, weights = module(sample, sample, sample)
    assert_close(unbatched, out64[0] if batch_first else out64[:, 0], 1e-10, "unbatched")
    assert weights.shape == (9, 9)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        low = _build(name, batch_first=batch_first).to(dtype)
        low.load_state_dict(module.state_dict())
        # Rounding the weights is part of the error; compare with float64 on the rounded weights.
        exact = _build(name, batch_first=batch_first).double()
        exact.load_state_dict(low.state_dict())
        expected = exact(inputs, inputs, inputs, need_weights=False)[0]
        out = low(inputs.to(dtype), inputs.to(dtype), inputs.to(dtype), need_weights=False)[0]
        assert out.dtype == dtype
        assert_close(out, expected, tol, str(dtype))


@pytest.mark.parametrize("name", list(METHOD_OPTIONS))
def test_compiled_module_matches_eager(name):
    torch.manual_seed(0)
    module = _build(name)
    causal = name.split("-")[0] in CAUSAL
    x = torch.randn(2, 17, 24, requires_grad=True)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[1, -4:] = True
    kwargs = dict(key_padding_mask=mask, need_weights=False, is_causal=causal,
                  attn_mask=nn.Transformer.generate_square_subsequent_mask(17) if causal else None)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    eager = module(x, x, x, **kwargs)[0]
    got = compiled(x, x, x, **kwargs)[0]
    assert_close(got, eager, 1e-5, "compiled output")
    g1 = torch.autograd.grad(eager.sum(), [x, module.in_proj_weight])
    g2 = torch.autograd.grad(got.sum(), [x, module.in_proj_weight])
    for a, b in zip(g2, g1):
        assert_close(a, b, 1e-5, "compiled gradient")


def test_unknown_method_and_options_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'favor'.*available methods: \['additive', 'bigbird', 'deltanet', 'efficient', 'forgetting', 'gated_deltanet', 'gla', 'hybrid', 'kda', 'linear'"):
        linattn.nn.MultiheadAttention(16, 2, method="favor")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nb_features'\]; valid options: \['feature_map', 'eps'\]"):
        linattn.nn.MultiheadAttention(16, 2, method="linear", nb_features=3)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linattn.nn.MultiheadAttention(16, 2, method="linear", feature_map="gelu")
    with pytest.raises(ValueError, match="needs max_seq_len"):
        linattn.nn.MultiheadAttention(16, 2, method="linformer")
    with pytest.raises(ValueError, match="sharing must be one of"):
        linattn.nn.MultiheadAttention(16, 2, method="linformer", max_seq_len=8, sharing="all")


def test_masks_a_method_cannot_honour_raise():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    linear = linattn.nn.MultiheadAttention(16, 2, batch_first=True, method="linear")
    banded = torch.ones(6, 6, dtype=torch.bool).triu(2)
    with pytest.raises(ValueError, match=r"method='linear'.*supports attn_mask=None or the causal mask"):
        linear(x, x, x, attn_mask=banded)
    with pytest.raises(ValueError, match="0 and -inf"):
        linear(x, x, x, attn_mask=torch.randn(6, 6))
    with pytest.raises(ValueError, match="float key_padding_mask may only hold"):
        linear(x, x, x, key_padding_mask=torch.randn(1, 6))
    # An all-False bool mask or an all-zero float mask means no mask; the causal mask without
    # the is_causal hint is recognised.
    plain = linear(x, x, x, need_weights=False)[0]
    assert torch.equal(linear(x, x, x, attn_mask=torch.zeros(6, 6, dtype=torch.bool), need_weights=False)[0], plain)
    causal = linear(x, x, x, is_causal=True, need_weights=False,
                    attn_mask=nn.Transformer.generate_square_subsequent_mask(6))[0]
    inferred = linear(x, x, x, need_weights=False, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1))[0]
    assert torch.equal(causal, inferred)
    for method, options in (("efficient", {}), ("linformer", {"max_seq_len": 8})):
        module = linattn.nn.MultiheadAttention(16, 2, batch_first=True, method=method, **options)
        with pytest.raises(ValueError, match="non-causal only"):
            module(x, x, x, is_causal=True, attn_mask=nn.Transformer.generate_square_subsequent_mask(6))
    linformer = linattn.nn.MultiheadAttention(16, 2, batch_first=True, method="linformer", max_seq_len=4)
    with pytest.raises(ValueError, match="6 tokens, more than max_seq_len=4"):
        linformer(x, x, x)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        linear(x, x, x, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim=16"):
        linear(torch.randn(1, 6, 8), x, x)


def test_linformer_accepts_shorter_inputs():
    torch.manual_seed(0)
    module = linattn.nn.MultiheadAttention(16, 2, batch_first=True, method="linformer", max_seq_len=32, k=8)
    for length in (1, 5, 32):
        x = torch.randn(2, length, 16)
        out, weights = module(x, x, x)
        assert out.shape == (2, length, 16) and weights.shape == (2, length, length)


@pytest.mark.parametrize("name", ["linear", "performer", "efficient", "linformer", "softmax", "local", "bigbird",
                                  "reformer"])
def test_dropout_is_applied_in_training_only_and_unbiased(name):
    torch.manual_seed(0)
    module = _build(name, dropout=0.3)
    if name == "performer":
        module.core.feature_redraw_interval = None
    x = torch.randn(1, 10, 24)
    with torch.no_grad():
        module.eval()
        reference_out = module(x, x, x, need_weights=False)[0]
        assert torch.equal(module(x, x, x, need_weights=False)[0], reference_out)
        module.train()
        draws = torch.stack([module(x, x, x, need_weights=False)[0] for _ in range(400)])
    assert not torch.allclose(draws[0], reference_out)
    # Dropout keeps the expectation: the mean of many draws approaches the eval output.
    assert (draws.mean(0) - reference_out).norm() < 0.1 * reference_out.norm()


@pytest.mark.parametrize("name", ["linear", "performer", "efficient"])
def test_dropping_every_key_leaves_the_output_bias(name):
    # p = 1 drops every key: the values are 0, not 0/0 (torch's dropout with p = 1 gives zeros too).
    torch.manual_seed(0)
    module = _build(name, dropout=1.0).train()
    x = torch.randn(2, 7, 24)
    out = module(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(out, module.out_proj.bias.expand_as(out))


@pytest.mark.parametrize("name", ["local-dilated", "longformer", "bigbird", "reformer"])
def test_restricted_methods_drop_probabilities_in_the_operator(name):
    """local, longformer, bigbird and reformer drop attention probabilities pair by pair in the
    operator (not whole keys): the weights need_weights returns in training are the dropped ones the
    output applied (out = out_proj(weights @ v)), about p of the visible pairs are 0 and the kept
    ones are the undropped weights / (1 − p) (reformer: a pair seen in two rounds may be dropped in
    one), and torch.manual_seed reproduces the draw."""
    p, T = 0.4, 37
    torch.manual_seed(0)
    module = _build(name, dropout=p)
    x = torch.randn(2, T, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        undropped = module.eval()(x, x, x, need_weights=True, average_attn_weights=False)[1]
        module.train()
        torch.manual_seed(5)
        out, weights = module(x, x, x, need_weights=True, average_attn_weights=False)
        torch.manual_seed(5)
        again = module(x, x, x, need_weights=True, average_attn_weights=False)
        fast = module(x, x, x, need_weights=False)[0]
    assert torch.equal(again[0], out) and torch.equal(again[1], weights)
    assert not torch.allclose(fast, out)  # a fresh draw
    v = (x @ module.in_proj_weight[48:].T + module.in_proj_bias[48:]).view(2, T, 3, 8).transpose(1, 2)
    rebuilt = module.out_proj((weights @ v).transpose(1, 2).reshape(2, T, 24))
    assert_close(rebuilt, out, 1e-5, "weights @ v")
    visible = undropped > 0
    dropped = (visible & (weights == 0)).sum().item() / visible.sum().item()
    kept = weights > 0
    if name == "reformer":  # dropped in every round that saw the pair
        assert 0.5 * p < dropped < p + 0.05
    else:
        assert abs(dropped - p) < 0.05
        assert_close(weights[kept], undropped[kept] / (1 - p), 1e-6, "kept weights")
    # Pairs, not whole keys: most keys are kept for some queries and dropped for others.
    mixed = ((visible & (weights == 0)).any(-2) & kept.any(-2)).sum().item() / visible.any(-2).sum().item()
    assert mixed > 0.5


def test_performer_redraws_in_training_only():
    module = _build("performer", dropout=0.0)
    module.core.feature_redraw_interval = 2
    x = torch.randn(1, 5, 24)
    first = module.core.projection.clone()
    module.eval()
    for _ in range(5):
        module(x, x, x)
    assert torch.equal(module.core.projection, first)
    module.train()
    module(x, x, x), module(x, x, x)
    assert torch.equal(module.core.projection, first)
    module(x, x, x)  # the third training call is past the interval
    assert not torch.equal(module.core.projection, first)


@pytest.mark.parametrize("method", ["linear", "performer"])
@pytest.mark.parametrize("bias_kv,zero_attn", [(True, False), (False, True), (True, True)])
def test_causal_kernel_with_keys_every_query_sees(method, bias_kv, zero_attn):
    """add_bias_kv / add_zero_attn keys are visible to every query even under a causal mask (as in
    torch); the causal kernels take them as an initial state. Checked against the quadratic form."""
    torch.manual_seed(0)
    options = {"nb_features": 32, "seed": 0, "eps": 1e-300} if method == "performer" else {}
    module = linattn.nn.MultiheadAttention(24, 3, batch_first=True, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                           method=method, **options).double()
    with torch.no_grad():
        if bias_kv:
            module.bias_k.normal_(), module.bias_v.normal_()
    x = 0.5 * torch.randn(2, 11, 24, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.float64)
    out, weights = module(x, x, x, attn_mask=mask, is_causal=True, average_attn_weights=False)

    W, b = module.in_proj_weight, module.in_proj_bias
    heads = lambda t: t.view(t.shape[0], t.shape[1], 3, 8).transpose(1, 2)
    q, k, v = (heads(x @ W[i * 24:(i + 1) * 24].T + b[i * 24:(i + 1) * 24]) for i in range(3))
    extra_k, extra_v = [], []
    if bias_kv:
        extra_k.append(heads(module.bias_k.expand(2, 1, 24))), extra_v.append(heads(module.bias_v.expand(2, 1, 24)))
    if zero_attn:
        extra_k.append(torch.zeros(2, 3, 1, 8, dtype=torch.float64)), extra_v.append(torch.zeros(2, 3, 1, 8, dtype=torch.float64))
    keys, values = torch.cat([k, *extra_k], dim=2), torch.cat([v, *extra_v], dim=2)
    if method == "linear":
        phi = lambda t: torch.nn.functional.elu(t) + 1
    else:
        phi = lambda t: reference.favor_features(t, module.core.projection)
    scores = phi(q) @ phi(keys).transpose(-1, -2)
    visible = torch.ones(11, keys.shape[2], dtype=torch.bool)
    visible[:, :11] = torch.ones(11, 11, dtype=torch.bool).tril()
    scores = scores * visible
    expected_weights = scores / (scores.sum(-1, keepdim=True) + module.core.eps)
    expected = module.out_proj((expected_weights @ values).transpose(1, 2).reshape(2, 11, 24))
    assert_close(out, expected, 1e-10, "output")
    assert_close(weights, expected_weights, 1e-10, "weights")
    fast, _ = module(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    assert_close(fast, expected, 1e-10, "need_weights=False")
