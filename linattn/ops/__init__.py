"""The Python side of linattn's operators, one module per engine: linear.py (kernelized linear
attention: the state layout and which forward a call runs), restricted.py (sliding window and
block-sparse softmax), additive.py (the additive-attention operators themselves), and routing.py
(the CUDA backend and the tests' switches to the device-generic and fused paths). Schemas, checks,
kernels, fake kernels and autograd of the C++ operators live in csrc/<engine>/."""
from . import additive, linear, restricted, routing  # noqa: F401  (importing additive registers its operators)
from .linear import accumulate_dtype, augmented_state, returned_state, split_state  # noqa: F401
from .routing import (  # noqa: F401
    cuda_backend, fused_implementation, generic_implementation, generic_in_use, set_cuda_backend,
)
