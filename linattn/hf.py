"""Hugging Face transformers integration: linattn's attention behind `attn_implementation=`.

    import linattn
    linattn.hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="linattn_linear")
    model.generate(ids, past_key_values=linattn.hf.LinearStateCache(), max_new_tokens=...)

register() adds to transformers' AttentionInterface (and its mask interface, with sdpa's boolean
masks):
  - "linattn_linear": elu+1 linear attention (METHODS.md §1), causal where the model's attention
    module is (`module.is_causal`: decoders such as Llama), bidirectional otherwise (BERT, ViT);
  - "linattn_linear_relu": the same with the relu feature map.
Grouped-query heads are repeated to the query heads. Masks: what linear attention can honour,
key padding and causality; any other pattern (sliding windows, packed documents) raises a
ValueError. Dropout in training drops whole keys, as linattn.nn.MultiheadAttention's linear
methods do. Linear attention has no attention weights: `output_attentions` returns None.

Generation: with transformers' default DynamicCache the keys and values grow as usual and every
step attends over all of them (correct, O(context) per token). Pass
`past_key_values=linattn.hf.LinearStateCache()` instead and each layer keeps only its
recurrent state (S, z): constant memory and O(1) work per generated token.

transformers is an optional extra (`pip install transformers`), imported only here.
"""
import functools
from typing import Optional

import torch

from .functional import linear_attention
from .nn.methods import _drop_keys

__all__ = ["register", "LinearStateCache"]

IMPLEMENTATIONS = {"linattn_linear": "elu", "linattn_linear_relu": "relu"}
_registered = False


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, heads, T, D): each key/value head serves heads / H_kv query heads."""
    groups = heads // x.shape[1]
    if groups == 1:
        return x
    return x[:, :, None].expand(x.shape[0], x.shape[1], groups, *x.shape[2:]).reshape(x.shape[0], heads, *x.shape[2:])


def _key_padding(where, attention_mask, q_len, k_len, causal) -> Optional[torch.Tensor]:
    """The (B, T_k) key padding mask (True = padded) that, with causality, is exactly the 4-D
    mask transformers built; raises when the mask holds another pattern."""
    if attention_mask is None:
        return None
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    visible = visible[:, 0]  # (B, T_q, T_k); the head dim is 1 in transformers' masks
    key_visible = visible.any(dim=1)
    expected = key_visible[:, None, :].expand_as(visible)
    if causal:
        rows = torch.arange(q_len, device=visible.device)[:, None] + (k_len - q_len)
        expected = expected & (torch.arange(k_len, device=visible.device)[None, :] <= rows)
    # Rows of padded queries are left out: transformers may unmask them to avoid NaNs.
    query_real = key_visible[:, k_len - q_len:]
    if not bool(((visible == expected) | ~query_real[:, :, None]).all()):
        raise ValueError(f"{where}: the attention mask is not key padding{' plus causality' if causal else ''}, "
                         "which is all linear attention can honour (sliding-window or packed-document masks are not)")
    return None if bool(key_visible.all()) else ~key_visible


def _attention(feature_map: str):
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        where = f"linattn.hf ({module.__class__.__name__})"
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        state_layer = getattr(key, "_linattn_state_layer", None)
        heads = query.shape[1]
        key, value = _repeat_heads(key, heads), _repeat_heads(value, heads)
        q_len, k_len = query.shape[2], key.shape[2]
        if state_layer is not None:  # LinearStateCache: key/value are the new tokens only
            mask = None if attention_mask is None else attention_mask[..., -k_len:]  # the new keys' columns
            padding = _key_padding(where, mask, q_len, k_len, causal=True)
        else:  # with a growing KV cache, the new queries are the last positions
            if attention_mask is not None and attention_mask.shape[-1] != k_len:
                # E.g. a LinearStateCache whose layer could not be found from the key tensor: the
                # mask covers earlier tokens these keys do not include. Never attend to part.
                raise ValueError(f"{where}: the attention mask covers {attention_mask.shape[-1]} keys but "
                                 f"{k_len} keys were passed")
            padding = _key_padding(where, attention_mask, q_len, k_len, causal)
        if module.training:  # whole keys, as linattn's linear methods drop them
            value, _ = _drop_keys(value, dropout)
        if state_layer is not None:
            out = state_layer.attend(query, key, value, padding, feature_map)
        elif causal and q_len != k_len:
            # Queries continue a sequence whose earlier keys the cache holds: run the earlier keys
            # into a state first, then the new tokens from it.
            past = k_len - q_len
            past_padding = None if padding is None else padding[:, :past]
            _, state = linear_attention(
                key[:, :, :past], key[:, :, :past], value[:, :, :past], causal=True, feature_map=feature_map,
                key_padding_mask=past_padding, output_final_state=True)
            out = linear_attention(query, key[:, :, past:], value[:, :, past:], causal=True, feature_map=feature_map,
                                   key_padding_mask=None if padding is None else padding[:, past:], initial_state=state)
        else:
            out = linear_attention(query, key, value, causal=causal, feature_map=feature_map, key_padding_mask=padding)
        return out.transpose(1, 2).contiguous(), None

    return forward


def register() -> None:
    """Registers linattn's attention functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("linattn.hf.register needs transformers (pip install transformers)") from error
    for name, feature_map in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _attention(feature_map))
        AttentionMaskInterface.register(name, sdpa_mask)
    _registered = True


@functools.cache  # one class, made on first use (transformers is imported only then)
def _state_layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class LinearStateLayer(CacheLayerMixin):
        """One layer's recurrent state (S, z) in place of its keys and values."""

        is_sliding = False

        def __init__(self, **kwargs):
            super().__init__()
            self.state = None
            self.seen = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            # The attention function finds this layer through the tensors it is handed.
            key_states = key_states.view_as(key_states)
            key_states._linattn_state_layer = self
            return key_states, value_states

        def attend(self, query, key, value, padding, feature_map):
            out, self.state = linear_attention(
                query, key, value, causal=True, feature_map=feature_map, key_padding_mask=padding,
                initial_state=self.state, output_final_state=True)
            self.seen += key.shape[2]
            return out

        def get_mask_sizes(self, query_length: int):
            return self.seen + query_length, 0

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return -1

        def offload(self):
            pass

        def prefetch(self):
            pass

        def reset(self) -> None:
            self.state, self.seen = None, 0

        def reorder_cache(self, beam_idx) -> None:
            if self.state is not None:
                self.state = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self.state)

    return LinearStateLayer


def LinearStateCache():  # noqa: N802  (a factory that reads like the class it returns)
    """A transformers Cache holding each layer's linear-attention state instead of its keys and
    values: pass it as `past_key_values=` to `model(...)` or `model.generate(...)` of a model
    running attn_implementation="linattn_linear" (or _relu)."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_state_layer_class())
