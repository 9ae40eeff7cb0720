"""linattn.swap_attention on the models researchers have: nn.Transformer layers, torchvision's
VisionTransformer and timm's ViT, in training and in eval mode."""
import copy

import pytest
import torch
from torch import nn

import linattn



def _count_core_calls(model):
    """Counts forward calls of every linattn method module, to prove the output came from linattn.
    (It wraps `forward` rather than registering hooks: hooks would themselves switch torch's
    fused encoder path off and hide the bug this looks for.)"""
    calls = []

    def counting(forward):
        def wrapper(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        return wrapper

    for module in model.modules():
        if module.__class__.__module__.startswith("linattn.nn.methods"):
            module.forward = counting(module.forward)
    return calls


def _encoder():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


def _vit():
    # Only the torchvision cases need torchvision: the pure-torch ones run without it.
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initializes the head: outputs would all be 0
    return model


def _timm_vit():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    return timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


MODELS = {
    "encoder": (_encoder, lambda: (torch.randn(2, 10, 32),)),
    "vit": (_vit, lambda: (torch.randn(2, 3, 32, 32),)),
    "timm_vit": (_timm_vit, lambda: (torch.randn(2, 3, 32, 32),)),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("training", [True, False])
def test_swapped_model_runs_linattn(model_name, training):
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    original = build().train(training)
    swapped = linattn.swap_attention(copy.deepcopy(original), method="linear")
    assert not any(type(m) is nn.MultiheadAttention for m in swapped.modules())
    calls = _count_core_calls(swapped)
    x = inputs()
    with torch.set_grad_enabled(training):
        out = swapped(*x)
    assert len(calls) == 2, "every attention layer must run through linattn"
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, original(*x))  # linear attention is not softmax attention
    if training:
        out.float().pow(2).mean().backward()
        assert all(p.grad is not None for p in swapped.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("training", [True, False])
def test_softmax_swap_keeps_the_model_output(model_name, training):
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    original = build().train(training)
    for module in original.modules():  # dropout would make two runs differ
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    swapped = linattn.swap_attention(copy.deepcopy(original), method="softmax")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(swapped(*x), original(*x), rtol=1e-5, atol=1e-5)


def test_encoder_eval_with_padding_skips_torch_fast_paths():
    torch.manual_seed(0)
    model = linattn.swap_attention(_encoder().eval(), method="linear")
    calls = _count_core_calls(model)
    x = torch.randn(2, 10, 32)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 6:] = True
    with torch.no_grad():
        out = model(x, src_key_padding_mask=padding)
    assert len(calls) == 2
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_decoder_and_full_transformer():
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                           dropout=0.0, batch_first=True)
    linattn.swap_attention(model, method="linear")
    calls = _count_core_calls(model)
    src, tgt = torch.randn(2, 12, 32), torch.randn(2, 7, 32)
    out = model(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(7), tgt_is_causal=True)
    assert out.shape == (2, 7, 32) and len(calls) == 3  # encoder self, decoder self (causal), cross


def test_swap_keeps_weights_and_options():
    torch.manual_seed(0)
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linattn.swap_attention(model, method="performer", nb_features=16, seed=1)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    extra = sorted(set(after) - set(before))
    assert extra and all(key.endswith("core.projection") for key in extra)
    assert all(m.core.nb_features == 16 for m in model.modules() if isinstance(m, linattn.nn.MultiheadAttention))


def test_linformer_layerwise_sharing_uses_one_projection():
    model = _vit()
    linattn.swap_attention(model, method="linformer", max_seq_len=17, k=8, sharing="layerwise")
    projections = {id(m.core.E) for m in model.modules() if isinstance(m, linattn.nn.MultiheadAttention)}
    assert len(projections) == 1
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("model_name", ["encoder", "vit", "timm_vit"])
def test_swapped_attention_compiles_fullgraph(model_name):
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    model = linattn.swap_attention(build().eval(), method="linear")
    attention = next(m for m in model.modules() if isinstance(m, (linattn.nn.MultiheadAttention, linattn.nn.TimmAttention)))
    x = torch.randn(2, 17, 32)
    call = (lambda m: m(x, x, x, need_weights=False)[0]) if isinstance(attention, nn.MultiheadAttention) else (lambda m: m(x))
    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True)
    torch.testing.assert_close(call(compiled), call(attention), rtol=1e-5, atol=1e-5)


def test_unknown_method_or_option_leaves_model_untouched():
    model = _encoder()
    with pytest.raises(ValueError, match="available methods"):
        linattn.swap_attention(model, method="nystrom")
    with pytest.raises(ValueError, match="valid options"):
        linattn.swap_attention(model, method="linear", nb_features=4)
    assert all(type(m.self_attn) is nn.MultiheadAttention for m in model.layers)
    with pytest.raises(ValueError, match="available methods"):
        linattn.swap_attention(nn.Linear(2, 2), method="nystrom")


def test_whole_swapped_vit_compiles_fullgraph_and_trains():
    torch.manual_seed(0)
    model = linattn.swap_attention(_vit(), method="linear").train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out, expected = compiled(x), model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
