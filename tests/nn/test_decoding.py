"""Incremental decoding through linattn.nn.MultiheadAttention(cache=DecodingCache()): feeding a
sequence in pieces (a prompt, then tokens one by one, then chunks) must give what the whole
causal sequence gives at once, for every method that decodes; the cache's size must stay
constant for the recurrent methods and the window, batch rows can be selected (beam search),
gradients flow through it, and misuse raises clear errors."""
import pytest
import torch

from linattn.nn import DecodingCache, MultiheadAttention

from conftest import assert_close

CASES = [
    ("softmax", {}),
    ("linear", {}),
    ("linear", {"feature_map": "relu"}),
    ("performer", {"seed": 1, "nb_features": 9}),
    ("performer", {"seed": 2, "kernel": "relu"}),
    ("local", {"window": 5}),
    ("local", {"window": 6, "dilation": 2}),
    ("local", {"window": (3, 7)}),
    ("local", {"window": 5, "sinks": True}),
    ("local", {"window": 5, "softcap": 0.8}),
    ("local", {"window": 5, "sinks": True, "softcap": 0.8}),
    ("hybrid", {"window": 4}),
    ("deltanet", {}),
    ("gated_deltanet", {}),
    ("kda", {}),
]
IDS = [f"{method}-{'-'.join(f'{k}={v}' for k, v in opts.items())}" for method, opts in CASES]
PIECES = (5, 1, 1, 3, 1, 7, 1, 1, 1, 2)  # 23 tokens: a prompt, steps and chunks
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


def module(method, opts, dtype=torch.float64, batch_first=True, **kwargs):
    torch.manual_seed(0)
    m = MultiheadAttention(16, 2, method=method, batch_first=batch_first, dtype=dtype, **opts, **kwargs).eval()
    if method == "hybrid":
        with torch.no_grad():
            m.core.gate.copy_(torch.tensor([0.7, -1.2]))
    if opts.get("sinks"):  # learned sinks, away from their zero init
        with torch.no_grad():
            m.core.sinks.copy_(torch.tensor([0.5, -1.0]))
    if method in ("deltanet", "gated_deltanet", "kda"):  # token-dependent β and gate, as after training
        with torch.no_grad():
            for p in m.core.parameters():
                p.copy_(torch.randn_like(p))
    return m


def whole(m, x):
    """The causal output for the whole sequence, in one call."""
    T = x.shape[1] if m.batch_first else x.shape[0]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    return m(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]


def pieces(m, x, cache, sizes=PIECES, dim=1):
    outs, start = [], 0
    for n in sizes:
        piece = x.narrow(dim, start, n)
        outs.append(m(piece, piece, piece, need_weights=False, cache=cache)[0])
        start += n
    return torch.cat(outs, dim)


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_pieces_equal_the_whole_sequence(method, opts, dtype):
    m = module(method, opts, dtype)
    x = torch.randn(3, sum(PIECES), 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = whole(m, x)
    cache = DecodingCache()
    with torch.no_grad():
        got = pieces(m, x, cache)
    assert got.dtype == dtype
    assert_close(got, expected, TOL[dtype], f"{method} {opts}")
    assert cache.seen_tokens(m) == sum(PIECES) and len(cache) == 1


@pytest.mark.parametrize("method,opts", CASES[:5], ids=IDS[:5])
@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn"])
def test_keys_every_query_sees(method, opts, extra):
    """add_bias_kv / add_zero_attn keys are seen by every query, cached or not."""
    m = module(method, opts, **{extra: True})
    x = torch.randn(2, sum(PIECES), 16, dtype=torch.float64)
    T = x.shape[1]
    # An explicit causal mask (with key padding, so torch takes the masked path) keeps those keys visible.
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    expected = m(x, x, x, attn_mask=mask, key_padding_mask=torch.zeros(2, T, dtype=torch.bool), need_weights=False)[0]
    assert_close(pieces(m, x, DecodingCache()), expected, 1e-12, method)


@pytest.mark.parametrize("batch_first", [True, False])
def test_layouts(batch_first):
    m = module("linear", {}, batch_first=batch_first)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    got = pieces(m, x, DecodingCache(), sizes=(4, 1, 4), dim=1 if batch_first else 0)
    assert_close(got, whole(m, x), 1e-12)
    # Unbatched (L, E) inputs, as torch's module takes them.
    single = x[0] if batch_first else x[:, 0]
    cache = DecodingCache()
    steps = torch.cat([m(t[None], t[None], t[None], need_weights=False, cache=cache)[0] for t in single])
    assert_close(steps, whole(m, single[None] if batch_first else single[:, None]).squeeze(0 if batch_first else 1),
                 1e-12)


@pytest.mark.parametrize("method,opts", [CASES[0], CASES[1], CASES[5], CASES[8], CASES[10]],
                         ids=[IDS[0], IDS[1], IDS[5], IDS[8], IDS[10]])
def test_cache_size(method, opts):
    """Constant for linear (the state) and local (the window), growing for softmax."""
    m = module(method, opts)
    cache = DecodingCache()
    sizes = []
    with torch.no_grad():
        for _ in range(40):
            x = torch.randn(2, 1, 16, dtype=torch.float64)
            m(x, x, x, need_weights=False, cache=cache)
            sizes.append(cache.memory_bytes())
    if method == "softmax":
        assert sizes[-1] > sizes[0]
    else:
        assert sizes[5] == sizes[-1]
        if method == "linear":  # S (2, 2, 8, 8) and z (2, 2, 8) in float64
            assert sizes[-1] == (2 * 2 * 8 * 8 + 2 * 2 * 8) * 8
        if method in ("gated_deltanet", "kda"):  # S (2, 2, 8, 8) in float64
            assert sizes[-1] == 2 * 2 * 8 * 8 * 8


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_select_rows_for_beam_search(method, opts):
    m = module(method, opts)
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    cache = DecodingCache()
    with torch.no_grad():
        pieces(m, x, cache, sizes=(6, 1))
        cache.select(torch.tensor([2, 0]))
        rest = pieces(m, x[[2, 0], 7:], cache, sizes=(1, 4))
    assert_close(rest, whole(m, x[[2, 0]])[:, 7:], 1e-12, method)


@pytest.mark.parametrize("method,opts", [CASES[0], CASES[1], CASES[3], CASES[5], CASES[8], CASES[10]],
                         ids=[IDS[0], IDS[1], IDS[3], IDS[5], IDS[8], IDS[10]])
def test_gradients_flow_through_the_cache(method, opts):
    m = module(method, opts)
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 11, 16, dtype=torch.float64)
    (pieces(m, x, DecodingCache(), sizes=(4, 1, 1, 5)) * w).sum().backward()
    got = x.grad.clone(), m.in_proj_weight.grad.clone()
    x.grad = None
    m.zero_grad()
    (whole(m, x) * w).sum().backward()
    assert_close(got[0], x.grad, 1e-10, "input")
    assert_close(got[1], m.in_proj_weight.grad, 1e-10, "in_proj_weight")


def test_layers_keep_their_own_entries():
    a, b = module("linear", {}), module("softmax", {})
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    cache = DecodingCache()
    y = pieces(a, x, cache, sizes=(3, 1, 4))
    z = pieces(b, y, cache, sizes=(3, 1, 4))
    assert len(cache) == 2
    assert_close(z, whole(b, whole(a, x)), 1e-12)
    cache.reset()
    assert len(cache) == 0 and cache.memory_bytes() == 0


@pytest.mark.parametrize("method,opts", [
    ("efficient", {}), ("linformer", {"max_seq_len": 32}), ("longformer", {}), ("bigbird", {}),
    ("reformer", {}), ("additive", {}),
])
def test_methods_without_decoding_raise(method, opts):
    m = module(method, opts)
    x = torch.randn(1, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="supports the methods"):
        m(x, x, x, need_weights=False, cache=DecodingCache())


def test_misuse_raises():
    m = module("linear", {})
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    cache = DecodingCache()
    with pytest.raises(ValueError, match="need_weights=False"):
        m(x, x, x, cache=cache)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, need_weights=False, attn_mask=torch.zeros(3, 3, dtype=torch.bool), cache=cache)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool), cache=cache)
    with pytest.raises(ValueError, match="same new tokens"):
        m(x, x[:, :2], x[:, :2], need_weights=False, cache=cache)
    with pytest.raises(TypeError, match="DecodingCache"):
        m(x, x, x, need_weights=False, cache={})
    m(x, x, x, need_weights=False, cache=cache)
    with pytest.raises(ValueError, match="batch of 2"):
        m(x[:1], x[:1], x[:1], need_weights=False, cache=cache)
    training = MultiheadAttention(16, 2, dropout=0.1, method="linear", batch_first=True, dtype=torch.float64)
    with pytest.raises(ValueError, match="dropout"):
        training(x, x, x, need_weights=False, cache=DecodingCache())
    unbounded = module("local", {"window": -1})
    with pytest.raises(ValueError, match="bounded window"):
        unbounded(x, x, x, need_weights=False, cache=DecodingCache())


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_compiled_decoding_equals_eager_without_a_graph_per_step(method, opts):
    """A decoding step under torch.compile(fullgraph=True) gives the eager outputs, and compiles a
    few graphs, not one per token: the states and the window's ring buffer have a fixed shape
    (the ring's write slot is a tensor, not a constant to specialise on); softmax's KV cache
    settles on dynamic shapes after its first doublings. Under dynamo's recompile limit (8)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = module(method, opts, dtype=torch.float32)
    x = torch.randn(2, 48, 16, generator=torch.Generator().manual_seed(3))

    def step(token, cache):
        return m(token, token, token, need_weights=False, cache=cache)[0]

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    eager_cache, compiled_cache = DecodingCache(), DecodingCache()
    with torch.no_grad():
        for t in range(x.shape[1]):
            token = x[:, t:t + 1]
            torch.testing.assert_close(compiled(token, compiled_cache), step(token, eager_cache), atol=1e-6, rtol=1e-6)
    assert counter.frame_count <= (8 if method == "softmax" else 4), counter.frame_count
