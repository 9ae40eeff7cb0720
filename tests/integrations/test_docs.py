"""The documentation in docs/ stays true to the code: every `docs/methods.md §N` a comment cites
exists, every public function and class has a docstring and a place in the API reference, and
the module's list of methods comes from the registry. (scripts/docs.sh builds the HTML with
warnings as errors; CI runs it.)"""
import inspect
import re

import pytest

import linattn
from conftest import REPO_ROOT
from linattn.nn.methods import METHODS

ROOT = REPO_ROOT
CITATION = re.compile(r"docs/methods\.md §(\d+)(?:–§(\d+))?")


def _sources():
    for folder, patterns in (("linattn", ("*.py",)), ("csrc", ("*.h", "*.cpp", "*.cu", "*.inc")),
                             ("tests", ("*.py",)), ("benchmarks", ("*.py",))):
        for pattern in patterns:
            yield from (ROOT / folder).rglob(pattern)


def test_every_cited_section_of_the_methods_page_exists():
    sections = set(re.findall(r"^## §(\d+) ", (ROOT / "docs" / "methods.md").read_text(), flags=re.M))
    cited = {}
    for path in _sources():
        for match in CITATION.finditer(path.read_text(errors="replace")):
            for number in filter(None, match.groups()):
                cited.setdefault(number, path.relative_to(ROOT))
    assert cited, "no citation found: the pattern no longer matches the code's comments"
    missing = {n: str(p) for n, p in cited.items() if n not in sections}
    assert not missing, f"cited sections missing from docs/methods.md: {missing}"


def _public():
    for name in linattn.__all__:
        obj = getattr(linattn, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"linattn.{name}", obj
    for name in ("MultiheadAttention", "DecodingCache"):
        yield f"linattn.nn.{name}", getattr(linattn.nn, name)


@pytest.mark.parametrize("name,obj", list(_public()), ids=lambda x: x if isinstance(x, str) else "")
def test_public_api_is_documented(name, obj):
    assert obj.__doc__ and len(obj.__doc__.strip()) > 40, f"{name} has no real docstring"
    reference = (ROOT / "docs" / "api.rst").read_text()
    assert re.search(rf"^\.\. auto(function|class):: {re.escape(name)}$", reference, flags=re.M), \
        f"{name} is not in docs/api.rst"


def test_module_docstring_lists_every_method():
    doc = linattn.nn.MultiheadAttention.__doc__
    for name in METHODS:
        assert f'- "{name}":' in doc, name
