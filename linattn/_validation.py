"""Argument checks of the functional API, with messages that name the function, the argument,
what was expected and what was given. The C++ operators check again (they can be called
directly), but these run first and speak in the caller's terms."""
import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class ArgumentError(ValueError, AssertionError):
    """A bad argument value or shape. Also an AssertionError, which is what
    torch.nn.MultiheadAttention raises for the same mistakes, so callers that catch either keep
    working after the swap."""


class ArgumentTypeError(TypeError, AssertionError):
    """A bad argument type or dtype; also an AssertionError, as torch raises for bad mask dtypes."""


def shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_tensor(where: str, name: str, t, dim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{where}: {name} must be a {dim}-D tensor {layout}, got shape {shape(t)}")


def check_float_dtype(where: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}"
        )


def check_same_device_dtype(where: str, names: tuple, tensors: tuple) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(
                f"{where}: {first_name} and {name} must be on the same device, got {first.device} and {t.device}"
            )
        if t.dtype != first.dtype:
            raise TypeError(
                f"{where}: {first_name} and {name} must have the same dtype, got {first.dtype} and {t.dtype}"
            )


def check_fade(where: str, name: str, t, shape: tuple, layout: str, device) -> None:
    """A per-head or per-token float tensor — a decay or attention sinks (H,), a gate ((B, H) per
    step, (B, H, T) per sequence): float, that shape, on `device`."""
    check_tensor(where, name, t, len(shape), layout)
    check_float_dtype(where, name, t)
    if tuple(t.shape) != tuple(shape) or t.device != device:
        raise ValueError(f"{where}: {name} must have shape {tuple(shape)} {layout} on {device}, "
                         f"got {tuple(t.shape)} on {t.device}")


def shares_heads(heads: int, kv_heads: int) -> bool:
    """Whether kv_heads key/value heads can serve heads query heads (grouped-query attention)."""
    return kv_heads == heads or (kv_heads > 0 and heads % kv_heads == 0)


def check_qkv(where: str, q, k, v, causal: bool, grouped: bool = False) -> None:
    """q, k, v of shape (B, H, T, D); grouped: k and v may have H_kv heads, H_kv dividing H
    (grouped-query attention)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(where, name, t, 4, "(B, H_kv, T, D)" if grouped and name != "q" else "(B, H, T, D)")
    check_float_dtype(where, "q", q)
    check_same_device_dtype(where, ("q", "k", "v"), (q, k, v))
    if grouped:
        if q.shape[0] != k.shape[0] or k.shape[:2] != v.shape[:2]:
            raise ValueError(f"{where}: q, k and v must share the batch dim, and k and v the head dim, "
                             f"got q {shape(q)}, k {shape(k)} and v {shape(v)}")
        if not shares_heads(q.shape[1], k.shape[1]):
            raise ValueError(f"{where}: q's heads must be a multiple of k and v's (grouped-query attention), "
                             f"got q {shape(q)} and k {shape(k)}")
    elif q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"{where}: q, k and v must share batch and head dims (B, H), "
            f"got q {shape(q)}, k {shape(k)} and v {shape(v)}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{where}: q and k must have the same head dim, got q {shape(q)} and k {shape(k)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{where}: k and v must have the same length, got k {shape(k)} and v {shape(v)}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{where}: causal attention needs as many queries as keys, got q {shape(q)} and k {shape(k)}"
        )


def check_key_padding_mask(where: str, mask, k: torch.Tensor, name: str = "key_padding_mask",
                           meaning: str = "True = padded") -> None:
    """A (B, T_k) bool mask per key (key_padding_mask, or global_mask with its own name)."""
    if mask is None:
        return
    expected = (k.shape[0], k.shape[2])
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a bool tensor of shape (B, T_k) = {expected}, "
                        f"got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: {name} must be a bool tensor ({meaning}), got {mask.dtype}")
    if shape(mask) != expected:
        raise ValueError(f"{where}: {name} must have shape (B, T_k) = {expected}, got {shape(mask)}")
    if mask.device != k.device:
        raise ValueError(f"{where}: {name} must be on {k.device}, got {mask.device}")


def check_eps(where: str, eps) -> None:
    """eps > 0: it keeps the normalizer of a query that matches no key away from 0 / 0. (An eps
    below the accumulation dtype's range rounds to 0; a row whose normalizer is then exactly 0
    gets a zero output, see docs/methods.md §1.)"""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 < float(eps) < float("inf")):
        raise ValueError(f"{where}: eps must be a finite number > 0, got {eps!r}")


def scale_of(where: str, scale, q: torch.Tensor) -> float:
    """The score scale: D ** -0.5 for None (1 for D = 0), else a finite number, as given."""
    if scale is None:
        return q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{where}: scale must be a finite number or None, got {scale!r}")
    return scale


def sinks_checked(where: str, sinks, q: torch.Tensor) -> None:
    """Attention sinks: None, or (H,) float logits on q's device."""
    if sinks is not None:
        check_fade(where, "sinks", sinks, (q.shape[1],), "(H,) of per-head logits", q.device)


def softcap_of(where: str, softcap) -> float:
    """The restricted softmax's cap as the operator takes it: None is no capping (0.0); else a
    finite number > 0 (Gemma-2's logit soft-capping: scores become softcap·tanh(s / softcap))."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (0 < float(softcap) < float("inf")):
        raise ValueError(f"{where}: softcap must be a finite number > 0 or None, got {softcap!r}")
    return float(softcap)


def dropout_of(where: str, dropout_p) -> float:
    """Attention dropout's probability: a number in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= float(dropout_p) < 1:
        raise ValueError(f"{where}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def check_alibi_slopes(where: str, slopes, q: torch.Tensor) -> None:
    """ALiBi's slopes as flash-attn takes them: float32 (H,) or (B, H), on q's device."""
    if slopes is None:
        return
    if not isinstance(slopes, torch.Tensor) or slopes.dtype != torch.float32:
        got = f"{slopes.dtype} tensor" if isinstance(slopes, torch.Tensor) else type(slopes).__name__
        raise TypeError(f"{where}: alibi_slopes must be a float32 tensor, got {got}")
    B, H = q.shape[0], q.shape[1]
    if tuple(slopes.shape) not in ((H,), (B, H)):
        raise ValueError(f"{where}: alibi_slopes must have shape (H={H},) or (B={B}, H={H}), got {tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"{where}: alibi_slopes must be on {q.device}, got {slopes.device}")


def check_features(where: str, phi_q: torch.Tensor, phi_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    """A callable feature map must keep (B, H, T) and give q and k the same feature dim."""
    for name, phi, x in (("q", phi_q, q), ("k", phi_k, k)):
        if not isinstance(phi, torch.Tensor) or phi.dim() != 4 or phi.shape[:3] != x.shape[:3]:
            got = shape(phi) if isinstance(phi, torch.Tensor) else type(phi).__name__
            raise ValueError(
                f"{where}: feature_map({name}) must return a (B, H, T, m) tensor with {name}'s (B, H, T) = "
                f"{shape(x)[:3]}, got {got}"
            )
    if phi_q.shape[3] != phi_k.shape[3]:
        raise ValueError(
            f"{where}: feature_map must give q and k the same feature dim, got {shape(phi_q)} and {shape(phi_k)}"
        )
    check_float_dtype(where, "feature_map(q)", phi_q)
    check_same_device_dtype(where, ("feature_map(q)", "feature_map(k)"), (phi_q, phi_k))


def check_state(where: str, name: str, state, phi_k: torch.Tensor, v: torch.Tensor) -> None:
    """A recurrent state (S, z): S (B, H, m, dv) and z (B, H, m)."""
    batch, heads, _, m = phi_k.shape
    dv = v.shape[3]
    expected = ((batch, heads, m, dv), (batch, heads, m))
    if not (isinstance(state, (tuple, list)) and len(state) == 2 and all(isinstance(s, torch.Tensor) for s in state)):
        raise TypeError(f"{where}: {name} must be a tuple (S, z) of tensors with shapes {expected}, got {state!r:.80}")
    for part, t, exp in (("S", state[0], expected[0]), ("z", state[1], expected[1])):
        if shape(t) != exp:
            raise ValueError(f"{where}: {name} {part} must have shape {exp} (B, H, m{', dv' if part == 'S' else ''}), "
                             f"got {shape(t)}")
        if t.device != v.device:
            raise ValueError(f"{where}: {name} {part} must be on {v.device}, got {t.device}")
        check_float_dtype(where, f"{name} {part}", t)
