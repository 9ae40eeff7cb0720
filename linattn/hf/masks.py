"""What each query may see, from the masks transformers makes, in the form linattn's operators take:
causality, a (left, right) window and a key padding mask; never a T×T matrix when avoidable.

transformers describes a layer's mask by a mask function (causal, bidirectional, a sliding
window over one of them, or compositions for packed documents, image tokens ...) and asks the
registered mask interface to build it. `compact_mask` (registered for linattn's implementations)
recognises the plain patterns, and packed documents over them (transformers' packed-sequence
format: position_ids restarting inside a row), and returns only the (B, T_k) visible-keys mask
with the pattern attached; anything else falls back to sdpa's dense boolean mask, which `visibility` then checks
against the pattern it can honour, raising a ValueError when the mask holds another one.
"""
import inspect
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..ops.restricted import Pattern

PATTERN_ATTRIBUTE = "_linattn_pattern"


@dataclass(frozen=True)
class RecognisedMask:
    """The mask a recognised mask function describes, with transformers' position offsets; the
    attention turns its Visibility into linattn's own pattern (linattn.ops.restricted.Pattern, whose
    dense_mask `_dense_padding` checks dense masks against)."""

    causal: bool
    window: Tuple[int, int]  # flash-attn's (left, right), -1 = unbounded
    q_offset: int
    kv_offset: int
    documents: Optional[torch.Tensor] = None  # (B, T) document ids of packed rows, or None


@dataclass
class Visibility:
    causal: bool
    window: Tuple[int, int]
    padding: Optional[torch.Tensor]  # (B, keys) bool, True = padded
    keys: int  # how many of the passed keys a query can see: a static cache's unfilled tail is cut
    total_keys: int  # the sequence's keys so far (with a state cache, more than those passed)
    documents: Optional[torch.Tensor] = None  # (B, T): packed documents, each attending only to itself
    key_offset: int = 0  # the first passed key's position: > 0 when a sliding cache dropped earlier keys


def _closure(function, name):
    try:
        return inspect.getclosurevars(function).nonlocals.get(name)
    except (TypeError, ValueError):
        return None


def _pair(mask_function):
    """The two mask functions of an and_masks(first, second), or None."""
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = _closure(mask_function, "mask_functions")
    return parts if isinstance(parts, tuple) and len(parts) == 2 else None


def recognise(mask_function) -> Optional[Tuple[bool, Tuple[int, int]]]:
    """(causal, window) of the mask functions transformers builds for plain causal, bidirectional
    and sliding-window layers; None for anything else."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return True, (-1, 0)
    if mask_function is mu.bidirectional_mask_function:
        return False, (-1, -1)
    parts = _pair(mask_function)
    if parts is None:
        return None
    overlay, base = parts
    width = _closure(overlay, "sliding_window")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        return None
    name = getattr(overlay, "__qualname__", "")
    if name == "sliding_window_overlay.<locals>.inner_mask" and base is mu.causal_mask_function:
        return True, (width - 1, 0)  # kv > q − width
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask" and base is mu.bidirectional_mask_function:
        return False, (width, width)  # |q − kv| <= width
    return None


def recognise_packed(mask_function):
    """(causal, window, document ids (B, T)) when the mask function is transformers' packed-
    sequence wrapper around a recognised pattern, else None. Two layouts exist: newer transformers
    (5.23) ands the same-document test with the pattern on positions remapped to each document's
    own; older ones (5.17) and the pattern on the packed row's positions with the same-document
    test. Documents are contiguous and their positions count up by one (that is how transformers
    finds them), so both describe the same mask."""
    parts = _pair(mask_function)
    if parts is None:
        return None
    same_document = next((part for part in parts if getattr(part, "__qualname__", "")
                          == "packed_sequence_mask_function.<locals>.inner_mask"), None)
    if same_document is None:
        return None
    other = parts[1] if parts[0] is same_document else parts[0]
    if getattr(other, "__qualname__", "") == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        other = _closure(other, "mask_function")
    elif other is not parts[0]:
        return None  # the older layout puts the pattern first
    documents = _closure(same_document, "packed_sequence_mask")
    base = recognise(other)
    if base is None or not isinstance(documents, torch.Tensor):
        return None
    return (*base, documents)


def compact_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, device="cpu", **kwargs):
    """transformers' mask interface for linattn: the (B, kv_length) visible-keys mask carrying its
    RecognisedMask when the mask function is recognised, else sdpa's dense mask."""
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    if getattr(attention_mask, PATTERN_ATTRIBUTE, None) is not None:
        # Already made by this function (generate() prepares masks ahead of the model's forward,
        # which hands them back here): not a 2-D padding mask to interpret again.
        return attention_mask
    recognised, documents = recognise(mask_function), None
    packed = recognise_packed(mask_function) if recognised is None else None
    if packed is not None:
        recognised, documents = packed[:2], packed[2]
    if recognised is None:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         device=device, **kwargs)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        visible = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        visible = padding[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
    setattr(visible, PATTERN_ATTRIBUTE, RecognisedMask(*recognised, q_offset=int(q_offset), kv_offset=int(kv_offset),
                                                documents=documents))
    return visible


def _model_pattern(module, kwargs) -> Tuple[bool, Tuple[int, int]]:
    """Causality and window as the attention module declares them (no mask or a dense one)."""
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    width = kwargs.get("sliding_window")
    if width is None:
        return causal, ((-1, 0) if causal else (-1, -1))
    return causal, ((width - 1, 0) if causal else (width, width))


def _dense_padding(where, mask, q_len, k_len, causal, window) -> Optional[torch.Tensor]:
    """The (B, T_k) key padding mask (True = padded) that, with causality and the window, is
    exactly transformers' 4-D mask; raises when the mask holds another pattern."""
    visible = mask if mask.dtype == torch.bool else mask == 0
    visible = visible[:, 0]  # (B, T_q, T_k); the head dim is 1 in transformers' masks
    key_visible = visible.any(dim=1)
    pattern = Pattern(window=window).dense_mask(q_len, k_len, device=visible.device)[0, 0]  # bottom-right aligned
    expected = key_visible[:, None, :] & pattern
    # Rows of padded queries are left out: transformers may unmask them to avoid NaNs.
    query_real = key_visible[:, k_len - q_len:]
    if not bool(((visible == expected) | ~query_real[:, :, None]).all()):
        described = "key padding" + (" plus causality" if causal else "") + (" in a window" if window[0] >= 0 else "")
        raise ValueError(f"{where}: the attention mask is not {described}, which is all this implementation can "
                         "honour (packed-document, chunked or custom masks are not)")
    return None if bool(key_visible.all()) else ~key_visible


def visibility(where, module, mask, q_len, k_len, kwargs, state_cache: bool) -> Visibility:
    """Who sees whom, for q_len queries against the k_len keys passed (with a state cache: the
    new tokens only, the mask covering the whole sequence so far)."""
    pattern = getattr(mask, PATTERN_ATTRIBUTE, None) if mask is not None else None
    if pattern is not None:
        causal, window = pattern.causal, pattern.window
        total, keys, visible = mask.shape[1], k_len, mask
        if state_cache:
            visible = visible[:, -k_len:]
        else:
            if total != k_len:
                raise ValueError(f"{where}: the attention mask covers {total} keys but {k_len} keys were passed")
            end = pattern.q_offset + q_len - pattern.kv_offset  # one past the last query's key
            if causal and end < k_len:  # a static cache's slots after the last query: never seen
                keys, visible = end, visible[:, :end]
            elif end != k_len:
                raise ValueError(f"{where}: the queries end at key {end} of {k_len}; linattn aligns them with the "
                                 "last key")
        padding = None if bool(visible.all()) else ~visible
        if pattern.documents is not None and (state_cache or padding is not None or q_len != k_len):
            raise ValueError(f"{where}: packed documents need the whole rows at once, without padding or a cache")
        key_offset = 0 if state_cache else pattern.kv_offset
        return Visibility(causal, window, padding, keys, total, pattern.documents, key_offset)
    causal, window = _model_pattern(module, kwargs)
    if mask is None:
        return Visibility(causal, window, None, k_len, k_len)
    if mask.dim() != 4:
        raise ValueError(f"{where}: expected transformers' 4-D attention mask or linattn's own, got shape "
                         f"{tuple(mask.shape)}")
    total = mask.shape[-1]
    if state_cache:
        mask = mask[..., -k_len:]  # the new keys' columns
    elif total != k_len:
        # E.g. a LinearStateCache whose layer could not be found from the key tensor: the mask
        # covers earlier tokens these keys do not include. Never attend to part.
        raise ValueError(f"{where}: the attention mask covers {total} keys but {k_len} keys were passed")
    padding = _dense_padding(where, mask, q_len, k_len, causal, window)
    return Visibility(causal, window, padding, k_len, total)
