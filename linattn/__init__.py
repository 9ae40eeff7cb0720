"""linattn: efficient attention for PyTorch as dispatcher-registered custom operators."""

__version__ = "0.1.0"

import torch  # noqa: F401  (libtorch must be loaded before the extension that links to it)

try:
    from ._build_info import TORCH_VERSION as _BUILT_AGAINST
except ImportError:  # pragma: no cover - a source tree that was never built
    _BUILT_AGAINST = None
if _BUILT_AGAINST is not None and _BUILT_AGAINST != torch.__version__:
    raise ImportError(
        f"linattn's C++ extension was built against torch {_BUILT_AGAINST}, but torch {torch.__version__} is "
        "installed; extensions only load into the torch they were compiled with. Rebuild it: "
        "`pip install --no-build-isolation -e .` (or `bash scripts/install.sh`) from the repository root"
    )

try:
    from . import _C  # noqa: F401  (loading it registers the C++ operators)
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "linattn's C++ extension (linattn._C) could not be loaded: it is not built, or it was built "
        "against another torch. From the repository root run `bash scripts/install.sh`, or "
        f"`pip install --no-build-isolation -e .` with the torch you use installed. Original error: {error}"
    ) from error

from . import ops  # noqa: E402,F401  (the operators' Python side; registers additive's)
from .ops import cuda_backend, set_cuda_backend  # noqa: E402
from . import reference  # noqa: E402
from .feature_maps import elu_feature_map, favor_features, random_features, relu_feature_map  # noqa: E402
from .functional import efficient_attention, linear_attention, performer_attention  # noqa: E402
from .functional import sliding_window_attention, swin_attention, window_attention, shifted_window_attention  # noqa: E402
from .functional import forgetting_attention  # noqa: E402
from .functional import additive_attention, lsh_attention, linear_attention_step  # noqa: E402
from .window import window_mask  # noqa: E402
from .delta_rule import delta_rule_attention, delta_rule_step  # noqa: E402
from .sparse import bigbird_layout, block_local_layout, block_sparse_attention, layout_mask  # noqa: E402
from . import nn  # noqa: E402
from . import distributed  # noqa: E402
from . import hf  # noqa: E402  (imports transformers only when register() is called)
from .swap import swap_attention  # noqa: E402
from .conversion import attention_transfer, linearize  # noqa: E402

__all__ = [
    "linear_attention", "linear_attention_step", "delta_rule_attention", "delta_rule_step", "performer_attention", "efficient_attention", "sliding_window_attention", "window_mask",
    "forgetting_attention",
    "block_sparse_attention", "block_local_layout", "swin_attention", "shifted_window_attention", "lsh_attention", "additive_attention", "bigbird_layout", "layout_mask", "random_features", "favor_features",
    "elu_feature_map", "relu_feature_map", "nn", "distributed", "hf", "swap_attention", "reference",
    "set_cuda_backend", "cuda_backend", "linearize", "attention_transfer", "__version__",
]
