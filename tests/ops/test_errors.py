"""Bad input raises a clear exception naming the argument; nothing crashes."""
import re

import pytest
import torch

import linattn


def qkv(B=2, H=3, T=10, D=8, dtype=torch.float32):
    return torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype)


def raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kwargs)
    assert "linattn" in str(info.value)
    return info


LA = linattn.linear_attention


def test_wrong_rank():
    q, k, v = qkv()
    raises(ValueError, r"q must be a 4-D tensor .* got shape \(2, 3, 10\)", LA, q[..., 0], k, v)
    raises(ValueError, r"v must be a 4-D tensor", LA, q, k, v[None])


def test_not_a_tensor():
    q, k, v = qkv()
    raises(TypeError, r"k must be a torch.Tensor, got list", LA, q, [1.0], v)


def test_mismatched_batch_heads_and_dims():
    q, k, v = qkv()
    raises(ValueError, r"share batch and head dims", LA, q, k[:1], v[:1])
    raises(ValueError, r"share batch and head dims", LA, q, k[:, :2], v)
    raises(ValueError, re.escape("q and k must have the same head dim, got q (2, 3, 10, 8) and k (2, 3, 10, 4)"),
           LA, q, k[..., :4], v)
    raises(ValueError, r"k and v must have the same length", LA, q, k, v[:, :, :5])
    raises(ValueError, r"causal attention needs as many queries as keys", LA, q[:, :, :4], k, v, causal=True)


def test_mixed_dtypes_and_integers():
    q, k, v = qkv()
    raises(TypeError, r"q and k must have the same dtype, got torch.float32 and torch.float64", LA, q, k.double(), v)
    raises(TypeError, r"q must be float32, float64, bfloat16 or float16, got torch.int64", LA,
           q.long(), k.long(), v.long())


def test_mixed_devices():
    q, k, v = qkv()
    raises(ValueError, r"q and v must be on the same device, got cpu and meta", LA, q, k, v.to("meta"))


def test_key_padding_mask_checks():
    q, k, v = qkv()
    raises(ValueError, re.escape("key_padding_mask must have shape (B, T_k) = (2, 10), got (2, 9)"), LA, q, k, v,
           key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    raises(TypeError, r"key_padding_mask must be a bool tensor", LA, q, k, v,
           key_padding_mask=torch.zeros(2, 10))


def test_option_checks():
    q, k, v = qkv()
    raises(ValueError, r"feature_map must be one of \['elu', 'identity', 'relu'\]", LA, q, k, v, feature_map="cosine")
    raises(ValueError, r"feature_map='identity' .* normalize=False", LA, q, k, v, feature_map="identity")
    raises(ValueError, r"eps must be a finite number > 0, got -1", LA, q, k, v, eps=-1)
    raises(ValueError, r"eps must be a finite number > 0, got 0", LA, q, k, v, eps=0)
    raises(ValueError, r"feature_map\(q\) must return a \(B, H, T, m\) tensor", LA, q, k, v,
           feature_map=lambda x: x.sum(-1))
    raises(ValueError, r"decay and gate fade a causal state; call it with causal=True", LA, q, k, v, decay=torch.ones(3))


def test_initial_state_checks():
    q, k, v = qkv()
    S, z = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8)
    raises(ValueError, re.escape("initial_state S must have shape (2, 3, 8, 8)"), LA, q, k, v, causal=True,
           initial_state=(S[:, :, :4], z))
    raises(ValueError, re.escape("initial_state z must have shape (2, 3, 8)"), LA, q, k, v, causal=True,
           initial_state=(S, z[..., :2]))
    raises(TypeError, r"initial_state must be a tuple \(S, z\)", LA, q, k, v, initial_state=S)


def test_direct_operator_calls_are_checked_in_cpp():
    """The C++ operators refuse bad input themselves, whoever calls them."""
    q, k, v = qkv()
    for op in (torch.ops.linattn.linear_attn_fwd, torch.ops.linattn.linear_attn_fwd_generic):
        with pytest.raises(RuntimeError, match=r"linattn.linear_attention: q must be a 4-D tensor"):
            op(q[0], k, v, None, None, 1, False, True, 1e-6)
        with pytest.raises(RuntimeError, match=r"initial_state must have shape \[2, 3, 8, 9\]"):
            op(q, k, v, torch.zeros(2, 3, 8, 8), None, 1, False, True, 1e-6)
        with pytest.raises(RuntimeError, match=r"initial_state must be Float for"):
            op(q, k, v, torch.zeros(2, 3, 8, 9, dtype=torch.float64), None, 1, False, True, 1e-6)
        with pytest.raises(RuntimeError, match=r"eps must be a finite number > 0, got inf"):
            op(q, k, v, None, None, 1, False, True, float("inf"))
        with pytest.raises(RuntimeError, match=r"feature_map code must be 0 \(identity\), 1 \(elu\+1\) or 2"):
            op(q, k, v, None, None, 7, False, True, 1e-6)
        with pytest.raises(RuntimeError, match=r"key_padding_mask must have shape \[2, 10\]"):
            op(q, k, v, None, torch.zeros(2, 3, dtype=torch.bool), 1, False, True, 1e-6)
        with pytest.raises(RuntimeError, match=r"key_padding_mask must be a bool tensor"):
            op(q, k, v, None, torch.zeros(2, 10), 1, False, True, 1e-6)
    out, state, normalizer = torch.ops.linattn.linear_attn_fwd(q, k, v, None, None, 1, True, True, 1e-6)
    for op in (torch.ops.linattn.linear_attn_bwd, torch.ops.linattn.linear_attn_bwd_generic):
        with pytest.raises(RuntimeError, match=r"normalizer must have shape"):
            op(out, None, q, k, v, out, normalizer[:, :, :3], None, None, 1, True, True)
        with pytest.raises(RuntimeError, match=r"grad_out must have shape"):
            op(out[:, :, :3], None, q, k, v, out, normalizer, None, None, 1, True, True)
