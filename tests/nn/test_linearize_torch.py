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


class TinyDecoder(torch.nn.Module):
    """Two pre-norm blocks of linattn's own softmax attention, causal (the shape of
    examples/generate_text.py's model)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.attn = torch.nn.ModuleList(
            linattn.nn.MultiheadAttention(dim, heads, batch_first=True, method="softmax", dtype=torch.float64)
            for _ in range(2))

    def forward(self, x, cache=None):
        for attn in self.attn:
            if cache is None:
                mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
                x = x + attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
            else:
                x = x + attn(x, x, x, need_weights=False, cache=cache)[0]
        return x


@pytest.mark.parametrize("student,global_tokens",
                         [("linear", None), ("hybrid", None), ("hybrid", "first"), ("gla", None)])
def test_linattn_softmax_modules_linearize_and_decode(student, global_tokens):
    """linattn's own softmax modules linearize in place (weights kept, teacher = the original);
    the student then decodes through a DecodingCache, a prompt chunk and single tokens, with the
    results of the whole sequence, from a cache whose size stops growing once the window is full."""
    model, x = TinyDecoder(), torch.randn(2, 31, 16, dtype=torch.float64)
    original = model(x)
    linattn.linearize(model, method=student, window=4, global_tokens=global_tokens)
    assert model.linattn_linearization["layers"] == ["attn.0", "attn.1"]
    assert all(module.method == "linearized" for module in model.attn)
    set_mode(model, "teacher")
    torch.testing.assert_close(model(x), original, rtol=1e-12, atol=1e-12)
    set_mode(model, "student")
    with torch.no_grad():
        for p in model.parameters():  # a student that is not its initial self
            if p.requires_grad and p.dim() <= 2:
                p.add_(0.1 * torch.randn_like(p))
        whole = model(x)
        cache = linattn.nn.DecodingCache()
        pieces, sizes = [model(x[:, :9], cache)], []
        for t in range(9, 22):
            pieces.append(model(x[:, t:t + 1], cache))
            sizes.append(cache.memory_bytes())
        pieces.append(model(x[:, 22:27], cache))  # a chunk after single tokens
        pieces += [model(x[:, t:t + 1], cache) for t in range(27, 31)]
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-10)
    assert len(set(sizes)) == 1  # constant from the start: the window was full after the prompt
    set_mode(model, "teacher")
    with pytest.raises(ValueError, match="incremental decoding runs the student"):
        model(x[:, :3], linattn.nn.DecodingCache())


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
