"""linattn.hf.use_delta_rule: DeltaNet / Gated DeltaNet / KDA in transformers models (small configs, no
downloads). The layers' learned β and gate are attached (parameters, state_dict), the model's
output equals the same layers computed by hand from the float64 recurrence, left/right padding
writes nothing, generation gives the same tokens with transformers' cache, LinearStateCache
(a constant (B, H, dk, dv) state) and no cache, packed documents attend each to itself, a
bidirectional BERT reads the final state, and training reaches the new parameters."""
import pytest
import torch

import linattn
from linattn import reference
from linattn.delta_rule import l2_normalize

transformers = pytest.importorskip("transformers")


def llama(gated=True, seed=0, per_channel=False):
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).double().eval()
    names = linattn.hf.use_delta_rule(model, gated=gated, per_channel=per_channel)
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with torch.no_grad():  # token-dependent β and gate, as after training
        for core in linattn.hf.delta_rule.delta_rule_layers(model):
            for p in core.parameters():
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("gated,per_channel,implementation", [(True, False, "linattn_gated_deltanet"),
                                                              (False, False, "linattn_deltanet"),
                                                              (True, True, "linattn_kda")])
def test_layers_get_learned_projections_and_compute_the_recurrence(gated, per_channel, implementation):
    model = llama(gated, per_channel=per_channel)
    assert model.config._attn_implementation == implementation
    keys = [k for k in model.state_dict() if "linattn_delta_rule" in k]
    assert len(keys) == 2 * (5 if gated else 2)
    attention = model.model.layers[0].self_attn
    seen = {}

    def record(module, args, kwargs, output):
        seen["in"], seen["out"] = kwargs["hidden_states"], output[0]

    handle = attention.register_forward_hook(record, with_kwargs=True)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    model(ids, use_cache=False)
    handle.remove()
    # By hand: the layer's projections and rotary embedding, then the float64 recurrence.
    x = seen["in"]
    B, T, _ = x.shape
    q = attention.q_proj(x).view(B, T, 4, 8).transpose(1, 2)
    k = attention.k_proj(x).view(B, T, 2, 8).transpose(1, 2)
    v = attention.v_proj(x).view(B, T, 2, 8).transpose(1, 2)
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None].expand(B, T))
    q, k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    beta, gate = attention.linattn_delta_rule.beta_and_gate(k)
    assert gate is None or gate.shape == (k.shape if per_channel else k.shape[:3])
    out, _ = reference.delta_rule(l2_normalize(q), l2_normalize(k), v, beta, gate=gate, scale=1.0)
    expected = attention.o_proj(out.transpose(1, 2).flatten(2))
    torch.testing.assert_close(seen["out"], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_tokens_write_nothing(padding):
    model = llama()
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    real = slice(4, 12) if padding == "left" else slice(0, 8)
    mask[1] = 0
    mask[1, real] = 1
    got = model(ids, attention_mask=mask, use_cache=False).logits[1, real]
    positions = torch.arange(real.start, real.stop)[None]  # the positions the padded row gave them
    alone = model(ids[1:, real], position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(got, alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("per_channel", [False, True])
def test_generation_with_kv_cache_state_cache_and_no_cache(per_channel):
    model = llama(per_channel=per_channel)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_kv = model.generate(ids, **kwargs)
    cache = linattn.hf.LinearStateCache()
    with_state = model.generate(ids, past_key_values=cache, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_kv, with_state) and torch.equal(with_kv, without)
    for layer in cache.layers:  # only the delta rule's state: (B, H, dk, dv)
        assert layer.keys is None and layer.state.shape == (2, 4, 8, 8)


def test_packed_documents_attend_each_to_itself():
    model = llama()
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(10))
    got = model(ids, position_ids=positions, use_cache=False).logits
    for row in range(2):
        starts = [t for t in range(10) if positions[row, t] == 0] + [10]
        for a, b in zip(starts[:-1], starts[1:]):
            alone = model(ids[row:row + 1, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(got[row, a:b], alone, rtol=1e-10, atol=1e-10)


def test_bert_reads_the_final_state_and_trains():
    config = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).train()
    linattn.hf.use_delta_rule(model, gated=True)
    ids = torch.randint(0, 61, (2, 9))
    model(ids).last_hidden_state.square().mean().backward()
    cores = linattn.hf.delta_rule.delta_rule_layers(model)
    assert len(cores) == 2
    for core in cores:
        for name, p in core.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for core in cores for p in core.parameters())


def test_without_use_delta_rule_the_message_says_what_to_call():
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    linattn.hf.register()
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("linattn_gated_deltanet")
    with pytest.raises(ValueError, match=r"call linattn.hf.use_delta_rule\(model\)"):
        model(torch.randint(0, 61, (1, 5)))
    model.set_attn_implementation("linattn_kda")
    with pytest.raises(ValueError, match=r"call linattn.hf.use_delta_rule\(model, per_channel=True\)"):
        model(torch.randint(0, 61, (1, 5)))
    with pytest.raises(ValueError, match="needs gated=True"):
        linattn.hf.use_delta_rule(model, gated=False, per_channel=True)
