"""One home per method: a method's class in linattn/nn/methods/ carries its capabilities, its
decoder, its Hugging Face implementation names and its swap adapters, and everything that
lists methods derives from the registry, so that adding a method on an existing engine is its
class, its reference and its tests."""
import re

import pytest
import torch

import linattn
from conftest import REPO_ROOT
from linattn.nn.methods import METHODS, MethodModule

ROOT = REPO_ROOT


def test_no_call_site_tests_a_methods_name():
    """Capabilities are class attributes; comparing a method's name outside its class (as
    `method == "linformer"` once did in swap.py) would put the method in two places."""
    pattern = re.compile(r"""(method|\.name)\s*(==|!=|in)\s*[("'\[]""")
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in (ROOT / "linattn").rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, offenders


def test_every_registered_method_is_a_method_module_with_its_own_name():
    for name, cls in METHODS.items():
        assert issubclass(cls, MethodModule) and cls.name == name
        assert cls.__doc__, name


def test_a_new_method_class_registers_itself_and_a_taken_name_is_refused():
    class _Probe(MethodModule):
        name = "probe_for_the_registry_test"
    try:
        assert MethodModule.registry["probe_for_the_registry_test"] is _Probe
        with pytest.raises(ValueError, match="is taken"):
            type("Again", (MethodModule,), {"name": "probe_for_the_registry_test"})
    finally:
        del MethodModule.registry["probe_for_the_registry_test"]


def test_decoding_is_offered_exactly_by_the_methods_with_a_decoder():
    x = torch.randn(1, 3, 8)
    for name, cls in METHODS.items():
        options = {"max_seq_len": 8} if name == "linformer" else {}
        module = linattn.nn.MultiheadAttention(8, 2, batch_first=True, method=name, **options).eval()
        call = lambda: module(x, x, x, need_weights=False, cache=linattn.nn.DecodingCache())  # noqa: E731
        if cls.decoder is None:
            with pytest.raises(ValueError, match="incremental decoding"):
                call()
        else:
            out, _ = call()
            assert out.shape == x.shape


def test_hf_implementations_come_from_the_method_classes():
    from linattn.hf import IMPLEMENTATIONS
    from linattn.hf.attention import IMPLEMENTATIONS as KERNELIZED
    from linattn.hf.delta_rule import IMPLEMENTATIONS as DELTA_RULE

    assert set(IMPLEMENTATIONS) == set(KERNELIZED) | set(DELTA_RULE)
    assert IMPLEMENTATIONS == tuple(n for cls in METHODS.values() for n in cls.hf_implementations)


def test_the_methods_table_of_the_docs_lists_every_method():
    table = (ROOT / "docs" / "guide" / "modules.md").read_text()
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert sorted(listed) == sorted(METHODS) and len(listed) == len(set(listed))


def test_global_tokens_only_where_the_method_takes_them():
    x = torch.randn(1, 5, 8)
    global_mask = torch.zeros(1, 5, dtype=torch.bool)
    global_mask[:, 0] = True
    for name, cls in METHODS.items():
        options = {"max_seq_len": 8} if name == "linformer" else {}
        module = linattn.nn.MultiheadAttention(8, 2, batch_first=True, method=name, **options)
        if cls.takes_global_tokens:
            module(x, x, x, global_mask=global_mask)
        else:
            with pytest.raises(ValueError, match="global_mask"):
                module(x, x, x, global_mask=global_mask)
