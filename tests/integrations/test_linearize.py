"""linattn.linearize and linattn.attention_transfer (docs/methods.md §10) on small transformers models
built here (BERT bidirectional, Llama causal; Mistral's and ModernBERT's sliding windows, Gemma-2's
soft-capping, gpt-oss's attention sinks): the record of what was replaced, teacher mode = the
original model, the student's math against a dense float64 definition, padding, state_dict round
trips, compile, transfer reducing every layer's loss, and errors."""
import math

import pytest
import torch

import linattn
from linattn.conversion import LinearizedAttention, linearized_layers, set_mode

transformers = pytest.importorskip("transformers")


def bert(seed=0, dtype=torch.float32):
    config = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval().to(dtype)


def llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def batch(length=40, seed=1):
    ids = torch.randint(0, 61, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, length - 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("method", ["hybrid", "linear", "deltanet", "gated_deltanet"])
def test_linearize_records_layers_and_the_teacher_is_the_original_model(method):
    model, inputs = bert(dtype=torch.float64), batch()
    original = model(**inputs).last_hidden_state
    before = {name: p.clone() for name, p in model.named_parameters()}
    linattn.linearize(model, method=method, window=4)
    record = model.linattn_linearization
    assert record["method"] == method and record["layers"] == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    assert len(linearized_layers(model)) == 2
    new = {name for name, _ in model.named_parameters()} - set(before)
    assert new and all(".linattn_linearized." in name for name in new)  # nothing else added or replaced
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)
    set_mode(model, "teacher")
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(model(**inputs).last_hidden_state[real], original[real], rtol=1e-10, atol=1e-10)
    set_mode(model, "student")
    student = model(**inputs).last_hidden_state
    assert torch.isfinite(student).all() and not torch.allclose(student[real], original[real])


def dense_student(layer, q, k, v, scale, padding, causal):
    """The student's definition (LinearizedAttention's docstring) with dense float64 matrices."""
    weights = layer.student_weights(q, k, scale, padding, causal)
    return weights @ v


@pytest.mark.parametrize("method", ["hybrid", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", ["hedgehog", "t2r"])
def test_student_equals_its_dense_definition(method, causal, feature_map):
    torch.manual_seed(3)
    layer = LinearizedAttention(2, 4, method=method, feature_map=feature_map, window=3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = (torch.randn(2, 2, 23, 4, dtype=torch.float64) for _ in range(3))
    padding = torch.zeros(2, 23, dtype=torch.bool)
    padding[1, 17:] = True
    got = layer.student(q, k, v, 0.5, padding, causal)
    expected = dense_student(layer, q, k, v, 0.5, padding, causal)
    rows = ~padding[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-10, atol=1e-10)
    # Padded keys change nothing.
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 17:] = 100.0
    v2[1, :, 17:] = -7.0
    torch.testing.assert_close(layer.student(q, k2, v2, 0.5, padding, causal)[rows], got[rows])


@pytest.mark.parametrize("method", ["deltanet", "gated_deltanet", "kda"])
@pytest.mark.parametrize("causal", [False, True])
def test_delta_rule_students_are_the_recurrence_on_their_features(method, causal):
    """The delta-rule students: the float64 per-token recurrence (linattn.reference.delta_rule) on
    the L2-normalised learned features, β and the gate from the raw keys, read-out scale 1; padded
    keys write and fade nothing; the dense weights apply the same map to v."""
    from linattn import reference
    from linattn.delta_rule import l2_normalize

    torch.manual_seed(3)
    layer = LinearizedAttention(2, 4, method=method).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = (torch.randn(2, 2, 23, 4, dtype=torch.float64) for _ in range(3))
    padding = torch.zeros(2, 23, dtype=torch.bool)
    padding[1, 17:] = True
    got = layer.student(q, k, v, 0.5, padding, causal)
    beta, gate = layer.delta_rule.beta_and_gate(k)
    beta = beta.masked_fill(padding[:, None], 0.0)
    if gate is not None:  # per head (N, H, T) or, kda, per feature channel (N, H, T, m)
        assert gate.shape == (layer.feature_map_k(k).shape if method == "kda" else k.shape[:3])
        gate = gate.masked_fill(padding[:, None, :, None] if gate.dim() == 4 else padding[:, None], 0.0)
    expected, _ = reference.delta_rule(l2_normalize(layer.feature_map_q(q)), l2_normalize(layer.feature_map_k(k)), v,
                                       beta, gate=gate, scale=1.0, causal=causal)
    rows = ~padding[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense_student(layer, q, k, v, 0.5, padding, causal)[rows], got[rows])
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 17:] = 100.0
    v2[1, :, 17:] = -7.0
    torch.testing.assert_close(layer.student(q, k2, v2, 0.5, padding, causal)[rows], got[rows])


@pytest.mark.parametrize("feature_map", ["hedgehog", "t2r"])
def test_gla_student_is_the_gated_recurrence_on_its_features(feature_map):
    """The gla student: linear attention on the learned features whose state fades channel by channel
    by the gates learned from the raw keys (the float64 dense reference), one gate per feature
    channel; padded keys write and fade nothing; the dense weights apply the same map to v; a
    bidirectional call is refused."""
    from linattn import reference

    torch.manual_seed(3)
    layer = LinearizedAttention(2, 4, method="gla", feature_map=feature_map).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = (torch.randn(2, 2, 23, 4, dtype=torch.float64) for _ in range(3))
    padding = torch.zeros(2, 23, dtype=torch.bool)
    padding[1, 5:9] = True  # a hole: the later keys must not see it fade the state
    got = layer.student(q, k, v, 0.5, padding, True)
    phi_q, phi_k = layer.feature_map_q(q), layer.feature_map_k(k)
    gate = layer.gates(k).masked_fill(padding[:, None, :, None], 0.0)
    assert gate.shape == phi_k.shape and (gate <= 0).all()
    expected, _ = reference.decayed_linear_attention(phi_q, phi_k, v, gate, feature_map=None,
                                                     key_padding_mask=padding)
    rows = ~padding[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense_student(layer, q, k, v, 0.5, padding, True)[rows], got[rows])
    kept = ~padding[1]
    alone = layer.student(q[1:, :, kept], k[1:, :, kept], v[1:, :, kept], 0.5, None, True)
    torch.testing.assert_close(got[1:, :, kept], alone, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="causal layers"):
        layer.student(q, k, v, 0.5, None, False)


def test_gla_student_decodes_token_by_token():
    torch.manual_seed(5)
    layer = LinearizedAttention(2, 4, method="gla").double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64) for _ in range(3))
    whole = layer.student(q, k, v, 0.5, None, True)
    out, entry = layer.decode(q[:, :, :5], k[:, :, :5], v[:, :, :5], 0.5, None)  # a prompt, then tokens
    pieces = [out]
    for t in range(5, 12):
        out, entry = layer.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.5, entry)
        pieces.append(out)
    assert entry["length"] == 12
    torch.testing.assert_close(torch.cat(pieces, 2), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["hybrid", "linear", "gated_deltanet", "kda", "gla"])
def test_causal_left_padding_changes_nothing(method):
    """A left-padded causal row (batched generation's prompts) gives its real queries what the
    unpadded sequence gives: the padding is invisible and the hybrid's sink is the first real token."""
    torch.manual_seed(4)
    layer = LinearizedAttention(2, 4, method=method, window=3).double()
    q, k, v = (torch.randn(1, 2, 17, 4, dtype=torch.float64) for _ in range(3))
    alone = layer.student(q, k, v, 0.5, None, True)
    pad = 6
    padded = [torch.cat([torch.randn(1, 2, pad, 4, dtype=torch.float64), t], 2) for t in (q, k, v)]
    padding = torch.zeros(1, 17 + pad, dtype=torch.bool)
    padding[:, :pad] = True
    got = layer.student(*padded, 0.5, padding, True)[:, :, pad:]
    torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)
    dense = dense_student(layer, *padded[:2], padded[2], 0.5, padding, True)[:, :, pad:]
    torch.testing.assert_close(dense, alone, rtol=1e-10, atol=1e-10)


def test_student_compiles_fullgraph():
    layer = LinearizedAttention(2, 4, window=3)
    q, k, v = (torch.randn(1, 2, 20, 4) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: layer.student(q, k, v, 0.5, None, False), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), layer.student(q, k, v, 0.5, None, False))


def test_vision_transformer():
    """ViT: the layers are found with a blank image of the config's size; [CLS] as the global token."""
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    images = torch.randn(2, 3, 32, 32)
    original = model(pixel_values=images).last_hidden_state
    linattn.linearize(model, window=2, global_tokens="first")
    assert len(model.linattn_linearization["layers"]) == 2
    assert not torch.allclose(model(pixel_values=images).last_hidden_state, original)
    set_mode(model, "teacher")
    torch.testing.assert_close(model(pixel_values=images).last_hidden_state, original)
    history = linattn.attention_transfer(model, [{"pixel_values": images}], steps=20, lr=3e-2, progress=False)
    assert history["total"][-1] < history["total"][0]


def test_state_dict_round_trip():
    model, inputs = bert(), batch()
    linattn.linearize(model, window=4)
    with torch.no_grad():
        for layer in linearized_layers(model).values():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
    expected = model(**inputs).last_hidden_state
    state = model.state_dict()
    fresh = linattn.linearize(bert(seed=5), window=4)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(**inputs).last_hidden_state, expected)


@pytest.mark.parametrize("model_fn, method", [(bert, "hybrid"), (bert, "linear"), (llama, "hybrid"),
                                             (bert, "deltanet"), (llama, "gated_deltanet"), (llama, "gla"),
                                             (llama, "kda")])
def test_transfer_reduces_every_layer_loss(model_fn, method):
    model = model_fn()
    linattn.linearize(model, method=method, window=4)
    frozen = {name: p.clone() for name, p in model.named_parameters() if "linattn_linearized" not in name}
    inputs = [batch(seed=s) for s in range(3)]
    history = linattn.attention_transfer(model, inputs, steps=40, lr=3e-2, progress=False)
    layers = [name for name in history if name != "total"]
    assert len(layers) == 2
    for name in layers:
        start, end = sum(history[name][:3]) / 3, sum(history[name][-3:]) / 3
        assert end < 0.8 * start, (name, start, end)
    assert all(layer.mode == "student" for layer in linearized_layers(model).values())
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("model_fn", [bert, llama])
def test_end_to_end_transfer_lowers_the_output_error(model_fn):
    model = linattn.linearize(model_fn(), window=4)
    frozen = {name: p.clone() for name, p in model.named_parameters() if "linattn_linearized" not in name}
    history = linattn.conversion.end_to_end_transfer(model, [batch(seed=s) for s in range(2)], steps=30, lr=3e-2,
                                                     progress=False)
    assert sum(history["total"][-3:]) < 0.8 * sum(history["total"][:3])
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert all(layer.mode == "student" for layer in linearized_layers(model).values())


def test_end_to_end_kl_is_the_next_token_divergence_and_falls():
    model = linattn.linearize(llama(), window=4)
    inputs = batch()
    with torch.no_grad():
        set_mode(model, "teacher")
        teacher = torch.log_softmax(model(**inputs).logits, -1)
        set_mode(model, "student")
        student = torch.log_softmax(model(**inputs).logits, -1)
    real = inputs["attention_mask"].bool()
    expected = (teacher.exp() * (teacher - student)).sum(-1)[real].mean()
    history = linattn.conversion.end_to_end_transfer(model, [inputs], steps=25, lr=3e-2, loss="kl",
                                                     select=lambda out: out.logits, progress=False)
    assert history["total"][0] == pytest.approx(expected.item(), rel=1e-4)
    assert sum(history["total"][-3:]) < 0.9 * sum(history["total"][:3])
    with pytest.raises(ValueError, match="loss must be one of"):
        linattn.conversion.end_to_end_transfer(model, [inputs], loss="ce")


def test_attention_ce_loss_runs_and_falls():
    model = bert()
    linattn.linearize(model, method="linear")
    history = linattn.attention_transfer(model, [batch()], steps=25, lr=3e-2, loss="attention_ce", progress=False)
    assert history["total"][-1] < history["total"][0]


def test_lora_through_peft():
    """The fine-tuning after the transfer (docs/guide/linearize.md): LoRA on the projections, the
    linearized layers trained whole; every trainable parameter gets a gradient and the model still
    runs the linearized attention."""
    peft = pytest.importorskip("peft")
    model = linattn.linearize(bert(), window=4)
    inputs = batch()
    expected = model(**inputs).last_hidden_state
    config = peft.LoraConfig(r=4, target_modules=["query", "key", "value"], modules_to_save=["linattn_linearized"])
    tuned = peft.get_peft_model(model, config)
    out = tuned(**inputs).last_hidden_state
    torch.testing.assert_close(out, expected)  # LoRA starts at zero
    out.square().mean().backward()
    trainable = {name: p for name, p in tuned.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("feature_map_q" in name for name in trainable)
    assert all(p.grad is not None for p in trainable.values())


@pytest.mark.parametrize("method", ["linear", "hybrid", "gated_deltanet", "kda", "gla"])
def test_students_generate_from_a_constant_size_state(method, monkeypatch):
    """A decoder linearized with either student generates through linattn.hf.LinearStateCache (the
    linear (S, z) state; the hybrid's sink, last `window` keys and linear sums: O(1) per token) the
    same tokens as through transformers' own cache and as recomputing the whole sequence at every
    step; beam search reorders the state."""
    model = linattn.linearize(llama(), method=method, window=3)
    with torch.no_grad():
        for p in model.parameters():  # feature maps that are not their initial selves
            if p.requires_grad and p.dim() == 2 and p.shape[0] == p.shape[1]:
                p.add_(0.2 * torch.randn_like(p))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    decoded = []
    if method != "linear":  # count the calls that decode from the state
        decode = LinearizedAttention.decode
        monkeypatch.setattr(LinearizedAttention, "decode", lambda self, *a: decoded.append(1) or decode(self, *a))
    runs = [model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **options)
            for options in ({"past_key_values": linattn.hf.LinearStateCache()}, {}, {"use_cache": False})]
    assert runs[0].tolist() == runs[1].tolist() == runs[2].tolist()
    assert method == "linear" or len(decoded) == 2 * 8  # 2 layers, a prompt and 7 single tokens each
    beams = [model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=3, **options)
             for options in ({"past_key_values": linattn.hf.LinearStateCache()}, {"use_cache": False})]
    assert beams[0].tolist() == beams[1].tolist()


def test_hybrid_generates_from_left_padded_prompts():
    """Prompts of different lengths (left padding): transformers' cache gives what recomputing gives,
    and each row what it gives alone; the state cache names what it needs."""
    model = linattn.linearize(llama(), method="hybrid", window=3)
    ids = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    runs = [model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **options)
            for options in ({}, {"use_cache": False})]
    assert runs[0].tolist() == runs[1].tolist()
    alone = model.generate(ids[1:, 4:], attention_mask=mask[1:, 4:], max_new_tokens=6, do_sample=False)
    assert runs[0][1, 9:].tolist() == alone[0, 5:].tolist()
    with pytest.raises(ValueError, match="takes unpadded sequences"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=linattn.hf.LinearStateCache())


def test_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        linattn.linearize(bert(), method="performer")
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        linattn.linearize(bert(), window=-1)
    model = linattn.linearize(bert())
    with pytest.raises(ValueError, match="already linearized"):
        linattn.linearize(model)
    with pytest.raises(ValueError, match="no linearized layers"):
        linattn.attention_transfer(bert(), [batch()])
    with pytest.raises(ValueError, match="loss must be one of"):
        linattn.attention_transfer(model, [batch()], loss="kl")


def gemma2(softcap, window=64, seed=0):
    """A small Gemma-2 (soft-capped scores of a few units; its sliding window longer than the
    sequences here, so that every layer is plain causal attention)."""
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma-2")
    config = transformers.Gemma2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
                                       query_pre_attn_scalar=1, attn_logit_softcapping=softcap, initializer_range=0.2,
                                       max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(config).eval().double()


def test_gemma2_soft_capping_reaches_the_teacher_and_the_hybrid():
    """Each layer takes the model's cap from the probe: the teacher is the soft-capped model (eager's
    float32 softmax aside), not the uncapped one; the hybrid caps its exact softmax, as its dense
    definition does; a call with another cap than the layer's is refused."""
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(4))
    model = gemma2(softcap=1.5)
    original = model.set_attn_implementation("eager") or model(ids).logits
    uncapped = gemma2(softcap=None)
    uncapped.set_attn_implementation("eager")
    assert not torch.allclose(uncapped(ids).logits, original, atol=1e-3)
    linattn.linearize(model, method="hybrid", window=3)
    assert [layer.softcap for layer in linearized_layers(model).values()] == [1.5, 1.5]
    set_mode(model, "teacher")
    torch.testing.assert_close(model(ids).logits, original, rtol=1e-5, atol=1e-5)
    set_mode(model, "student")
    assert torch.isfinite(model(ids).logits).all()
    for layer in linearized_layers(model).values():
        layer.softcap = 2.0
    with pytest.raises(ValueError, match="softcap=1.5, but was linearized with softcap=2.0"):
        model(ids)
    # A window shorter than the sequence and the cap, together in the teacher.
    short_window = gemma2(softcap=1.5, window=6)
    short_window.set_attn_implementation("eager")
    original = short_window(ids).logits
    linattn.linearize(short_window, method="hybrid", window=3)
    set_mode(short_window, "teacher")
    torch.testing.assert_close(short_window(ids).logits, original, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_soft_capped_hybrid_equals_its_dense_definition_and_decodes(causal):
    torch.manual_seed(3)
    layer = LinearizedAttention(2, 4, method="hybrid", window=3, softcap=0.8).double()
    q, k, v = (torch.randn(2, 2, 23, 4, dtype=torch.float64) for _ in range(3))
    padding = torch.zeros(2, 23, dtype=torch.bool)
    padding[1, 17:] = True
    got = layer.student(q, k, v, 0.9, padding, causal)
    rows = ~padding[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[rows], dense_student(layer, q, k, v, 0.9, padding, causal)[rows],
                               rtol=1e-10, atol=1e-10)
    uncapped = LinearizedAttention(2, 4, method="hybrid", window=3).double()
    uncapped.load_state_dict(layer.state_dict())
    assert not torch.allclose(uncapped.student(q, k, v, 0.9, padding, causal), got)
    if causal:  # decoding: a prompt, then one token at a time, equals the whole sequence
        whole = layer.student(q, k, v, 0.9, None, True)
        out, entry = layer.decode(q[:, :, :9], k[:, :, :9], v[:, :, :9], 0.9, None)
        pieces = [out]
        for t in range(9, 23):
            out, entry = layer.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.9, entry)
            pieces.append(out)
        torch.testing.assert_close(torch.cat(pieces, 2), whole, rtol=1e-10, atol=1e-10)


def gpt_oss(seed=0):
    """A small gpt-oss (attention sinks of a few units, one sliding and one full layer)."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    config = transformers.GptOssConfig(
        vocab_size=61, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=64, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"],
        experts_implementation="eager")  # (its grouped-mm experts take no float64)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval().double()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(2 * torch.randn(4, dtype=torch.float64))
    return model


def test_gpt_oss_sinks_reach_the_teacher_and_the_hybrid():
    """gpt-oss's attention sinks (transformers' s_aux): each layer learns from the probe that it
    sinks; the teacher is the model (eager) with its sinks; the hybrid student counts them and
    decodes from a LinearStateCache as the whole sequence gives; the students without a softmax and
    a call without the sinks are refused, naming them."""
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(4))
    model = gpt_oss()
    original = model.set_attn_implementation("eager") or model(ids).logits
    linattn.linearize(model, method="hybrid", window=3)
    assert [layer.sinks for layer in linearized_layers(model).values()] == [True, True]
    set_mode(model, "teacher")
    torch.testing.assert_close(model(ids).logits, original, rtol=1e-9, atol=1e-9)
    set_mode(model, "student")
    student = model(ids).logits
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.add_(1.0)
    assert not torch.allclose(model(ids).logits, student)  # the student counts the sinks
    from linattn.hf import LinearStateCache

    prompt = ids[:1, :12]
    whole = model(ids[:1]).logits[:, 11:]
    cache = LinearStateCache()
    pieces = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:]]
    for t in range(12, 20):
        pieces.append(model(ids[:1, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="attention sinks .* the 'linear' student has none"):
        linattn.linearize(gpt_oss(), method="linear")
    layer = LinearizedAttention(2, 4, method="hybrid", sinks=True)
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="linearized with attention sinks, but the call passes none"):
        layer(q, q, q, 0.5)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        LinearizedAttention(2, 4, softcap=-1.0)


@pytest.mark.parametrize("loss", ["output_mse", "attention_ce"])
def test_gpt_oss_transfer_reduces_every_layer_loss(loss):
    """Transfer with the sinks in the teacher's targets and the student's outputs or weights."""
    model = gpt_oss()
    linattn.linearize(model, method="hybrid", window=4)
    inputs = [batch(seed=s) for s in range(3)]
    history = linattn.attention_transfer(model, inputs, steps=40, lr=3e-2, loss=loss, progress=False)
    for name in (name for name in history if name != "total"):  # (cross-entropy has the teacher's entropy as floor)
        assert sum(history[name][-3:]) < (0.8 if loss == "output_mse" else 0.95) * sum(history[name][:3]), name


@pytest.mark.parametrize("causal", [False, True])
def test_sinking_hybrid_equals_its_dense_definition_and_decodes(causal):
    """The hybrid with attention sinks against its dense weights (the sink's mass e^{s − lse} in the
    normaliser; out = weights @ v, the sink's value 0), finite gradients to the sinks with padded
    rows, the teacher against softmax with a sink column, and decoding token by token."""
    torch.manual_seed(3)
    layer = LinearizedAttention(2, 4, method="hybrid", window=3, sinks=True).double()
    sinks = torch.tensor([1.5, -0.5], dtype=torch.float64, requires_grad=True)
    q, k, v = (torch.randn(2, 2, 23, 4, dtype=torch.float64) for _ in range(3))
    padding = torch.zeros(2, 23, dtype=torch.bool)
    padding[1, 17:] = True
    got = layer.student(q, k, v, 0.9, padding, causal, sinks=sinks)
    rows = ~padding[:, None, :, None].expand_as(got)
    dense = layer.student_weights(q, k, 0.9, padding, causal, sinks) @ v
    torch.testing.assert_close(got[rows], dense[rows], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(layer.student(q, k, v, 0.9, padding, causal, sinks=sinks.detach() - 3)[rows], got[rows])
    assert torch.isfinite(torch.autograd.grad(got[rows].sum(), sinks)[0]).all()
    from linattn.conversion.attention import _softmax_weights

    teacher = layer.teacher(q, k, v, 0.9, padding, causal, sinks=sinks)
    expected = _softmax_weights(q, k, 0.9, padding, causal, sinks=sinks) @ v
    torch.testing.assert_close(teacher[rows], expected[rows], rtol=1e-10, atol=1e-10)
    if causal:  # decoding: a prompt, then one token at a time, equals the whole sequence
        whole = layer.student(q, k, v, 0.9, None, True, sinks=sinks)
        out, entry = layer.decode(q[:, :, :9], k[:, :, :9], v[:, :, :9], 0.9, None, sinks)
        pieces = [out]
        for t in range(9, 23):
            out, entry = layer.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.9, entry, sinks)
            pieces.append(out)
        torch.testing.assert_close(torch.cat(pieces, 2), whole, rtol=1e-10, atol=1e-10)


def mistral(window=4, seed=0):
    config = transformers.MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                        max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.MistralForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["hybrid", "linear"])
def test_sliding_window_layers_learn_from_their_windowed_teacher(method):
    """A model whose sliding window is shorter than the sequence: the teacher is the model itself
    (its window honoured: equal to sdpa's windowed attention to 1e-10 in float64, padding included),
    both losses train against it, and the student, which attends every key, generates from the
    state cache as it does recomputing; transformers' sliding cache, which drops keys the student
    reads, is refused by name."""
    model = mistral().double()
    inputs = batch(length=14)
    original = with_sdpa(model)(**inputs).logits
    linattn.linearize(model, method=method, window=2)
    set_mode(model, "teacher")
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(model(**inputs).logits[real], original[real], rtol=1e-10, atol=1e-10)
    set_mode(model, "transfer")
    model(**inputs)
    assert all(torch.isfinite(layer.last_loss) for layer in linearized_layers(model).values())
    for loss in ("output_mse", "attention_ce"):
        history = linattn.attention_transfer(model, [inputs], steps=3, loss=loss, progress=False)
        assert all(math.isfinite(value) for values in history.values() for value in values)
    ids = inputs["input_ids"][:1, :9]
    runs = [model.generate(ids, max_new_tokens=6, do_sample=False, **options)
            for options in ({"past_key_values": linattn.hf.LinearStateCache()}, {"use_cache": False})]
    assert runs[0].tolist() == runs[1].tolist()
    with pytest.raises(ValueError, match="dropped this sliding-window layer's first"):
        model.generate(ids, max_new_tokens=6, do_sample=False)


def with_sdpa(model):
    model.set_attn_implementation("sdpa")
    return model


def test_modernbert_bidirectional_windows_are_the_teacher():
    """ModernBERT's local layers attend in a bidirectional window shorter than the sequence: the
    teacher honours it (equal to sdpa in float64, padding included) and the hybrid student trains."""
    from test_hf import modernbert

    model = with_sdpa(modernbert())
    inputs = batch(length=14)
    original = model(**inputs).last_hidden_state
    linattn.linearize(model, method="hybrid", window=1)
    set_mode(model, "teacher")
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(model(**inputs).last_hidden_state[real], original[real], rtol=1e-10, atol=1e-10)
    history = linattn.attention_transfer(model, [inputs], steps=3, progress=False)
    assert len(history) == 3 + 1 and all(math.isfinite(v) for values in history.values() for v in values)  # + total
