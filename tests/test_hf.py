"""linattn.hf: models built from small transformers configs (no downloads) running
attn_implementation="linattn_linear" must match the same model running a float64 dense
reference of linear attention (registered here, applying transformers' own 4-D mask), with
padding (left and right), grouped-query heads, causal (Llama) and bidirectional (BERT, ViT)
attention; generation must give the same tokens with transformers' KV cache, with
linattn.hf.LinearStateCache (constant size) and without a cache; training runs backward."""
import pytest
import torch

import linattn

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense float64 linear attention (elu+1) over the keys transformers' mask lets each query see."""
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    scores = phi(query.double()) @ phi(key).transpose(-1, -2)
    T_q, T_k = scores.shape[-2:]
    visible = torch.ones(T_q, T_k, dtype=torch.bool)
    if causal:
        visible = torch.arange(T_k)[None, :] <= torch.arange(T_q)[:, None] + (T_k - T_q)
    if attention_mask is not None:
        visible = visible & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    scores = scores * visible
    out = (scores @ value) / (scores.sum(-1, keepdim=True) + 1e-6)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


linattn.hf.register()
AttentionInterface.register("test_reference_linear", reference_attention)
AttentionMaskInterface.register("test_reference_linear", sdpa_mask)


def with_implementation(model, name):
    model.config._attn_implementation = name
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = name
    return model


def llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def test_register_is_idempotent():
    linattn.hf.register()
    linattn.hf.register()
    assert "linattn_linear" in AttentionInterface._global_mapping


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_llama_matches_the_reference(padding):
    model = llama()
    ids = torch.randint(0, 61, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 13, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
    elif padding == "right":
        mask[2, 9:] = 0
    got = with_implementation(model, "linattn_linear")(ids, attention_mask=mask).logits
    expected = with_implementation(model, "test_reference_linear")(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


def test_generation_with_kv_cache_state_cache_and_no_cache():
    model = with_implementation(llama(), "linattn_linear")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_kv = model.generate(ids, **kwargs)
    cache = linattn.hf.LinearStateCache()
    with_state = model.generate(ids, past_key_values=cache, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_kv, with_state) and torch.equal(with_kv, without)
    # The state cache holds no keys or values, only (S, z) per layer, and knows how far it went.
    for layer in cache.layers:
        assert layer.keys is None and layer.state[0].shape == (2, 4, 8, 8)
    assert cache.get_seq_length() == 9 + 11


def test_state_cache_logits_match_the_whole_sequence():
    model = with_implementation(llama(), "linattn_linear")
    ids = torch.randint(0, 61, (2, 15), generator=torch.Generator().manual_seed(3))
    whole = model(ids).logits
    cache = linattn.hf.LinearStateCache()
    pieces = [model(ids[:, :7], past_key_values=cache).logits]
    for t in range(7, 15):
        pieces.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)


def test_bert_bidirectional_with_padding():
    config = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    got = with_implementation(model, "linattn_linear")(ids, attention_mask=mask).last_hidden_state
    expected = with_implementation(model, "test_reference_linear")(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)


def test_vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    got = with_implementation(model, "linattn_linear")(pixels).last_hidden_state
    expected = with_implementation(model, "test_reference_linear")(pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_training_step():
    model = with_implementation(llama(), "linattn_linear_relu").train()
    ids = torch.randint(0, 61, (2, 12))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_mask_it_cannot_honour_raises():
    from linattn.hf import _key_padding

    window = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril().triu(-1)  # a sliding window of 2
    with pytest.raises(ValueError, match="not key padding"):
        _key_padding("test", window, 5, 5, causal=True)


def test_keys_that_do_not_cover_the_mask_raise():
    """A call whose keys cover fewer positions than the mask (a state cache whose layer was lost)
    must not silently attend to part of the sequence."""
    attention = AttentionInterface._global_mapping["linattn_linear"]
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 1, 4)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="covers 6 keys but 1"):
        attention(module, q, q, q, mask)
