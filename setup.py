"""Builds linattn._C: every operator's C++ sources, plus CUDA sources when they exist and both
a CUDA toolkit and a CUDA build of torch are present (no GPU needed to compile)."""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
except ImportError:  # an isolated build (pip without --no-build-isolation, python -m build)
    raise SystemExit(
        "linattn is compiled against the torch it will run with, and this build environment has none: "
        "install torch first, then build with `pip install --no-build-isolation .` (or `-e .`). A build in "
        "an isolated environment would download another torch and build an extension that cannot load."
    )


def locate_cuda_toolkit():
    """Points CUDA_HOME at the toolkit whose nvcc is on the PATH, when the PATH holds a wrapper
    script (as /usr/local/bin/nvcc here): torch would take the wrapper's parent folder
    (/usr/local), which has no CUDA headers for the host compiler. nvcc itself reports its root
    (`--dryrun` prints TOP=... for any compile)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime_api.h")):
        return
    try:
        report = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return
    for line in (report.stdout + report.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.normpath(line.split("=", 1)[1].strip())
            if os.path.exists(os.path.join(top, "include", "cuda_runtime_api.h")):
                os.environ["CUDA_HOME"] = top
            return


locate_cuda_toolkit()
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
# Recorded so that `import linattn` can refuse, with a clear message, a torch other than the one
# the extension was compiled against (whose ABI it would not match).
BUILD_INFO = os.path.join(HERE, "linattn", "_build_info.py")
# The limited Python API (abi3) needs torch >= 2.6, where extensions no longer need pybind11.
TORCH_MAJOR_MINOR = tuple(int(x) for x in torch.__version__.split(".")[:2])
PY_LIMITED_API = TORCH_MAJOR_MINOR >= (2, 6)
# torch 2.14's headers require C++20 (`#error C++20 or later compatible compiler is required`).
CXX_STANDARD = "c++20" if TORCH_MAJOR_MINOR >= (2, 10) else "c++17"


# LINATTN_BUILD_CUDA=0 builds the CPU extension only (the sanitizer build does).
WANT_CUDA = os.environ.get("LINATTN_BUILD_CUDA", "auto") != "0"


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "**", pattern), recursive=True))


def extension():
    # -fopenmp: at::parallel_for is a header template, so it only runs in parallel when this
    # extension itself is compiled with OpenMP (torch's CPU builds use the OpenMP backend).
    # -fno-trapping-math / -fno-math-errno (as torch itself is built): lets GCC if-convert and
    # vectorize the element loops of the kernels.
    cxx_flags = ["-O3", f"-std={CXX_STANDARD}", "-fvisibility=hidden", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    link_flags = ["-fopenmp"]
    if sys.platform.startswith("linux"):
        # Keep whatever the toolchain links statically private to the extension. Some images'
        # compilers (seen on a GPU machine: CXX=/opt/gcc/bin/g++, a wrapper that links libstdc++
        # statically) put a second libstdc++ inside _C.abi3.so with its symbols exported; the
        # process's own libstdc++ (loaded by torch) then took over part of its calls, and
        # formatting the first error message (ostream << double) crashed. Hidden, the static copy
        # only ever calls itself; with a shared libstdc++ the flag changes nothing.
        link_flags.append("-Wl,--exclude-libs,ALL")
    if PY_LIMITED_API and not hasattr(cpp_extension, "min_supported_cpython"):
        # Newer torch adds -DPy_LIMITED_API itself for py_limited_api extensions; a second
        # definition would only trigger a "redefined" warning.
        cxx_flags.append("-DPy_LIMITED_API=0x030a0000")
    if os.environ.get("LINATTN_SANITIZE") == "1":
        # AddressSanitizer + UndefinedBehaviorSanitizer build for the test suite (see README,
        # scripts/sanitize.sh); every UB report aborts instead of printing and going on.
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
        cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1"] + sanitize
        link_flags += sanitize
    # CUDA-only sources: the kernels (*.cu) and the host code that launches them (*cuda*.cpp,
    # which includes CUDA headers); everything else builds everywhere.
    cuda_sources = sources("*.cu") + sources("*cuda*.cpp")
    cpp_sources = [s for s in sources("*.cpp") if s not in cuda_sources]
    if cuda_sources and WANT_CUDA and torch.version.cuda is not None and CUDA_HOME is not None:
        if not torch.cuda.is_available():
            # No visible GPU to ask for its architecture: build for Ampere and Hopper.
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "linattn._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", f"-std={CXX_STANDARD}"]},
            extra_link_args=link_flags,
            py_limited_api=PY_LIMITED_API,
        )
    return CppExtension(
        "linattn._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=PY_LIMITED_API,
    )


def write_build_info(cuda_kernels):
    with open(BUILD_INFO, "w") as f:
        f.write(
            "# Written by setup.py when the extension was built; not tracked by git.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
            "# Whether the fused CUDA kernels were compiled in (a CUDA torch and toolkit were present).\n"
            f"CUDA_KERNELS = {cuda_kernels!r}\n"
            "# False when LINATTN_BUILD_CUDA=0 asked for a CPU-only build.\n"
            f"CUDA_WANTED = {WANT_CUDA!r}\n"
        )


EXTENSION = extension()
write_build_info(cuda_kernels=any(source.endswith(".cu") for source in EXTENSION.sources))
setup(
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if PY_LIMITED_API else {},
)
