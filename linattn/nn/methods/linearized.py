"""A pretrained softmax layer being linearized (docs/methods.md §10): the method linattn.linearize
swaps into torch, timm and torchvision models (through swap_attention, which keeps their weights).
The work is linattn.conversion.LinearizedAttention's: its student runs by default, its exact
softmax is the teacher, and attention_transfer fits the one to the other."""
from ..decoding import decode_linearized
from .base import MethodModule


class LinearizedMethod(MethodModule):
    """Linearized softmax attention, docs/methods.md §10 (built by linattn.linearize). Options:
      student: "hybrid" (exact window + global tokens, linear for the rest), "linear",
        "deltanet" or "gated_deltanet" (the delta rule on the learned features), "gla" (linear with
        learned per-channel gates; causal only);
      feature_map: "hedgehog" or "t2r" (learned, per head, separate for q and k);
      window (64), global_tokens ("first_last", "first" or None), linear_scale (0.01): as
      linattn.linearize.
    The learned tensors are `core.layer`'s; its mode ("student", "teacher", "transfer") is set by
    linattn.conversion.set_mode."""

    name = "linearized"
    options = ("student", "feature_map", "window", "global_tokens", "linear_scale")
    supports_causal = True
    takes_any_mask = False
    supports_extra_keys = False
    decoder = staticmethod(decode_linearized)

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None, *, student="hybrid",
                 feature_map="hedgehog", window=64, global_tokens="first_last", linear_scale=1e-2):
        super().__init__()
        from ...conversion.attention import LinearizedAttention  # the conversion package builds on linattn.nn

        self.layer = LinearizedAttention(num_heads, head_dim, method=student, feature_map=feature_map, window=window,
                                         global_tokens=global_tokens, linear_scale=linear_scale).to(
                                             device=device, dtype=dtype)

    def forward(self, q, k, v, *, causal, key_padding_mask, attn_mask, dropout_p, need_weights, visible_kv=None):
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
        out = self.layer(q, k, v, scale, key_padding_mask, causal)
        if not need_weights:
            return out, None
        return out, self.layer.attention_weights(q, k, scale, key_padding_mask, causal)
