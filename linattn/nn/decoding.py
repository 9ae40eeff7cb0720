"""Incremental decoding for linattn.nn.MultiheadAttention: what each causal method keeps between
calls, so a decoder generates token by token with the results of running the whole prefix.

  - linear, performer: the recurrent state (S, z), (B, H, m, dv) and (B, H, m), whatever the
    context length (docs/methods.md §1, recurrent form);
  - local: a ring buffer of the last window + 1 keys and values;
  - hybrid: both;
  - softmax: a key/value cache that grows with the context (the baseline), with room reserved
    in doublings so that appending a token copies nothing;
  - forgetting: the same cache, and the log forget gates of the keys in it.
A call may bring one token (the decoding step) or many (a prompt, or a chunk of one): a chunk
runs through the method's causal kernel, starting from what the cache holds.

Buffers are written in place when autograd does not need their old contents (decoding under
torch.no_grad or inference_mode, the usual case); otherwise they are copied first, so a cache
can also carry gradients (truncated-BPTT style training).
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .. import functional
from ..ops import accumulate_dtype
from ..feature_maps import FEATURE_MAPS, favor_features
from ..window import window_bounds, with_sinks

def state_of(phi_visible: torch.Tensor, values: torch.Tensor):
    """The recurrent state (S, z) of keys every query sees, in the accumulation dtype."""
    acc = accumulate_dtype(values.dtype)
    phi, values = phi_visible.to(acc), values.to(acc)
    return phi.transpose(-1, -2) @ values, phi.sum(-2)


class DecodingCache:
    """What the attention layers of one model have seen so far, for incremental decoding.

    Make one per generated batch and pass it to every layer's forward (`cache=cache`); each
    linattn.nn.MultiheadAttention keeps its own entry in it. `reset()` starts a new sequence,
    `select(index)` keeps (and reorders) batch rows, as beam search needs, and `memory_bytes()`
    says how much the layers hold.
    """

    def __init__(self):
        self._layers: Dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self._layers)

    def layer(self, module) -> Optional[dict]:
        """The entry of one attention module, or None before its first call."""
        return self._layers.get(id(module))

    def set_layer(self, module, entry: dict) -> None:
        self._layers[id(module)] = entry

    def seen_tokens(self, module) -> int:
        """How many tokens `module` has attended to through this cache."""
        entry = self.layer(module)
        return 0 if entry is None else entry["length"]

    def reset(self) -> None:
        self._layers.clear()

    def memory_bytes(self) -> int:
        """Bytes of the tensors the cache holds (reserved key/value room included)."""
        return sum(t.numel() * t.element_size() for t in _tensors(self._layers))

    @torch.no_grad()
    def select(self, index: torch.Tensor) -> None:
        """Keeps the batch rows `index` (a 1-D int tensor), in that order, in every layer."""
        for key, entry in self._layers.items():
            self._layers[key] = map_tensors(entry, lambda t: t.index_select(0, index.to(t.device)))
            self._layers[key]["batch"] = index.numel()


def map_tensors(value, fn):
    """`value` (an entry: dicts, tuples and tensors) with fn applied to every tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(map_tensors(item, fn) for item in value)
    return value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (dict, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensors(item)


def _writable(buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The buffer itself when autograd does not need its old contents, else a copy to write into."""
    if torch.is_grad_enabled() and (buffer.requires_grad or new.requires_grad):
        return buffer.clone()
    return buffer


def decode(core, q, k, v, entry: Optional[dict], visible_kv, where: str):
    """(out (N, H, n, hd_v), new entry) for n new tokens q, k, v (N, H, n, hd) of the causal
    method `core`, given the layer's entry (None on the first call). visible_kv: (keys, values)
    every query sees (add_bias_kv / add_zero_attn), used on the first call only."""
    decoder = core.decoder
    if decoder is None:
        from .methods import METHODS

        decoding = [name for name, cls in METHODS.items() if cls.decoder is not None]
        raise ValueError(
            f"{where}: incremental decoding (cache=) supports the methods {decoding}, got "
            f"{core.name!r}" + ("" if core.supports_causal else " (a non-causal method)")
        )
    length = 0 if entry is None else entry["length"]
    out, entry = decoder(core, q, k, v, entry, visible_kv, where)
    entry["length"] = length + q.shape[2]
    return out, entry


# --- softmax: a key/value cache ---------------------------------------------------------------


def _append(entry, name: str, new: torch.Tensor, used: int) -> torch.Tensor:
    """Appends `new` (N, H, n, d) after `used` rows of the reserved buffer entry[name] (grown to
    twice the need when full); returns the filled part."""
    buffer = entry.get(name)
    need = used + new.shape[2]
    if buffer is None or buffer.shape[2] < need:
        grown = new.new_empty(*new.shape[:2], max(2 * need, 16), new.shape[3])
        if used:
            grown[:, :, :used] = buffer[:, :, :used]
        buffer = grown
    else:
        buffer = _writable(buffer, new)
    buffer[:, :, used:need] = new
    entry[name] = buffer
    return buffer[:, :, :need]


def decode_softmax(core, q, k, v, entry, visible_kv, where):
    entry = {} if entry is None else dict(entry)
    if "used" not in entry:
        entry["used"] = 0
        if visible_kv is not None:  # keys every query sees sit at the front of the cache
            _append(entry, "k", visible_kv[0], 0)
            _append(entry, "v", visible_kv[1], 0)
            entry["used"] = visible_kv[0].shape[2]
    used = entry["used"]
    keys, values = _append(entry, "k", k, used), _append(entry, "v", v, used)
    entry["used"] = used + k.shape[2]
    n, total = q.shape[2], keys.shape[2]
    mask = None
    if n > 1:  # bottom-right aligned causal mask: new query i sees every key up to its own
        positions = torch.arange(total, device=q.device)
        mask = positions[None, :] <= (total - n + torch.arange(n, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), entry


def decode_forgetting(core, q, k, v, entry, visible_kv, where):
    """The Forgetting Transformer (docs/methods.md §5.1): the keys, values and log forget gates seen so
    far (a cache that grows as softmax's does); the new queries, the last positions, attend to all of it."""
    from ..forgetting import forgetting_attention

    entry = {} if entry is None else dict(entry)
    used = entry.get("used", 0)
    keys, values = _append(entry, "k", k, used), _append(entry, "v", v, used)
    gates = _append(entry, "log_forget", core.log_forget(k).unsqueeze(-1), used).squeeze(-1)
    entry["used"] = used + k.shape[2]
    out = forgetting_attention(q, keys, values, gates, causal=True, window=core.window, softcap=core.softcap)
    return out, entry


# --- linear, gla and performer: the recurrent state -------------------------------------------


def _recurrent(q, k, v, state, feature_map, eps, gate=None):
    """Causal normalized linear attention from `state` (with log-gates `gate` (N, H, L[, m]) if
    given): (out, state). One token takes the recurrent step (O(m·dv)), a chunk the chunked kernel."""
    if q.shape[2] == 1:
        out, state = functional.linear_attention_step(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], state, feature_map=feature_map, eps=eps,
            gate=None if gate is None else gate[:, :, 0],
        )
        return out.unsqueeze(2), state
    return functional.linear_attention(
        q, k, v, causal=True, feature_map=feature_map, eps=eps, gate=gate, initial_state=state,
        output_final_state=True,
    )


def _initial_state(entry, phi_visible, visible_kv):
    if entry is not None:
        return entry["state"]
    return None if visible_kv is None else state_of(phi_visible, visible_kv[1])


def decode_linear(core, q, k, v, entry, visible_kv, where):
    phi = FEATURE_MAPS[core.feature_map]
    state = _initial_state(entry, None if visible_kv is None else phi(visible_kv[0]), visible_kv)
    out, state = _recurrent(q, k, v, state, core.feature_map, core.eps)
    return out, {"state": state}


def decode_gated_linear(core, q, k, v, entry, visible_kv, where):
    """GLA's state (S, z) with its per-channel gates (docs/methods.md §1), constant-size."""
    out, state = _recurrent(q, k, v, None if entry is None else entry["state"], core.feature_map, core.eps,
                            core.log_gates(k))
    return out, {"state": state}


def decode_performer(core, q, k, v, entry, visible_kv, where):
    def features(x, is_query):
        return favor_features(x, core.projection, is_query=is_query, kernel=core.kernel, causal=True)

    phi_visible = None if visible_kv is None else features(visible_kv[0], False)
    state = _initial_state(entry, phi_visible, visible_kv)
    phi_q, phi_k = features(q, True), features(k, False)
    out, state = _recurrent(phi_q, phi_k, v.to(phi_q.dtype), state, None, core.eps)
    return out.to(v.dtype), {"state": state}


# --- local: a ring buffer of the window -------------------------------------------------------


def decode_local(core, q, k, v, entry, visible_kv, where):
    return _attend_window(core, q, k, v, entry, 0 if entry is None else entry["length"], where)


def _attend_window(core, q, k, v, ring_entry, length, where):
    """Local attention of the new tokens over the ring buffer ring_entry ({"k", "v"}, or None) after
    `length` earlier tokens: (out, the updated ring)."""
    left, _ = window_bounds(where, core.window, causal=True)
    if left < 0:
        raise ValueError(f"{where}: incremental decoding of method 'local' needs a bounded window, got "
                         f"{core.window!r}; an unbounded causal window is softmax attention (method='softmax')")
    ring = left + 1  # the newest token and the `left` before it: all any later query can see
    entry = {} if ring_entry is None else dict(ring_entry)
    n = q.shape[2]
    if "k" not in entry:
        entry["k"] = k.new_zeros(*k.shape[:2], ring, k.shape[3])
        entry["v"] = v.new_zeros(*v.shape[:2], ring, v.shape[3])
    if n == 1 and core.dilation == 1:
        # One token: write it, then attend to every filled slot (softmax does not care about order).
        # The slot is a tensor, so a compiled step does not specialise on it (one graph per slot).
        slot = (torch.arange(1, device=k.device) + length) % ring
        keys = entry["k"] = _writable(entry["k"], k).index_copy_(2, slot, k)
        values = entry["v"] = _writable(entry["v"], v).index_copy_(2, slot, v)
        filled = min(length + 1, ring)
        if core.sinks is None and not core.softcap:
            return F.scaled_dot_product_attention(q, keys[:, :, :filled], values[:, :, :filled]), entry
        # Sinks or a cap: the row's softmax (and its logsumexp, the sink's share) from one product of scores.
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = core.scores(q.to(acc), keys[:, :, :filled].to(acc))
        out = torch.softmax(scores, -1) @ values[:, :, :filled].to(acc)
        if core.sinks is not None:
            out = with_sinks(out, scores.logsumexp(-1), core.sinks)
        return out.to(q.dtype), entry
    # A chunk (or dilation): the past keys in order, then the window kernel, bottom-right aligned.
    past = min(length, left)
    order = (torch.arange(length - past, length, device=k.device) % ring)
    keys = torch.cat([entry["k"].index_select(2, order), k], dim=2)
    values = torch.cat([entry["v"].index_select(2, order), v], dim=2)
    out = functional.sliding_window_attention(q, keys, values, (left, 0), causal=True, dilation=core.dilation,
                                              sinks=core.sinks, softcap=core.softcap)
    kept = min(n, ring)
    slots = torch.arange(length + n - kept, length + n, device=k.device) % ring
    entry["k"] = _writable(entry["k"], k).index_copy_(2, slots, k[:, :, n - kept:])
    entry["v"] = _writable(entry["v"], v).index_copy_(2, slots, v[:, :, n - kept:])
    return out, entry


def decode_hybrid(core, q, k, v, entry, visible_kv, where):
    entry = {} if entry is None else entry
    linear_out, linear_entry = decode_linear(core.linear, q, k, v, entry.get("linear"), None, where)
    local_out, local_entry = _attend_window(core.local, q, k, v, entry.get("local"), entry.get("length", 0), where)
    g = torch.sigmoid(core.gate).to(linear_out.dtype)[None, :, None, None]
    out = g * linear_out + (1 - g) * local_out.to(linear_out.dtype)
    return out, {"linear": linear_entry, "local": local_entry}


# --- deltanet, gated_deltanet: the delta rule's state ------------------------------------------


def decode_delta_rule(core, q, k, v, entry, visible_kv, where):
    """The state S (N, H, hd, hd_v) of the delta rule (docs/methods.md §11), constant-size: one
    token takes delta_rule_step, a chunk the chunkwise kernel from the state."""
    from ..delta_rule import delta_rule_attention, delta_rule_step

    beta, gate = core.beta_and_gate(k)
    state = None if entry is None else entry["state"]
    if q.shape[2] == 1:
        out, state = delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], state,
                                     gate=None if gate is None else gate[:, :, 0], scale=core.scale)
        return out.unsqueeze(2), {"state": state}
    out, state = delta_rule_attention(q, k, v, beta, gate=gate, initial_state=state, output_final_state=True,
                                      scale=core.scale)
    return out, {"state": state}


# --- linearized (linattn.linearize): the student's own decoding -------------------------------


def decode_linearized(core, q, k, v, entry, visible_kv, where):
    """The linearized student (docs/methods.md §10): the linear state, or the hybrid's kept keys and
    sums (LinearizedAttention.decode)."""
    scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    return core.layer.decode(q, k, v, scale, entry)
