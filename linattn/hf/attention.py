"""The attention functions linattn registers with transformers' AttentionInterface.

Each takes transformers' arguments (module, query, key, value (B, H, T, D), attention_mask,
scaling, dropout, **kwargs) and returns (output (B, T, H, dv), None): these methods form no
attention weights to return.
"""
import math

import torch

from ..feature_maps import random_features
from ..functional import linear_attention, performer_attention
from ..nn.methods import _drop_keys
from ..window import sliding_window_attention
from .masks import visibility

PROJECTION_BUFFER = "linattn_projection"
PROJECTION_SEED = 0x11A77  # per-layer draws: the same projection every time a model is built


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, heads, T, D): each key/value head serves heads / H_kv query heads."""
    groups = heads // x.shape[1]
    if groups == 1:
        return x
    return x[:, :, None].expand(x.shape[0], x.shape[1], groups, *x.shape[2:]).reshape(x.shape[0], heads, *x.shape[2:])


def _where(module) -> str:
    return f"linattn.hf ({module.__class__.__name__})"


def _prepare(module, query, key, value, attention_mask, dropout, kwargs, shared_heads=False):
    """Shared by every method: heads repeated (unless shared_heads: the method reads grouped-query
    key/value heads in place), who sees whom, whole-key dropout in training (the kernelized
    methods'; one whose operator drops probabilities passes 0), and the state-cache layer when a
    LinearStateCache handed these keys over."""
    state_layer = getattr(key, "_linattn_state_layer", None)
    heads = query.shape[1]
    drops_keys = module.training and dropout > 0
    if not shared_heads or drops_keys:
        key, value = _repeat_heads(key, heads), _repeat_heads(value, heads)
    seen = visibility(_where(module), module, attention_mask, query.shape[2], key.shape[2], kwargs,
                      state_cache=state_layer is not None)
    key, value = key[:, :, :seen.keys], value[:, :, :seen.keys]
    if drops_keys:  # whole keys, as linattn's own modules drop them
        value, _ = _drop_keys(value, dropout)
    return key, value, seen, state_layer


def _as_packing(documents, *tensors):
    """Rows of packed documents (B, H or H_kv, T, ·) as one packing (1, same, B·T, ·) and its cu_seqlens:
    each document becomes one sequence of linattn's varlen operators (reads the boundaries on
    the host, as transformers' own detection of packed rows does)."""
    B, T = tensors[0].shape[0], tensors[0].shape[2]
    rows = torch.arange(B, device=documents.device)[:, None] * (T + 1)  # ids distinct across rows
    ids = (documents.to(torch.int64) + rows).flatten()
    starts = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    ends = torch.tensor([0, B * T], device=documents.device)
    cu_seqlens = torch.cat([ends[:1], starts, ends[1:]]).to(device=tensors[0].device, dtype=torch.int32)
    packed = [t.transpose(0, 1).reshape(1, t.shape[1], B * T, t.shape[3]) for t in tensors]
    return packed, cu_seqlens


def _unpack(out, batch):
    """(1, H, B·T, dv) -> (B, H, T, dv)."""
    return out.reshape(out.shape[1], batch, -1, out.shape[3]).transpose(0, 1)


def _window_binds(seen) -> bool:
    """Whether the layer's sliding window hides a key from a query in this call (a window at least
    as long as the sequence changes nothing)."""
    left, right = seen.window
    reach = seen.total_keys - 1  # the farthest any key can be from a query
    return (0 <= left < reach) or (not seen.causal and 0 <= right < reach)


def _reject_binding_window(where, seen):
    # A cache that dropped keys older than the window (a sliding layer's) binds the window as well.
    if _window_binds(seen) or seen.key_offset > 0:
        raise ValueError(f"{where}: this layer attends in a sliding window {seen.window}, which linear attention "
                         "cannot honour; use attn_implementation='linattn_local' for it")


def _kernelized(attend, window_rule=_reject_binding_window):
    """An attention function for a kernelized method, given attend(module, q, k, v, causal,
    key_padding_mask, initial_state=, output_final_state=, cu_seqlens=)."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        where = _where(module)
        key, value, seen, state_layer = _prepare(module, query, key, value, attention_mask, dropout, kwargs)
        window_rule(where, seen)
        q_len, k_len, padding = query.shape[2], key.shape[2], seen.padding
        if seen.documents is not None:
            (q, k, v), cu_seqlens = _as_packing(seen.documents, query, key, value)
            out = _unpack(attend(module, q, k, v, seen.causal, None, cu_seqlens=cu_seqlens), query.shape[0])
        elif state_layer is not None:
            out = state_layer.attend(lambda **state: attend(module, query, key, value, True, padding, **state))
        elif seen.causal and q_len != k_len:
            # Queries continue a sequence whose earlier keys the cache holds: run the earlier keys
            # into a state first, then the new tokens from it.
            past = k_len - q_len
            _, state = attend(module, key[:, :, :past], key[:, :, :past], value[:, :, :past], True,
                              None if padding is None else padding[:, :past], output_final_state=True)
            out = attend(module, query, key[:, :, past:], value[:, :, past:], True,
                         None if padding is None else padding[:, past:], initial_state=state)
        else:
            out = attend(module, query, key, value, seen.causal, padding)
        return out.transpose(1, 2).contiguous(), None

    return forward


def _linear(feature_map):
    def attend(module, q, k, v, causal, padding, initial_state=None, output_final_state=False, cu_seqlens=None):
        return linear_attention(q, k, v, causal=causal, feature_map=feature_map, key_padding_mask=padding,
                                initial_state=initial_state, output_final_state=output_final_state,
                                cu_seqlens=cu_seqlens)

    return attend


def projection(module, head_dim: int, device, dtype) -> torch.Tensor:
    """The module's FAVOR+ projection: drawn once per layer (⌈D·ln D⌉ orthogonal features, seeded
    by the layer index) and kept as a non-persistent buffer, so it follows .to() but leaves the
    model's state_dict as transformers saves and loads it."""
    current = getattr(module, PROJECTION_BUFFER, None)
    if current is None or current.shape[1] != head_dim:
        features = max(1, math.ceil(head_dim * math.log(head_dim))) if head_dim > 1 else 1
        layer = getattr(module, "layer_idx", 0) or 0
        generator = torch.Generator().manual_seed(PROJECTION_SEED + int(layer))
        current = random_features(features, head_dim, generator=generator, device=device, dtype=torch.float32)
        module.register_buffer(PROJECTION_BUFFER, current, persistent=False)
    return current.to(device)


def _performer(module, q, k, v, causal, padding, initial_state=None, output_final_state=False, cu_seqlens=None):
    # FAVOR+ estimates exp(q·k/√D); a model's own scaling other than 1/√D is folded into q.
    if cu_seqlens is not None:
        raise ValueError(f"{_where(module)}: linattn_performer does not take packed documents (position_ids "
                         "restarting inside a row); use linattn_linear or linattn_local, or pad the batch")
    w = projection(module, q.shape[3], q.device, q.dtype)
    return performer_attention(q, k, v, w, causal=causal, key_padding_mask=padding,
                               initial_state=initial_state, output_final_state=output_final_state)


def _performer_forward():
    kernelized = _kernelized(_performer)

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if scaling is not None:
            query = query * (scaling * math.sqrt(query.shape[3]))
        return kernelized(module, query, key, value, attention_mask, dropout=dropout, **kwargs)

    return forward


def local(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Exact softmax attention in the layer's own pattern (causal or not, its sliding window,
    key padding, gpt-oss's attention sinks `s_aux`, Gemma-2's logit soft-capping `softcap`) through
    linattn's fused window kernel: memory linear in the sequence; grouped-query key/value heads
    are read in place (the cache's heads, never repeated). Attention dropout in training drops
    each probability in the operator, as the models' eager attention does."""
    where = _where(module)
    key, value, seen, state_layer = _prepare(module, query, key, value, attention_mask, 0.0, kwargs,
                                             shared_heads=True)
    dropout_p = dropout if module.training else 0.0
    if state_layer is not None:
        raise ValueError(f"{where}: a LinearStateCache keeps linear-attention states; softmax attention "
                         "(linattn_local) needs transformers' key/value cache")
    if seen.documents is not None:
        (q, k, v), cu_seqlens = _as_packing(seen.documents, query, key, value)
        out = sliding_window_attention(q, k, v, seen.window, causal=seen.causal, scale=scaling, cu_seqlens=cu_seqlens,
                                       sinks=kwargs.get("s_aux"), softcap=kwargs.get("softcap"), dropout_p=dropout_p)
        out = _unpack(out, query.shape[0])
    else:
        out = sliding_window_attention(query, key, value, seen.window, causal=seen.causal,
                                       key_padding_mask=seen.padding, scale=scaling, sinks=kwargs.get("s_aux"),
                                       softcap=kwargs.get("softcap"), dropout_p=dropout_p)
    return out.transpose(1, 2).contiguous(), None


IMPLEMENTATIONS = {
    "linattn_linear": _kernelized(_linear("elu")),
    "linattn_linear_relu": _kernelized(_linear("relu")),
    "linattn_performer": _performer_forward(),
    "linattn_local": local,
}
