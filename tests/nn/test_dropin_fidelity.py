"""linattn.nn.MultiheadAttention survives what torch's own module survives: nested tensors from
nn.TransformerEncoder's fast path, torch's exception kinds, empty batches, mask dtypes, the
is_causal hint, TorchScript and compile misuse with a clear word, meta-device init; and
swap_attention never does nothing silently."""
import logging
import re
import warnings

import pytest
import torch
from torch import nn

import linattn

METHODS = {"softmax": {}, "linear": {}, "performer": {"seed": 0}, "efficient": {}, "linformer": {"max_seq_len": 16},
           "local": {"window": 2}, "longformer": {"window": 2}, "bigbird": {"block_size": 2}, "hybrid": {"window": 2},
           "deltanet": {}, "gated_deltanet": {}, "kda": {}}


def _module(method, **kwargs):
    return linattn.nn.MultiheadAttention(8, 2, batch_first=True, method=method, **METHODS[method], **kwargs)


@pytest.mark.parametrize("order", ["swap layer, then build encoder", "build encoder, then swap"])
@pytest.mark.parametrize("method", ["linear", "softmax"])
def test_encoder_with_nested_tensor_fast_path(order, method):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    if order.startswith("swap"):
        encoder = nn.TransformerEncoder(linattn.swap_attention(layer, method=method), 2, enable_nested_tensor=True)
    else:
        encoder = linattn.swap_attention(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True), method=method)
    encoder.eval()
    x = torch.randn(3, 7, 8)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    padding[2, 2:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype-stage nested tensor warning
        out = encoder(x, src_key_padding_mask=padding)
        encoder.use_nested_tensor = False
        dense = encoder(x, src_key_padding_mask=padding)
    kept = ~padding
    assert torch.allclose(out[kept], dense[kept], atol=1e-5)
    assert torch.isfinite(out).all()


def test_nested_inputs_directly():
    module = _module("linear").eval()
    sequences = [torch.randn(n, 8) for n in (4, 1, 6)]
    nested = torch.nested.nested_tensor(sequences)
    with torch.no_grad():
        out, _ = module(nested, nested, nested, need_weights=False)
        for seq, got in zip(sequences, out.unbind()):
            expected, _ = module(seq[None], seq[None], seq[None], need_weights=False)
            assert torch.allclose(got, expected[0], atol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_shape_errors_are_also_assertion_errors(method):
    module = _module(method)
    x = torch.randn(2, 5, 8)
    for call in (
        lambda: module(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
        lambda: module(torch.randn(2, 5, 7), x, x),
        lambda: module(x[None], x[None], x[None]),
    ):
        with pytest.raises(AssertionError):
            call()
        with pytest.raises(ValueError, match="linattn.nn.MultiheadAttention"):
            call()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32])
def test_integer_masks_are_refused_like_torch(method, dtype):
    module = _module(method)
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool .* or floating-point"):
        module(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=dtype))
    with pytest.raises(AssertionError, match=r"attn_mask must be a bool"):
        module(x, x, x, attn_mask=torch.zeros(5, 5, dtype=dtype))
    torch_module = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(AssertionError):
        torch_module(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=dtype))


@pytest.mark.parametrize("method", list(METHODS))
def test_empty_batch_gives_empty_output(method):
    module = _module(method)
    x = torch.randn(0, 5, 8)
    out, weights = module(x, x, x)
    expected, _ = nn.MultiheadAttention(8, 2, batch_first=True)(x, x, x)
    assert out.shape == expected.shape == (0, 5, 8)
    assert weights.shape == (0, 5, 5)


@pytest.mark.parametrize("method", ["softmax", "linear", "performer"])
def test_is_causal_hint_takes_its_mask_without_validating_it(method):
    """As torch: with is_causal=True (no key padding, no weights) the mask only accompanies the hint."""
    module = _module(method)
    x = torch.randn(2, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    expected, _ = module(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    for companion in (torch.zeros(3, 3), torch.zeros(5, 5)):  # torch accepts any companion here
        out, _ = module(x, x, x, attn_mask=companion, is_causal=True, need_weights=False)
        assert torch.allclose(out, expected, atol=1e-6)
    torch_module = nn.MultiheadAttention(8, 2, batch_first=True)
    torch_module(x, x, x, attn_mask=torch.zeros(3, 3), is_causal=True, need_weights=False)


def test_torch_jit_script_says_what_to_use_instead():
    layer = linattn.swap_attention(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), method="linear")
    with pytest.raises(RuntimeError, match=r"cannot be compiled with torch.jit.script.*use torch.compile"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script itself is deprecated
        torch.jit.script(layer)


def test_compiled_encoder_with_mask_but_no_is_causal_says_what_to_do():
    torch._dynamo.reset()
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                    enable_nested_tensor=False)
    linattn.swap_attention(encoder, method="linear")
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    x = torch.randn(2, 6, 8)
    compiled = torch.compile(encoder, fullgraph=True)
    with pytest.raises(Exception, match=r"pass is_causal=True \(or False\) explicitly with the mask"):
        compiled(x, mask=mask)
    torch._dynamo.reset()
    out = compiled(x, mask=mask, is_causal=True)
    assert torch.allclose(out, encoder(x, mask=mask, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_meta_init_then_reset_parameters(method):
    """FSDP-style: build on meta, to_empty(), reset_parameters() on every module that has it."""
    with torch.device("meta"):
        module = _module(method)
    module = module.to_empty(device="cpu")
    for submodule in module.modules():
        if hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    if method == "performer":
        assert torch.equal(module.core.projection, _module(method).core.projection)  # seeded: same draw
    x = torch.randn(2, 5, 8)
    assert torch.isfinite(module(x, x, x)[0]).all()


# --- swap_attention reports what it did --------------------------------------------------------

class _OwnAttention(nn.Module):
    def forward(self, x):
        return x


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.window = _OwnAttention()


def test_swap_logs_what_it_replaced(caplog):
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 3, enable_nested_tensor=False)
    with caplog.at_level(logging.INFO, logger="linattn"), warnings.catch_warnings():
        warnings.simplefilter("error")
        linattn.swap_attention(model, method="linear")
    assert "replaced 3 × torch.nn.modules.activation.MultiheadAttention with method='linear'" in caplog.text


def test_swap_warns_about_attention_it_does_not_handle():
    model = _Model()
    with pytest.warns(UserWarning, match=r"left 1 × .*_OwnAttention unchanged"):
        linattn.swap_attention(model, method="linear")
    assert isinstance(model.mha, linattn.nn.MultiheadAttention)


def test_swap_strict_raises_before_changing_anything():
    model = _Model()
    with pytest.raises(ValueError, match=r"_OwnAttention unchanged.*\(strict=True\)"):
        linattn.swap_attention(model, method="linear", strict=True)
    assert type(model.mha) is nn.MultiheadAttention


def test_swap_warns_when_nothing_was_replaced():
    with pytest.warns(UserWarning, match=r"holds no torch.nn.MultiheadAttention.*nothing was replaced"):
        linattn.swap_attention(nn.Sequential(nn.Linear(3, 3)), method="linear")
    with pytest.raises(ValueError, match="strict=True"):
        linattn.swap_attention(nn.Sequential(nn.Linear(3, 3)), method="linear", strict=True)


def test_swap_replaces_torchvision_swin_blocks_and_says_so(caplog, recwarn):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t()
    with caplog.at_level(logging.INFO, logger="linattn"):
        linattn.swap_attention(model, method="linear")
    assert "12 × torchvision.models.swin_transformer.ShiftedWindowAttention with linattn's fused window" in caplog.text
    assert not [w for w in recwarn if "linattn" in str(w.message)]


def test_swap_names_timm_eva_blocks():
    timm = pytest.importorskip("timm")
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=2)
    with pytest.warns(UserWarning, match=r"timm.models.eva.EvaAttention"):
        linattn.swap_attention(model, method="linear")


# --- where the softmax method could still be told apart from torch's module ------------------

def _invalid_shape_calls(module):
    """PyTorch's own invalid-shape cases of nn.MultiheadAttention(4, 4) (batch_first=False)."""
    q3, q2 = torch.randn(4, 4, 4), torch.randn(4, 4)
    mask_2d = torch.tensor([[False, False, True, True]] * 4)
    return [
        lambda: module(q3, torch.randn(4, 4), q3),                      # batched query, 2-D key
        lambda: module(q3, q3, q3, key_padding_mask=torch.tensor([False, True, True, True])),
        lambda: module(q3, q3, q3, attn_mask=torch.tensor([False, False, True, True])),
        lambda: module(q2, q3, q2),                                     # unbatched query, 3-D key
        lambda: module(q2, q2, q2, key_padding_mask=mask_2d),
        lambda: module(q2, q2, q2, attn_mask=torch.tensor([False, False, True, True])),
        lambda: module(q2, q2, q2, attn_mask=torch.randn(5, 4, 4).bernoulli_().to(torch.bool)),
        lambda: module(torch.randn(1, 4, 4, 4), q3, q3),                 # 4-D query
    ]


@pytest.mark.parametrize("method", ["softmax", "linear"])
def test_invalid_shapes_raise_torchs_messages(method):
    torch.manual_seed(0)
    ours = linattn.nn.MultiheadAttention(4, 4, method=method)
    theirs = nn.MultiheadAttention(4, 4)
    for index, (call, torch_call) in enumerate(zip(_invalid_shape_calls(ours), _invalid_shape_calls(theirs))):
        with pytest.raises(AssertionError) as torch_error:
            torch_call()
        # Code that matches torch's message keeps working after the swap.
        with pytest.raises(AssertionError, match=re.escape(str(torch_error.value))):
            call()


def test_empty_nested_inputs():
    module = _module("softmax").eval()
    empty = torch.nested.nested_tensor([])  # no sequence at all: torch refuses it too
    with torch.no_grad(), pytest.raises(AssertionError, match=r"at least one sequence"):
        module(empty, empty, empty, need_weights=False)
    no_tokens = torch.nested.nested_tensor([torch.zeros(0, 8), torch.zeros(0, 8)])
    with torch.no_grad():
        out, weights = module(no_tokens, no_tokens, no_tokens, need_weights=False)
    assert out.is_nested and [t.shape for t in out.unbind()] == [(0, 8), (0, 8)] and weights is None


def test_softmax_is_causal_without_a_mask_raises_like_torch():
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        nn.MultiheadAttention(8, 2, batch_first=True)(x, x, x, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        _module("softmax")(x, x, x, is_causal=True, need_weights=False)
    # The other methods define is_causal=True alone as causal (documented): it equals the masked call.
    module = _module("linear")
    out, _ = module(x, x, x, is_causal=True, need_weights=False)
    masked, _ = module(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(5), is_causal=True,
                       need_weights=False)
    assert torch.allclose(out, masked, atol=1e-6)


def test_performer_projection_on_the_meta_device_is_named():
    q = k = v = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"projection is on the meta device"):
        linattn.performer_attention(q, k, v, torch.empty(16, 4, device="meta"))
    module = linattn.nn.MultiheadAttention(8, 2, batch_first=True, method="performer", device="meta")
    module.load_state_dict(nn.MultiheadAttention(8, 2, batch_first=True).state_dict(), assign=True)
    with pytest.raises(ValueError, match=r"projection is on the meta device"):
        module(torch.randn(1, 5, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8))
