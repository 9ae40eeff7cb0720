"""linattn.linearize on torch / timm models (through swap_attention and the "linearized" method,
docs/methods.md §10): weights kept, teacher = the original model, pretrained state_dicts still
load with strict=True, transfer lowers every layer's loss, the method's options and errors."""
import pytest
import torch

import linattn
from linattn.conversion import linearized_layers, set_mode


def encoder(seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("student", ["hybrid", "linear"])
def test_torch_encoder(student):
    model, x = encoder(), torch.randn(3, 40, 32)
    padding = torch.zeros(3, 40, dtype=torch.bool)
    padding[2, 31:] = True
    original = model(x, src_key_padding_mask=padding)
    state = model.state_dict()
    linattn.linearize(model, method=student, window=4, global_tokens="first")
    assert model.linattn_linearization["layers"] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert len(linearized_layers(model)) == 2
    model.load_state_dict(state, strict=True)  # the pretrained weights still load; the maps stay
    set_mode(model, "teacher")
    real = ~padding
    torch.testing.assert_close(model(x, src_key_padding_mask=padding)[real], original[real], rtol=1e-5, atol=1e-5)
    set_mode(model, "student")
    assert torch.isfinite(model(x, src_key_padding_mask=padding)[real]).all()
    history = linattn.attention_transfer(model, [x], steps=30, lr=3e-2, progress=False)
    for name, losses in history.items():
        assert losses[-1] < 0.8 * losses[0], name


def test_causal_decoder_style_mask():
    model, x = encoder(), torch.randn(2, 24, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(24)
    original = model(x, mask=mask, is_causal=True)
    linattn.linearize(model, window=3)
    set_mode(model, "teacher")
    torch.testing.assert_close(model(x, mask=mask, is_causal=True), original, rtol=1e-5, atol=1e-5)
    set_mode(model, "student")
    out = model(x, mask=mask, is_causal=True)
    x2 = x.clone()
    x2[:, 20:] = 5.0  # later tokens change nothing before them
    torch.testing.assert_close(model(x2, mask=mask, is_causal=True)[:, :20], out[:, :20])


def test_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    images = torch.randn(2, 3, 32, 32)
    original = model(images)
    linattn.linearize(model, window=2, global_tokens="first")
    assert len(model.linattn_linearization["layers"]) == 2
    set_mode(model, "teacher")
    torch.testing.assert_close(model(images), original, rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        linattn.linearize("bert")
    with pytest.raises(ValueError, match="found no attention module to linearize"):
        linattn.linearize(torch.nn.Linear(2, 2))
    model = linattn.linearize(encoder())
    with pytest.raises(ValueError, match="already linearized"):
        linattn.linearize(model)
    with pytest.raises(ValueError, match="method must be one of"):
        linattn.nn.MultiheadAttention(8, 2, method="linearized", student="performer")
