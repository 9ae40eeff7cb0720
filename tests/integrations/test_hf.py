"""linattn.hf: models built from small transformers configs (no downloads). linattn_linear and
linattn_performer must match the same model running a dense float64 reference of the same math
(registered here, applying transformers' own 4-D mask), with padding (left and right),
grouped-query heads, causal (Llama) and bidirectional (BERT, ViT) attention; linattn_local must
equal sdpa (float64, 1e-10) in the models' own sliding windows (Mistral, Qwen2, Gemma-3 at head
dim 256, whose bf16 training step also runs the flash engine's emulation forward and backward; ModernBERT's
bidirectional windows) and full attention (BERT, Llama), eager on gpt-oss (attention sinks), and a float64 reference of logit
soft-capping on Gemma-2; generation must give the same tokens through transformers' dynamic,
static and sliding caches, linattn.hf.LinearStateCache (constant size) and no cache; packed
documents (position_ids restarting inside a row) attend each to itself through the varlen
operators; masks linattn cannot honour raise; training runs backward."""
import copy

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


def softcap_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Dense float64 softmax over the keys transformers' mask lets each query see, the scaled scores
    soft-capped to c·tanh(s / c) first (Gemma-2); a query that sees no key gets 0. (transformers'
    own eager path takes its softmax in float32, and its fully padded rows turn NaN.)"""
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    T_q, T_k = query.shape[2], key.shape[2]
    visible = torch.ones(T_q, T_k, dtype=torch.bool)
    if causal:
        visible = torch.arange(T_k)[None, :] <= torch.arange(T_q)[:, None] + (T_k - T_q)
    if attention_mask is not None:
        visible = visible & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    out = linattn.reference.masked_softmax_attention(query, key, value, visible, scaling, softcap=softcap or 0.0)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


linattn.hf.register()
AttentionInterface.register("test_reference_linear", reference_attention)
AttentionMaskInterface.register("test_reference_linear", sdpa_mask)
AttentionInterface.register("test_reference_softcap", softcap_reference)
AttentionMaskInterface.register("test_reference_softcap", sdpa_mask)


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


def assert_same_logits(model, implementation, expected_implementation, padding, length, tolerance):
    """The model's logits on the real tokens of a batch of 3 (row 1 left-padded or row 2
    right-padded) are the same under both implementations."""
    ids = torch.randint(0, 61, (3, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones(3, length, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
    elif padding == "right":
        mask[2, 9:] = 0
    got = with_implementation(model, implementation)(ids, attention_mask=mask).logits
    expected = with_implementation(model, expected_implementation)(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=tolerance, atol=tolerance)


def test_register_is_idempotent():
    linattn.hf.register()
    linattn.hf.register()
    assert "linattn_linear" in AttentionInterface._global_mapping


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_llama_matches_the_reference(padding):
    assert_same_logits(llama(), "linattn_linear", "test_reference_linear", padding, length=13, tolerance=1e-4)


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


@pytest.mark.parametrize("implementation, expected_implementation, dtype, tolerance", [
    ("linattn_linear", "test_reference_linear", torch.float32, 1e-4),
    ("linattn_local", "sdpa", torch.float64, 1e-10),
])
def test_bert_bidirectional_with_padding(implementation, expected_implementation, dtype, tolerance):
    config = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval().to(dtype)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    got = with_implementation(model, implementation)(ids, attention_mask=mask).last_hidden_state
    expected = with_implementation(model, expected_implementation)(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=tolerance, atol=tolerance)


def modernbert():
    """A small float64 ModernBERT: two bidirectional sliding-window layers (local_attention=4: two
    keys on each side) and a global one."""
    if not hasattr(transformers, "ModernBertConfig"):
        pytest.skip("this transformers has no ModernBERT")
    config = transformers.ModernBertConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                           local_attention=4, global_attn_every_n_layers=3)
    torch.manual_seed(0)
    return transformers.ModernBertModel(config).eval().double()


def test_modernbert_local_layers_are_exactly_sdpa(monkeypatch):
    """ModernBERT alternates bidirectional sliding-window layers (local_attention keys in all) with
    global ones: linattn_local runs each in its own pattern and equals sdpa in float64 with padding."""
    model = modernbert()
    ids = torch.randint(1, 61, (2, 14), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 9:] = 0
    windows = []
    run = linattn.hf.attention.sliding_window_attention
    monkeypatch.setattr(linattn.hf.attention, "sliding_window_attention",
                        lambda *args, **kwargs: windows.append(args[3]) or run(*args, **kwargs))
    got = with_implementation(model, "linattn_local")(ids, attention_mask=mask).last_hidden_state
    assert sorted(windows) == [(-1, -1), (2, 2), (2, 2)], windows  # one global layer, two local ones
    expected = with_implementation(model, "sdpa")(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-10, atol=1e-10)


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


def test_a_dense_mask_it_cannot_honour_raises():
    from linattn.hf.masks import _dense_padding

    window = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril().triu(-1)  # a sliding window of 2
    with pytest.raises(ValueError, match="not key padding plus causality"):
        _dense_padding("test", window, 5, 5, causal=True, window=(-1, 0))
    # The same mask is exactly the causal window (1, 0).
    assert _dense_padding("test", window, 5, 5, causal=True, window=(1, 0)) is None


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


def test_plain_masks_are_compact():
    """For causal, bidirectional and sliding-window layers the mask linattn's interface builds is
    the (B, T) visible keys, never (B, 1, T, T); other patterns fall back to sdpa's dense mask."""
    from transformers import masking_utils as mu
    from linattn.hf.masks import compact_mask, recognise

    assert recognise(mu.causal_mask_function) == (True, (-1, 0))
    assert recognise(mu.bidirectional_mask_function) == (False, (-1, -1))
    assert recognise(mu.sliding_window_causal_mask_function(5)) == (True, (4, 0))
    assert recognise(mu.sliding_window_bidirectional_mask_function(3)) == (False, (3, 3))
    assert recognise(mu.and_masks(mu.causal_mask_function, mu.causal_mask_function)) is None
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    visible = compact_mask(2, 4, 4, mask_function=mu.causal_mask_function, attention_mask=padding)
    assert visible.shape == (2, 4) and visible.tolist() == padding.bool().tolist()
    chunked = mu.chunked_causal_mask_function(2, torch.zeros(2, dtype=torch.long))
    assert compact_mask(2, 4, 4, mask_function=chunked, attention_mask=padding).shape == (2, 1, 4, 4)


PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])


@pytest.mark.parametrize("implementation", ["linattn_linear", "linattn_local"])
def test_packed_documents_attend_each_to_itself(implementation):
    """Rows of packed documents (position_ids restarting inside a row, transformers' packed
    format) run as linattn's varlen packing: each document gets what it gets alone."""
    model = with_implementation(llama().double(), implementation)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(10))
    got = model(ids, position_ids=PACKED_POSITIONS, use_cache=False).logits
    for row in range(2):
        starts = [t for t in range(10) if PACKED_POSITIONS[row, t] == 0] + [10]
        for a, b in zip(starts[:-1], starts[1:]):
            alone = model(ids[row:row + 1, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(got[row, a:b], alone, rtol=1e-10, atol=1e-10)


def test_packed_documents_in_sliding_windows_match_sdpa():
    model = sliding_model("mistral", window=3).double()
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(11))
    got = with_implementation(model, "linattn_local")(ids, position_ids=PACKED_POSITIONS, use_cache=False).logits
    expected = with_implementation(model, "sdpa")(ids, position_ids=PACKED_POSITIONS, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_masks_it_cannot_honour_raise():
    """Performer takes no packed documents; a chunked-attention mask is no pattern linattn knows."""
    model = with_implementation(llama(), "linattn_performer")
    with pytest.raises(ValueError, match="packed documents"):
        model(torch.randint(0, 61, (2, 10)), position_ids=PACKED_POSITIONS, use_cache=False)
    from transformers import masking_utils as mu
    from linattn.hf.masks import compact_mask

    chunked = mu.chunked_causal_mask_function(2, torch.zeros(1, dtype=torch.long))
    mask = compact_mask(1, 4, 4, mask_function=chunked, local_size=2)  # as transformers asks for it
    attention = AttentionInterface._global_mapping["linattn_linear"]
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="not key padding plus causality"):
        attention(module, q, q, q, mask)


def sliding_model(kind, window=5, seed=0):
    """A small decoder whose layers attend in a sliding window (Qwen2: one window layer, one full)."""
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, sliding_window=window)
    if kind == "mistral":
        config = transformers.MistralConfig(**common)
        model_class = transformers.MistralForCausalLM
    else:
        config = transformers.Qwen2Config(**common, use_sliding_window=True,
                                          layer_types=["sliding_attention", "full_attention"])
        model_class = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    return model_class(config).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_local_is_exactly_sdpa_in_the_models_window(kind, padding):
    assert_same_logits(sliding_model(kind).double(), "linattn_local", "sdpa", padding, length=14, tolerance=1e-10)


def test_local_reads_grouped_query_heads_in_place(monkeypatch):
    """Mistral's 2 key/value heads reach the window operator as they are (never repeated to its 4
    query heads) and the logits still equal sdpa's; in training with attention dropout too, the
    operator dropping each probability (the layer's dropout_p reaches it; eval passes 0)."""
    import linattn.hf.attention as hf_attention

    heads_seen = []
    window_attention = hf_attention.sliding_window_attention

    def counting(q, k, v, *args, **kwargs):
        heads_seen.append((q.shape[1], k.shape[1], v.shape[1], kwargs.get("dropout_p")))
        return window_attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(hf_attention, "sliding_window_attention", counting)
    assert_same_logits(sliding_model("mistral").double(), "linattn_local", "sdpa", "left", length=14, tolerance=1e-10)
    assert heads_seen == [(4, 2, 2, 0.0)] * 2  # both layers, one call each
    heads_seen.clear()
    model = sliding_model("mistral")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    tokens = torch.randint(0, 61, (2, 9))
    torch.manual_seed(0)
    first = with_implementation(model.train(), "linattn_local")(tokens).logits
    assert heads_seen == [(4, 2, 2, 0.1)] * 2
    torch.manual_seed(0)
    assert torch.equal(model(tokens).logits, first)
    assert not torch.equal(model(tokens).logits, first)


def gemma3(window, seed=0):
    """A small Gemma-3 decoder at its real head dim, 256: two sliding-window layers, one full."""
    if not hasattr(transformers, "Gemma3TextConfig"):
        pytest.skip("this transformers has no Gemma-3")
    config = transformers.Gemma3TextConfig(
        vocab_size=61, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=512,
        sliding_window=window, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(seed)
    return transformers.Gemma3ForCausalLM(config)


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_gemma3_local_is_exactly_sdpa(padding):
    assert_same_logits(gemma3(window=4).eval().double(), "linattn_local", "sdpa", padding, length=14,
                       tolerance=1e-10)


def gpt_oss(seed=0):
    """A small gpt-oss decoder: a sliding-window layer and a full one, both with attention sinks
    (drawn away from their zero init so that they matter), grouped-query heads, a small MoE."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    config = transformers.GptOssConfig(
        vocab_size=61, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"],
        experts_implementation="eager")  # (its grouped-mm experts take no float64)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_gpt_oss_attention_sinks_are_exactly_eager(padding):
    """transformers' gpt-oss attention concatenates each head's sink logit to the scores; linattn_local
    rescales the windowed softmax by sigmoid(lse − sink): the same logits to 1e-10 in float64, and the
    same gradient of the sinks."""
    model = gpt_oss().double()
    assert_same_logits(model, "linattn_local", "eager", padding, length=14, tolerance=1e-10)
    expected = parameter_grads(model, "eager", "sinks")
    got = parameter_grads(model, "linattn_local", "sinks")
    assert len(expected) == 2
    for name, grad in expected.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def parameter_grads(model, implementation, part):
    """The gradients of the parameters named with `part` after one training loss's backward under
    `implementation`."""
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    model.zero_grad()
    with_implementation(model, implementation)(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if part in name}


def test_gemma3_bf16_training_step_runs_the_flash_engine_at_head_dim_256():
    """A bf16 training step of Gemma-3 under linattn_local with the fused operators (on CPU tensors
    their emulation of the CUDA kernels): forward and backward both run the flash engine at head
    dim 256, and the loss and the attention weights' gradients are as close to float64's as
    SDPA's own bf16 step."""
    from linattn import ops

    reference = gemma3(window=40).double()
    ids = torch.randint(0, 61, (2, 90), generator=torch.Generator().manual_seed(1))

    def step(model, implementation, counted=False):
        model.zero_grad()
        out = with_implementation(model, implementation)(ids, labels=ids)
        mma_forward = torch.ops.linattn._warp_emulation_counters()[0].item()
        torch.ops.linattn._reset_warp_emulation_counters()
        out.loss.backward()
        if counted:
            assert mma_forward > 0, "the forward did not run the flash engine"
            assert torch.ops.linattn._warp_emulation_counters()[0].item() > 0, "the backward did not run it"
        grads = {name: p.grad.double() for name, p in model.named_parameters() if "self_attn" in name}
        return out.loss.double(), grads

    expected_loss, expected = step(reference, "sdpa")
    sdpa_loss, sdpa = step(copy.deepcopy(reference).bfloat16(), "sdpa")
    with ops.fused_implementation():
        torch.ops.linattn._reset_warp_emulation_counters()
        loss, got = step(copy.deepcopy(reference).bfloat16(), "linattn_local", counted=True)
    assert abs(loss - expected_loss) <= 2 * abs(sdpa_loss - expected_loss) + 1e-3
    for name, grad in expected.items():
        error = (got[name] - grad).norm() / grad.norm()
        sdpa_error = (sdpa[name] - grad).norm() / grad.norm()
        assert error <= 1.5 * sdpa_error + 1e-3, f"{name}: {error:.3g} against SDPA bf16's {sdpa_error:.3g}"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_local_generation_matches_sdpa(cache):
    """Generation through transformers' caches: the sliding layers' trimmed cache (offset keys)
    and a static cache (keys past the current position never seen)."""
    model = sliding_model("mistral", window=4)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(6))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    got = with_implementation(model, "linattn_local").generate(ids, **kwargs)
    expected = with_implementation(model, "sdpa").generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)


def test_linear_methods_refuse_a_sliding_window_that_matters():
    model = with_implementation(sliding_model("mistral", window=5), "linattn_linear")
    with pytest.raises(ValueError, match="linattn_local"):
        model(torch.randint(0, 61, (1, 9)))
    model(torch.randint(0, 61, (1, 5)))  # a window as long as the sequence changes nothing
    with pytest.raises(ValueError, match="linattn_local"):  # nor can it past the window's keys a sliding cache drops
        model.generate(torch.randint(0, 61, (1, 5)), max_new_tokens=4, do_sample=False, pad_token_id=0)


def gemma2(softcap, seed=0):
    """A small Gemma-2 decoder: a sliding-window layer and a full one, with logit soft-capping (a
    small cap, so that tanh bends the scores well away from linear)."""
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma-2")
    config = transformers.Gemma2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                       query_pre_attn_scalar=1, attn_logit_softcapping=softcap,
                                       initializer_range=0.2, max_position_embeddings=512)  # scores of a few units
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_gemma2_soft_capping_is_exactly_the_reference(padding):
    """Gemma-2 caps every layer's scaled scores to c·tanh(s / c) before its mask; linattn_local caps
    them in the window kernel: the same logits to 1e-10 in float64 as a dense float64 reference
    under transformers' own masks, and the same gradients of the attention weights; eager's to its
    float32 softmax. The cap matters: without it the logits move."""
    model = gemma2(softcap=1.5).double()
    assert_same_logits(model, "linattn_local", "test_reference_softcap", padding, length=14, tolerance=1e-10)
    if padding is None:  # (with padding, eager's fully masked rows turn NaN and reach real rows)
        assert_same_logits(model, "linattn_local", "eager", padding, length=14, tolerance=1e-5)
    expected = parameter_grads(model, "test_reference_softcap", "self_attn")
    got = parameter_grads(model, "linattn_local", "self_attn")
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    uncapped = gemma2(softcap=None).double()
    with torch.no_grad():
        assert not torch.allclose(with_implementation(model, "eager")(ids).logits,
                                  with_implementation(uncapped, "eager")(ids).logits, atol=1e-3)


def test_gemma2_generation_with_soft_capping_matches_the_reference():
    """Generation through transformers' caches (the sliding layer's trimmed one included) with left
    padding: the same tokens and logits as the float64 soft-capping reference."""
    model = gemma2(softcap=1.5).double()
    ids = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    got = with_implementation(model, "linattn_local").generate(ids, **kwargs)
    expected = with_implementation(model, "test_reference_softcap").generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-9, atol=1e-9)


def test_local_rejects_state_caches():
    model = with_implementation(llama(), "linattn_local")
    with pytest.raises(ValueError, match="LinearStateCache"):
        model(torch.randint(0, 61, (1, 6)), past_key_values=linattn.hf.LinearStateCache())


def performer_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense float64 FAVOR+ attention with the layer's projection, over the keys transformers'
    (sdpa) mask lets each query see."""
    from linattn.feature_maps import favor_features

    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    w = module.linattn_projection.double()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
    query = query.double() * (scaling * query.shape[-1] ** 0.5)
    scores = favor_features(query, w, is_query=True, causal=causal) @ favor_features(
        key, w, is_query=False, causal=causal).transpose(-1, -2)
    T_q, T_k = scores.shape[-2:]
    visible = torch.ones(T_q, T_k, dtype=torch.bool)
    if causal:
        visible = torch.arange(T_k)[None, :] <= torch.arange(T_q)[:, None] + (T_k - T_q)
    if attention_mask is not None:
        visible = visible & attention_mask
    scores = scores * visible
    out = (scores @ value) / (scores.sum(-1, keepdim=True) + 1e-6)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_reference_performer", performer_reference)
AttentionMaskInterface.register("test_reference_performer", sdpa_mask)


@pytest.mark.parametrize("padding", [None, "right"])
def test_performer_matches_the_reference(padding):
    model = llama().double()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 11, dtype=torch.long)
    if padding:
        mask[1, 7:] = 0
    got = with_implementation(model, "linattn_performer")(ids, attention_mask=mask).logits
    # The projection is a non-persistent buffer per layer, drawn the same way every time.
    projections = [m.linattn_projection for m in model.modules() if hasattr(m, "linattn_projection")]
    assert len(projections) == 2 and not torch.equal(projections[0], projections[1])
    assert not any("linattn" in name for name in model.state_dict())
    expected = with_implementation(model, "test_reference_performer")(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-9, atol=1e-9)


def test_performer_generates_with_the_state_cache():
    model = with_implementation(llama(), "linattn_performer")
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(8))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_state = model.generate(ids, past_key_values=linattn.hf.LinearStateCache(), **kwargs)
    assert torch.equal(with_state, model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_generation_through_kv_caches(cache):
    """A left-padded batch generated through transformers' KV caches: linattn_local gives sdpa's
    tokens, linattn_linear the tokens of its own constant-size state cache (a static cache's
    unfilled slots are never attended)."""
    model = llama()
    ids = torch.randint(1, 61, (2, 8), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  cache_implementation=cache)
    local = with_implementation(model, "linattn_local").generate(ids, **kwargs)
    assert torch.equal(local, with_implementation(model, "sdpa").generate(ids, **kwargs))
    linear = with_implementation(model, "linattn_linear").generate(ids, **kwargs)
    del kwargs["cache_implementation"]
    assert torch.equal(linear, model.generate(ids, past_key_values=linattn.hf.LinearStateCache(), **kwargs))


def test_both_packed_mask_layouts_are_recognised():
    """transformers 5.17 ands the pattern (on the packed row's positions) with the same-document
    test; later versions and the same-document test with the pattern on positions remapped per
    document. Both are the same mask and must give the same pattern; other pairs are not packing."""
    from transformers import masking_utils as mu

    from linattn.hf.masks import recognise_packed

    documents = torch.tensor([[0, 0, 0, 1, 1, 2]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    window = mu.and_masks(mu.sliding_window_overlay(2), mu.causal_mask_function)
    for base, expected in ((mu.causal_mask_function, (True, (-1, 0))), (window, (True, (1, 0)))):
        layouts = [mu.and_masks(base, mu.packed_sequence_mask_function(documents))]
        if hasattr(mu, "remap_positions_for_packed_sequence"):
            layouts.append(mu.and_masks(mu.packed_sequence_mask_function(documents),
                                        mu.remap_positions_for_packed_sequence(base, positions)))
        for layout in layouts:
            causal, window_pair, found = recognise_packed(layout)
            assert (causal, window_pair) == expected and found is documents
    assert recognise_packed(mu.and_masks(mu.packed_sequence_mask_function(documents), mu.causal_mask_function)) is None
    assert recognise_packed(mu.and_masks(mu.causal_mask_function, mu.bidirectional_mask_function)) is None
