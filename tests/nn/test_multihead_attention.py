"""linattn.nn.MultiheadAttention against torch.nn.MultiheadAttention: the plumbing (softmax must
match torch across the option grid), the state_dict contract and the mask rules."""
import itertools
import random

import pytest
import torch
from torch import nn

import linattn
from conftest import assert_close


def _configs():
    """A deterministic sample of the option grid (the full product has thousands of cells)."""
    grid = list(itertools.product(
        [False, True],  # batch_first
        [True, False],  # batched
        [None, (12, 20)],  # kdim, vdim
        [True, False],  # bias
        [False, True],  # add_bias_kv
        [False, True],  # add_zero_attn
        [None, "bool", "float"],  # key_padding_mask
        [None, "bool2d", "float3d", "causal"],  # attn_mask
        [False, True],  # need_weights
        [True, False],  # average_attn_weights
    ))
    return random.Random(0).sample(grid, 120)


def _inputs(config, embed=16, heads=4, length=7, source_length=9, batch=3, generator=None):
    batch_first, batched, kvdim, bias, bias_kv, zero_attn, kpm, mask, need_weights, average = config
    g = torch.Generator().manual_seed(1) if generator is None else generator
    kdim, vdim = kvdim or (embed, embed)
    if mask == "causal":
        source_length = length
    shape = lambda n, e: ((batch, n, e) if batch_first else (n, batch, e)) if batched else (n, e)
    query = torch.randn(shape(length, embed), generator=g)
    if kvdim is None and mask != "causal" and source_length == length:
        key = value = query
    else:
        key = torch.randn(shape(source_length, kdim), generator=g)
        value = torch.randn(shape(source_length, vdim), generator=g)
    n = batch if batched else 1
    key_padding_mask = None
    if kpm is not None:
        padded = torch.rand(n, source_length, generator=g) < 0.3
        padded[:, 0] = False  # no fully padded rows: torch returns NaN for those
        key_padding_mask = padded if kpm == "bool" else torch.zeros(n, source_length).masked_fill(padded, float("-inf"))
        if not batched:
            key_padding_mask = key_padding_mask[0]
    attn_mask, is_causal = None, False
    if mask == "bool2d":
        attn_mask = torch.rand(length, source_length, generator=g) < 0.3
        attn_mask[:, 0] = False
    elif mask == "float3d":
        attn_mask = torch.randn(n * heads if batched else heads, length, source_length, generator=g)
    elif mask == "causal":
        attn_mask, is_causal = nn.Transformer.generate_square_subsequent_mask(length), True
    if kpm == "bool" and attn_mask is not None and attn_mask.is_floating_point():
        key_padding_mask = torch.zeros(key_padding_mask.shape).masked_fill(key_padding_mask, float("-inf"))
    if kpm == "float" and attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape).masked_fill(attn_mask, float("-inf"))
    module_args = dict(embed_dim=embed, num_heads=heads, dropout=0.1, bias=bias, add_bias_kv=bias_kv,
                       add_zero_attn=zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first)
    call = dict(key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average, is_causal=is_causal)
    return module_args, (query, key, value), call


@pytest.mark.parametrize("config", _configs(), ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("training", [False, True])
def test_softmax_reproduces_torch(config, training):
    module_args, inputs, call = _inputs(config)
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(**module_args)
    ours = linattn.nn.MultiheadAttention(**module_args, method="softmax")
    ours.load_state_dict(reference.state_dict())
    reference.train(training), ours.train(training)
    inputs = [t.clone().requires_grad_() for t in inputs]
    torch.manual_seed(5)
    expected_out, expected_weights = reference(*inputs, **call)
    torch.manual_seed(5)
    out, weights = ours(*inputs, **call)
    assert_close(out, expected_out, 1e-5, "output")
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        assert_close(weights, expected_weights, 1e-5, "weights")
    grads = torch.autograd.grad(out.sum(), [inputs[0], *ours.parameters()], allow_unused=True)
    expected = torch.autograd.grad(expected_out.sum(), [inputs[0], *reference.parameters()], allow_unused=True)
    for got, want in zip(grads, expected):
        assert (got is None) == (want is None)
        if got is not None:
            assert_close(got, want, 1e-5, "gradient")


def test_self_attention_input_shared_with_key_and_value():
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 2, batch_first=True)
    ours = linattn.nn.MultiheadAttention(16, 2, batch_first=True, method="softmax")
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 11, 16)
    assert_close(ours(x, x, x)[0], reference(x, x, x)[0], 1e-5, "self-attention")


def test_is_instance_of_torch_module_with_identical_state_dict_keys():
    for kwargs in (dict(), dict(kdim=8, vdim=12), dict(add_bias_kv=True, bias=False)):
        reference = nn.MultiheadAttention(16, 4, **kwargs)
        for method in ("softmax", "linear", "efficient"):
            ours = linattn.nn.MultiheadAttention(16, 4, **kwargs, method=method)
            assert isinstance(ours, nn.MultiheadAttention)
            assert list(ours.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("method,options", [
    ("linear", {}), ("performer", {"nb_features": 32}), ("efficient", {}), ("linformer", {"max_seq_len": 32, "k": 8}),
])
def test_state_dict_round_trips(method, options):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4)
    ours = linattn.nn.MultiheadAttention(16, 4, method=method, **options)
    core_before = {k: v.clone() for k, v in ours.core.state_dict().items()}
    ours.load_state_dict(reference.state_dict())  # strict: the method's own tensors are kept
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    for key, value in ours.core.state_dict().items():
        assert torch.equal(value, core_before[key]), key
    # ... and back: torch's module takes the shared keys; the method's own are the only extras.
    back = nn.MultiheadAttention(16, 4)
    result = back.load_state_dict(ours.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == sorted(f"core.{k}" for k in core_before)
    for key, value in back.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # A linattn state_dict (with the method's tensors) loads into a fresh linattn module exactly.
    again = linattn.nn.MultiheadAttention(16, 4, method=method, **options)
    again.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
