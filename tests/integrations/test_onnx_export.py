"""ONNX export (torch.onnx.export, the dynamo exporter and the legacy one) of models that use
linattn, run in onnxruntime against eager; and torch.export programs that hold linattn ops.
onnx / onnxruntime / onnxscript are optional test extras: the tests skip without them."""
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import linattn

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


class _Functional(nn.Module):
    def __init__(self, causal, masked):
        super().__init__()
        self.causal, self.masked = causal, masked

    def forward(self, q, k, v, mask):
        return linattn.linear_attention(q, k, v, causal=self.causal, key_padding_mask=mask if self.masked else None)


def _export_and_run(model, inputs, dynamo, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, [t.numpy() for t in inputs if isinstance(t, torch.Tensor)]))
    return torch.from_numpy(session.run(None, feeds)[0])


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[1, 50:] = True
    return q, k, v, mask


@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (False, True), (True, True)])
def test_functional_linear_attention_exports_to_onnx(causal, masked, tmp_path):
    model = _Functional(causal, masked).eval()
    inputs = _inputs()
    expected = model(*inputs)
    got = _export_and_run(model, inputs, True, tmp_path / "model.onnx")
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_legacy_onnx_exporter_says_to_use_dynamo(tmp_path):
    with pytest.raises(Exception, match=r"legacy TorchScript-based ONNX exporter.*dynamo=True"):
        _export_and_run(_Functional(True, False).eval(), _inputs(), False, tmp_path / "model.onnx")


@pytest.mark.parametrize("method", ["linear", "performer", "efficient"])
def test_swapped_encoder_exports_to_onnx(method, tmp_path):
    torch.manual_seed(0)
    options = {"seed": 0} if method == "performer" else {}
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                    enable_nested_tensor=False)
    linattn.swap_attention(encoder, method=method, **options).eval()
    x = torch.randn(2, 9, 16)
    expected = encoder(x)
    got = _export_and_run(encoder, (x,), True, tmp_path / "encoder.onnx")
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_torch_export_program_without_linattn_imported_says_so(tmp_path):
    class Model(nn.Module):
        def forward(self, q, k, v):
            return linattn.linear_attention(q, k, v, causal=True)

    q = torch.randn(1, 2, 10, 4)
    program = torch.export.export(Model(), (q, q, q))
    assert any("linattn" in str(node.target) for node in program.graph.nodes)
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path))  # linattn imported here: loads and runs
    assert torch.allclose(loaded.module()(q, q, q), Model()(q, q, q))
    code = f"import torch; torch.export.load({str(path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    # torch names the op and says to import the library that registers it (import linattn).
    assert "torch.ops.linattn.linear_attn_fwd" in result.stderr and "import the custom op" in result.stderr
