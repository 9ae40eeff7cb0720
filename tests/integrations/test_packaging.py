"""Packaging: the sdist carries every source the extension is built from, builds refuse an
environment without torch (an isolated build), and import refuses a torch other than the one
the extension was built against."""
import os
import subprocess
import sys
import tarfile

import pytest
from conftest import REPO_ROOT

ROOT = str(REPO_ROOT)


def _tracked(prefix):
    try:
        out = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [line for line in out.stdout.splitlines() if line]


def test_sdist_contains_every_source_header_and_the_license(tmp_path):
    setuptools_build_meta = pytest.importorskip("setuptools.build_meta")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        name = setuptools_build_meta.build_sdist(str(tmp_path))
    finally:
        os.chdir(cwd)
    with tarfile.open(tmp_path / name) as archive:
        members = {m.split("/", 1)[1] for m in archive.getnames() if "/" in m}
    expected = _tracked("csrc") + ["LICENSE", "README.md", "setup.py", "pyproject.toml"] + _tracked("linattn")
    missing = sorted(set(expected) - members)
    assert not missing, f"missing from the sdist: {missing}"


def test_build_without_torch_says_to_use_no_build_isolation():
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; exec(open('setup.py').read())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--no-build-isolation" in result.stderr


def test_import_refuses_a_torch_other_than_the_build_one():
    code = "import torch; torch.__version__ = '0.0.1'; import linattn"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "was built against torch" in result.stderr and "but torch 0.0.1 is installed" in result.stderr


def test_extension_exports_nothing_it_links_statically():
    """Only PyInit__C is a strong exported symbol of the built extension. A toolchain that links
    libstdc++ statically (a GPU image's did) otherwise exports that private copy's functions, the
    process's own libstdc++ answers part of their calls, and the first error message that formats
    a number crashes the process (setup.py hides static libraries: -Wl,--exclude-libs,ALL).
    Template code from headers is exported weak (W/V), which is harmless and allowed."""
    import shutil

    import linattn._C as extension

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    listing = subprocess.run([nm, "-D", "--defined-only", extension.__file__], capture_output=True, text=True,
                             check=True).stdout
    strong = sorted(line.split()[-1] for line in listing.splitlines()
                    if len(line.split()) == 3 and line.split()[1] in "TDBR")
    assert strong == ["PyInit__C"], f"{len(strong)} strong exported symbols, e.g. {strong[:5]}"
