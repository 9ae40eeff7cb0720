"""linattn: efficient attention for PyTorch as dispatcher-registered custom operators."""

__version__ = "0.1.0"

import torch  # noqa: F401  (libtorch must be loaded before the extension that links to it)

try:
    from . import _C  # noqa: F401  (loading it registers the C++ operators)
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "linattn's C++ extension (linattn._C) could not be loaded: it is not built, or it was built "
        "against another torch. From the repository root run `bash scripts/install.sh`, or "
        f"`pip install --no-build-isolation -e .` with the torch you use installed. Original error: {error}"
    ) from error

from . import _ops  # noqa: E402,F401  (fake kernels and autograd for the operators)
from . import reference  # noqa: E402
from .feature_maps import elu_feature_map, favor_features, random_features, relu_feature_map  # noqa: E402
from .functional import efficient_attention, linear_attention, performer_attention  # noqa: E402
from . import nn  # noqa: E402
from .swap import swap_attention  # noqa: E402

__all__ = [
    "linear_attention", "performer_attention", "efficient_attention", "random_features", "favor_features",
    "elu_feature_map", "relu_feature_map", "nn", "swap_attention", "reference", "__version__",
]
