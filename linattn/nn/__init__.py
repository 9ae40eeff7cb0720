"""Modules: linattn.nn.MultiheadAttention (a drop-in for torch.nn.MultiheadAttention), the
attention methods it can use, and the module that replaces timm's Attention blocks."""
from .decoding import DecodingCache
from .methods import METHODS, build_method
from .multihead_attention import MultiheadAttention
from .timm_attention import TimmAttention

__all__ = ["MultiheadAttention", "DecodingCache", "TimmAttention", "METHODS", "build_method"]
