"""The Python side of the restricted-softmax operators (csrc/restricted_softmax/, docs/methods.md
§5–§7): which forward operator a call runs. Their schemas are in csrc/ops.cpp; checks, kernels,
fake kernels and autograd are C++."""
import torch

from . import routing


def sliding_window_op():
    """The sliding-window forward operator (the device-generic twin under the tests' switch)."""
    if routing.generic_in_use():
        return torch.ops.linattn.sliding_window_attn_fwd_generic.default
    return torch.ops.linattn.sliding_window_attn_fwd.default


def block_sparse_op():
    """The block-sparse forward operator (the device-generic twin under the tests' switch)."""
    if routing.generic_in_use():
        return torch.ops.linattn.block_sparse_attn_fwd_generic.default
    return torch.ops.linattn.block_sparse_attn_fwd.default
