"""LinearizedAttention: the student that replaces one softmax attention layer of a pretrained model
(docs/methods.md §10), and the layer's exact softmax as its teacher, on the same q, k, v.

Student, per head, with learned feature maps φ_q, φ_k (linattn.nn.learned_feature_maps):
- "linear": y_i = Σ_j φ_q(q_i)·φ_k(k_j) v_j / Σ_j φ_q(q_i)·φ_k(k_j)  (the fused linear kernel);
- "hybrid" (LoLCATs-style): exact softmax over the keys of a sliding window plus global tokens
  (the restricted-softmax kernel), normalised to a mass of 1, and the linear term over every
  other key, under one normaliser:
      y_i = (y_window,i + γ Σ_{j∉E(i)} φ_q(q_i)·φ_k(k_j) v_j) / (1 + γ Σ_{j∉E(i)} φ_q(q_i)·φ_k(k_j)),
  E(i) the keys row i attends exactly, γ a learned per-head scale starting small. The sums over
  the other keys are the fused linear kernel's sums over all keys minus the window's (band_sums:
  query blocks against neighbouring key blocks, O(T·window)) and the global keys'. Global tokens
  (the first token, and with "first_last" each row's last real one: [CLS] and [SEP] in BERT) see
  every key and are seen by every query, exactly; a causal layer keeps only the first real token,
  as an attention sink. (The window's own mass Σ e^{s} is not used as
  its weight: the softmax-normalised features of Hedgehog are on another scale per query;
  measured on all-MiniLM-L6-v2, weighting by it learned 3x slower.) A layer with learned attention
  sinks (gpt-oss: a logit s_h per head that every row's softmax counts as one more key of value 0)
  keeps them in the teacher and in the hybrid's exact part: the sink's mass relative to the
  window's, e^{s_h − lse_i}, joins the normaliser, 1 + e^{s_h − lse_i} + γ Σ φφ.

- "deltanet" / "gated_deltanet" / "kda": the delta rule (docs/methods.md §11) on the learned features,
      S_t = (I − β_t k̂_t k̂_tᵀ) Diag(e^{g_t}) S_{t−1} + β_t k̂_t v_tᵀ,   y_i = S_iᵀ q̂_i   (causal; else S_T)
  with q̂, k̂ the L2-normalised φ_q(q), φ_k(k) and β_t (and the gate g_t ≤ 0: one per head, or for kda
  one per feature channel) learned from the head's key as linattn.nn.methods.delta does (a sigmoid
  and −e^A softplus of projections);
  read-out scale 1 (a stored key reads back ≈ β v, on the values' scale, as softmax's averages are).
  A padded key writes nothing and fades nothing (β = 0, g = 0).
- "gla": the "linear" student whose state fades channel by channel (GLA, docs/methods.md §1),
      y_i = Σ_{j<=i} Σ_c φ_q(q_i)_c φ_k(k_j)_c e^{b_ic − b_jc} v_j / (the same sum without v_j),
  b the cumulative per-channel log-gates g_t = logsigmoid(W_h k_t + b_h) / 16 learned from the head's
  key (linattn.nn.methods.kernelized.ChannelGates, one gate per feature channel, initially
  token-independent slow forgetting). Causal layers (decoders) only; a padded key writes and fades
  nothing.

Modes: "student" (the default after linearize), "teacher" (the exact softmax: the model as it
was), "transfer" (returns the teacher's output, so every layer sees the original activations, and
keeps the student's loss against it for linattn.attention_transfer).

Decoding (LinearizedAttention.decode): a causal student continues from a constant-size entry, the
linear (or gla) state (S, z), or the hybrid's kept keys (sink + last `window`) and the sums of the rest.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._validation import softcap_of
from ..delta_rule import delta_rule_attention
from ..functional import linear_attention
from ..ops import accumulate_dtype
from ..nn.decoding import _recurrent
from ..nn.learned_feature_maps import learned_feature_map
from ..window import with_sinks

# A model's own sliding window as flash-attn's (left, right) bounds, −1 = unbounded (the teacher's).
Window = Tuple[int, int]
NO_WINDOW: Window = (-1, -1)

# The students, by name: whether one attends a window (and global tokens) exactly.
EXACT_WINDOW = {"linear": False, "hybrid": True, "deltanet": False, "gated_deltanet": False, "kda": False,
                "gla": False}
DELTA_RULE = ("deltanet", "gated_deltanet", "kda")  # the students whose memory is the delta rule's state
CHANNEL_GATED = ("gla",)  # the linear students whose state fades channel by channel
METHODS = tuple(EXACT_WINDOW)
MODES = ("student", "teacher", "transfer")
LOSSES = ("output_mse", "attention_ce")
GLOBAL_TOKENS = (None, "first", "first_last")
LINEAR_EPS = 1e-6  # the "linear" student's normaliser guard, as linear_attention's default


class LinearizedAttention(nn.Module):
    """The learned part of one linearized attention layer; the projections stay the model's.

    Args:
        heads, head_dim: H and d of the layer's queries and keys.
        method: "linear", "hybrid", "deltanet", "gated_deltanet", "kda" or "gla" (causal layers only).
        feature_map: "hedgehog", "t2r", or a pair of modules (φ_q, φ_k) mapping (B, H, T, d) to
            positive features (B, H, T, m).
        window: the hybrid's exact window, keys with ``|i − j| <= window`` (causal: ``i − window <= j <= i``).
        global_tokens: the hybrid's exact global tokens: None, "first" or "first_last" (causal
            layers: the first real token alone, an attention sink).
        linear_scale: γ's initial value (per head, learned as log γ).
        softcap: the teacher's logit soft-capping (Gemma-2: scaled scores s become c·tanh(s / c));
            the teacher and the hybrid's exact softmax cap alike. None: none (linearize takes it
            from each transformers layer).
        sinks: whether the layer has attention sinks (gpt-oss; their (H,) logits come with each
            call, the model's own parameter): the teacher and the hybrid count them; the other
            students have no softmax to count them in.
    """

    def __init__(self, heads: int, head_dim: int, *, method: str = "hybrid", feature_map="hedgehog", window: int = 64,
                 global_tokens: Optional[str] = "first_last", linear_scale: float = 1e-2,
                 softcap: Optional[float] = None, sinks: bool = False):
        super().__init__()
        where = "linattn.linearize"
        self.softcap = softcap_of(where, softcap) or None
        if method not in METHODS:
            raise ValueError(f"{where}: method must be one of {METHODS}, got {method!r}")
        if sinks and not EXACT_WINDOW[method]:
            raise ValueError(f"{where}: a layer with attention sinks (gpt-oss) linearizes to the hybrid student, whose "
                             f"exact softmax counts them; the {method!r} student has none (method='hybrid')")
        self.sinks = bool(sinks)
        if global_tokens not in GLOBAL_TOKENS:
            raise ValueError(f"{where}: global_tokens must be one of {GLOBAL_TOKENS}, got {global_tokens!r}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(f"{where}: window must be an int >= 0, got {window!r}")
        if not (isinstance(linear_scale, (int, float)) and linear_scale > 0 and math.isfinite(linear_scale)):
            raise ValueError(f"{where}: linear_scale must be a finite number > 0, got {linear_scale!r}")
        if isinstance(feature_map, str):
            self.feature_map_q = learned_feature_map(feature_map, heads, head_dim)
            self.feature_map_k = learned_feature_map(feature_map, heads, head_dim)
        elif isinstance(feature_map, (tuple, list)) and len(feature_map) == 2 and all(
                isinstance(m, nn.Module) for m in feature_map):
            self.feature_map_q, self.feature_map_k = feature_map
        else:
            raise TypeError(f"{where}: feature_map must be 'hedgehog', 't2r' or a pair of modules (φ_q, φ_k), got "
                            f"{feature_map!r}")
        self.heads, self.head_dim, self.method = heads, head_dim, method
        self.exact_window = EXACT_WINDOW[method]
        self.window, self.global_tokens = window, global_tokens
        self.log_linear_scale = (nn.Parameter(torch.full((heads,), math.log(linear_scale))) if self.exact_window
                                 else None)
        self.delta_rule = None  # β (and the gate) of a delta-rule student, from the head's key
        with torch.no_grad():  # the feature dim m, whatever the feature maps are
            channels = self.feature_map_k(torch.zeros(1, heads, 1, head_dim)).shape[-1]
        if method in DELTA_RULE:  # the registered method of that name: its β (and gate) projections
            from ..nn.methods import METHODS as REGISTERED

            core = REGISTERED[method]
            self.delta_rule = core(heads, head_dim, channels=channels) if core.per_channel else core(heads, head_dim)
        self.gates = None  # the gla student's per-channel gates, one per feature channel, from the head's key
        if method in CHANNEL_GATED:
            from ..nn.methods.kernelized import ChannelGates

            self.gates = ChannelGates(heads, head_dim, channels)
        self.mode = "student"
        self.loss_kind = "output_mse"
        self.last_loss: Optional[torch.Tensor] = None

    @property
    def plain_linear(self) -> bool:
        """Whether the student is the "linear" one: no exact part, no delta rule, no gates."""
        return not self.exact_window and self.delta_rule is None and self.gates is None

    def extra_repr(self) -> str:
        window = f", window={self.window}, global_tokens={self.global_tokens!r}" if self.exact_window else ""
        cap = f", softcap={self.softcap:g}" if self.softcap else ""
        sinks = ", sinks=True" if self.sinks else ""
        return f"method={self.method!r}{window}{cap}{sinks}, mode={self.mode!r}"

    # --- the two attentions -------------------------------------------------------------------

    def teacher(self, q, k, v, scale: float, key_padding_mask: Optional[torch.Tensor], causal: bool,
                window: Window = NO_WINDOW, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's exact softmax attention (B, H, T_q, dv), in the model's own sliding `window`
        (flash-attn's (left, right) bounds, −1 = unbounded), counting the attention `sinks` (H,).
        A windowed, soft-capped or sinking one runs the restricted-softmax operator: SDPA cannot cap
        or sink, and a windowed row that sees no key (a padded query among padded keys) is 0 there,
        where SDPA's NaN would reach real rows of the next layer."""
        if self.softcap or window != NO_WINDOW or sinks is not None:
            pattern = ops.restricted.Pattern(window=window, causal=causal, key_padding_mask=key_padding_mask,
                                             softcap=self.softcap or 0.0)
            out, lse = ops.restricted.restricted_softmax(q, k, v, scale, pattern)
            return out if sinks is None else with_sinks(out, lse, sinks)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(q, k, key_padding_mask, causal),
                                              scale=scale)

    def student(self, q, k, v, scale: float, key_padding_mask: Optional[torch.Tensor], causal: bool,
                initial_sums: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The linearized attention (B, H, T_q, dv). initial_sums (hybrid, causal; decoding):
        [Σ φ_k(k) vᵀ | Σ φ_k(k)] (B, H, m, dv + 1) of earlier keys that no query attends exactly.
        sinks: the layer's attention-sink logits (H,) (a sinking layer's hybrid)."""
        phi_q, phi_k = self.feature_map_q(q), self.feature_map_k(k)
        if self.delta_rule is not None:
            self._same_length(q, k)
            return self._delta_rule(phi_q, phi_k, k, v, key_padding_mask, causal)
        if self.gates is not None:
            return self._gated(phi_q, phi_k, k, v, key_padding_mask, causal)
        if not self.exact_window:
            return linear_attention(phi_q, phi_k, v, causal=causal, feature_map=None, eps=LINEAR_EPS,
                                    key_padding_mask=key_padding_mask)
        self._same_length(q, k)
        pattern, global_keys = self._window_pattern(q, k, key_padding_mask, causal)
        y_window, lse = ops.restricted.restricted_softmax(q, k, v, scale, pattern)
        if causal and global_keys is not None:
            # The kernel's window (w, 0) is causal by itself, but its global row sees every key: the
            # sink's own row attends to itself alone (every key before it is padding).
            own_row = pattern.global_mask[:, None, :]
            y_window = torch.where(own_row[..., None], v, y_window)
            if sinks is not None:  # that row's lse is its own score
                own = ops.restricted.soft_capped((q * k).sum(-1) * scale, self.softcap)
                lse = torch.where(own_row, own.to(lse.dtype), lse)
        # [Σ φφ v | Σ φφ] over every key in one unnormalised call, minus the same sums over the keys
        # the window attends exactly: what the linear term covers is everything else.
        values = _with_ones(v)
        initial_state = None
        if initial_sums is not None:  # z is unused: the ones column of `values` carries the normaliser
            initial_state = (initial_sums, initial_sums.new_zeros(initial_sums.shape[:-1]))
        sums = linear_attention(phi_q, phi_k, values, causal=causal, feature_map=None, normalize=False,
                                key_padding_mask=key_padding_mask, initial_state=initial_state)
        sums = sums.to(v.dtype)
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        sums = sums - band_sums(phi_q, phi_k, values, self.window, causal)
        if global_keys is not None:
            sums = sums - _global_key_sums(phi_q, phi_k, values, global_keys, self.window, causal)
            # A global row attends to every key exactly: no linear term.
            sums = sums.masked_fill(pattern.global_mask[:, None, :, None], 0.0)
        has_window = ~torch.isinf(lse)[..., None]
        return self._mix(y_window, sums, has_window, _sink_mass(sinks, lse[..., None], has_window))

    def _same_length(self, q, k) -> None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"linattn.linearize: the {self.method} student attends a whole sequence at once (as many "
                             f"queries as keys), got {q.shape[2]} queries and {k.shape[2]} keys (decoding: "
                             "LinearizedAttention.decode)")

    def _delta_rule(self, phi_q, phi_k, k, v, key_padding_mask, causal, initial_state=None, output_final_state=False):
        """The delta-rule student on the features (β and the gate from the raw keys k)."""
        beta, gate = self.delta_rule.beta_and_gate(k, key_padding_mask)  # a padded key writes and fades nothing
        return delta_rule_attention(phi_q, phi_k, v, beta, gate=gate, causal=causal, scale=self.delta_rule.scale,
                                    initial_state=initial_state, output_final_state=output_final_state)

    def _gated(self, phi_q, phi_k, k, v, key_padding_mask, causal):
        """The gla student on the features (the gates from the raw keys k; a padded key fades nothing)."""
        if not causal:
            raise ValueError("linattn.linearize: the gla student's gates fade a state in time, so it linearizes "
                             "causal layers (decoders) only; for a bidirectional layer use method='hybrid', "
                             "'linear' or 'deltanet'")
        self._same_length(phi_q, phi_k)
        return linear_attention(phi_q, phi_k, v, causal=True, feature_map=None, eps=LINEAR_EPS,
                                key_padding_mask=key_padding_mask, gate=self.gates(k, key_padding_mask))

    def _mix(self, y_window, sums, has_window=None, sink_mass=None) -> torch.Tensor:
        """The hybrid's output from the exact part y_window (normalised to mass 1) and the linear
        sums [Σ φφ v | Σ φφ] over the other keys (None: no key outside the exact part), under one
        normaliser. has_window (…, 1) bool: the rows that see a key exactly (None: every row); a row
        that sees none has the linear term alone. sink_mass (…, 1): the attention sink's mass
        relative to the window's (_sink_mass), or None."""
        if sums is None:
            sums = y_window.new_zeros(*y_window.shape[:-1], y_window.shape[-1] + 1)
        numerator, z = sums[..., :-1], sums[..., -1:].clamp_min(0)
        gamma = self.log_linear_scale.exp().to(y_window.dtype)[None, :, None, None]
        extra = gamma * z if sink_mass is None else gamma * z + sink_mass.to(y_window.dtype)
        if has_window is None:  # the denominator is at least 1
            return (y_window + gamma * numerator) / (1 + extra)
        denominator = has_window.to(y_window.dtype) + extra
        out = (torch.where(has_window, y_window, 0.0) + gamma * numerator) / denominator.clamp_min(
            torch.finfo(y_window.dtype).tiny)
        return torch.where(denominator > 0, out, 0.0)

    def _window_pattern(self, q, k, key_padding_mask, causal):
        """The exact part's Pattern, and the global keys (B, 2) (first, last real) or None. In a
        causal layer the first real token alone is global: an attention sink every query sees
        exactly (StreamingLLM), while a later token would be a future key to most rows."""
        global_mask = global_keys = None
        if self.global_tokens is not None and q.shape[2] == k.shape[2] and k.shape[2] > 0:
            batch = torch.arange(k.shape[0], device=k.device)
            first = torch.zeros(k.shape[0], dtype=torch.long, device=k.device)
            if key_padding_mask is not None:  # left padding: the first real key
                first = (~key_padding_mask).to(torch.uint8).argmax(1)
            last = first
            if self.global_tokens == "first_last" and not causal:
                last = torch.full_like(first, k.shape[2] - 1)
                if key_padding_mask is not None:  # the last real key, whichever side the padding is on
                    last = last - (~key_padding_mask).flip(1).to(torch.uint8).argmax(1)
            global_mask = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
            global_mask[batch, first] = True
            global_mask[batch, last] = True
            global_keys = torch.stack([first, last], 1)
        # With a sink, "causal" is the window (w, 0) (the kernel takes global tokens only without it).
        pattern = ops.restricted.Pattern(window=(self.window, 0 if causal else self.window),
                                         causal=causal and global_mask is None, global_mask=global_mask,
                                         key_padding_mask=key_padding_mask, softcap=self.softcap or 0.0)
        return pattern, global_keys

    def decode(self, q, k, v, scale: float, entry: Optional[dict], sinks: Optional[torch.Tensor] = None):
        """Causal incremental decoding of the student: (out (B, H, n, dv), entry) for n new tokens
        after the `entry["length"]` tokens the entry has seen (entry None: none yet; the returned
        entry counts the new ones), equal to what
        the whole sequence gives its last n rows. Constant-size: "linear" and "gla" keep the recurrent
        state (S, z), the delta-rule students their state S; "hybrid" keeps the keys some later query
        still attends exactly (the sink and the last `window`) and [Σ φ_k(k) vᵀ | Σ φ_k(k)] of
        every other key seen."""
        if self.mode != "student":
            raise ValueError(f"linattn.linearize: incremental decoding runs the student; this layer is in mode "
                             f"{self.mode!r} (linattn.conversion.set_mode(model, 'student'))")
        seen = 0 if entry is None else entry["length"]
        if self.delta_rule is not None:  # the delta rule's state (B, H, m, dv)
            phi_q, phi_k = self.feature_map_q(q), self.feature_map_k(k)
            out, state = self._delta_rule(phi_q, phi_k, k, v, None, True, None if entry is None else entry["state"],
                                          output_final_state=True)
            return out, {"state": state, "length": seen + q.shape[2]}
        if not self.exact_window:  # linear or gla: the state (S, z) (gla's faded channel by channel): one
            # token takes the step, a chunk the operator
            gate = None if self.gates is None else self.gates(k)
            out, state = _recurrent(self.feature_map_q(q), self.feature_map_k(k), v,
                                    None if entry is None else entry["state"], None, LINEAR_EPS, gate)
            return out, {"state": state, "length": seen + q.shape[2]}
        n = q.shape[2]
        sink = self.global_tokens is not None
        # The sequence this call attends: the kept keys (positions `kept`), then the new ones.
        kept = ([0] if sink and seen > 0 else []) + list(range(max(int(sink), seen - self.window), seen))
        keys = k if entry is None else torch.cat([entry["k"], k], dim=2)
        values = v if entry is None else torch.cat([entry["v"], v], dim=2)
        sums = None if entry is None else entry["sums"]
        if n == 1:  # every kept key is in the new row's window (or the sink): plain softmax over them
            sink_mass = None
            if self.softcap or sinks is not None:
                scores = ops.restricted.soft_capped(q @ keys.transpose(-1, -2) * scale, self.softcap)
                out = torch.softmax(scores, -1) @ values
                sink_mass = _sink_mass(sinks, torch.logsumexp(scores, -1, keepdim=True))
            else:
                out = F.scaled_dot_product_attention(q, keys, values, scale=scale)
            if sums is not None or sink_mass is not None:
                linear = None if sums is None else (self.feature_map_q(q).to(sums.dtype) @ sums).to(v.dtype)
                out = self._mix(out, linear, sink_mass=sink_mass)
        else:  # a chunk: the full-sequence student over kept + new, from the sums; its last n rows
            queries = torch.cat([q.new_zeros(*q.shape[:2], len(kept), q.shape[3]), q], dim=2)
            out = self.student(queries, keys, values, scale, None, True, initial_sums=sums,
                               sinks=sinks)[:, :, len(kept):]
        # Keys leaving every later window (all but the sink and the last `window`) go into the sums.
        total = seen + n
        stays = [(p == 0 and sink) or p >= total - self.window for p in kept + list(range(seen, total))]
        staying = [i for i, stay in enumerate(stays) if stay]
        leaving = [i for i, stay in enumerate(stays) if not stay]
        if leaving:
            start, stop = leaving[0], leaving[-1] + 1  # contiguous: after the sink, before the window
            acc = accumulate_dtype(v.dtype)
            phi_k = self.feature_map_k(keys[:, :, start:stop]).to(acc)
            added = phi_k.transpose(-1, -2) @ _with_ones(values[:, :, start:stop]).to(acc)
            sums = added if sums is None else sums + added
        index = torch.tensor(staying, dtype=torch.long, device=k.device)
        return out, {"k": keys.index_select(2, index), "v": values.index_select(2, index), "sums": sums,
                     "length": total}

    def student_weights(self, q, k, scale: float, key_padding_mask: Optional[torch.Tensor], causal: bool,
                        sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The student's attention weights (B, H, T_q, T_k), dense (for the attention_ce loss and
        inspection: O(T²) memory; a delta-rule student's implicit matrix, out = weights @ v, whose
        rows need not be positive or sum to 1; with sinks, the sink's share is left out)."""
        if self.delta_rule is not None or self.gates is not None:
            # The output is linear in v (the gla normaliser does not read it): the identity as values gives the matrix.
            self._same_length(q, k)
            identity = torch.eye(k.shape[2], device=q.device, dtype=q.dtype).expand(*k.shape[:2], -1, -1)
            run = self._delta_rule if self.delta_rule is not None else self._gated
            return run(self.feature_map_q(q), self.feature_map_k(k), k, identity, key_padding_mask, causal)
        visible = _dense_mask(q, k, key_padding_mask, causal)
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device) if visible is None else visible
        kernel = (self.feature_map_q(q) @ self.feature_map_k(k).transpose(-1, -2)) * visible
        z = kernel.sum(-1, keepdim=True)
        if not self.exact_window:
            return kernel / (z + LINEAR_EPS)
        pattern, _ = self._window_pattern(q, k, key_padding_mask, causal)
        exact = pattern.dense_mask(q.shape[2], k.shape[2], q.device)
        if causal:  # the sink's row (see student)
            exact = exact & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = ops.restricted.soft_capped((q @ k.transpose(-1, -2)) * scale, self.softcap)
        scores = scores.masked_fill(~exact, float("-inf"))
        lse = torch.logsumexp(scores, -1, keepdim=True)
        has_window = ~torch.isinf(lse)
        window_weights = torch.exp(scores - torch.where(has_window, lse, 0)).masked_fill(~exact, 0)
        outside = kernel.masked_fill(exact, 0)
        gamma = self.log_linear_scale.exp().to(kernel.dtype)[None, :, None, None]
        denominator = has_window.to(kernel.dtype) + gamma * outside.sum(-1, keepdim=True)
        sink_mass = _sink_mass(sinks, lse, has_window)
        if sink_mass is not None:
            denominator = denominator + sink_mass.to(kernel.dtype)
        return (window_weights + gamma * outside) / denominator.clamp_min(torch.finfo(kernel.dtype).tiny)

    def attention_weights(self, q, k, scale: float, key_padding_mask: Optional[torch.Tensor], causal: bool,
                          window: Window = NO_WINDOW, sinks: Optional[torch.Tensor] = None):
        """The weights the current mode applies (B, H, T_q, T_k): the student's, or the softmax's."""
        if self.mode == "student":
            return self.student_weights(q, k, scale, key_padding_mask, causal, sinks)
        return _softmax_weights(q, k, scale, key_padding_mask, causal, self.softcap, window, sinks)

    # --- what the model calls -----------------------------------------------------------------

    def forward(self, q, k, v, scale: float, key_padding_mask: Optional[torch.Tensor] = None,
                causal: bool = False, window: Window = NO_WINDOW, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The current mode's attention. `window`: the model's own sliding window, which the
        teacher honours; the students attend every key (they learn to match the windowed teacher).
        `sinks`: the attention-sink logits (H,) of a layer built with sinks=True (required there)."""
        if (sinks is not None) != self.sinks:
            raise ValueError(f"linattn.linearize: this layer was linearized {'with' if self.sinks else 'without'} "
                             f"attention sinks, but the call {'passes none' if self.sinks else 'passes sink logits'}")
        if self.mode == "student":
            return self.student(q, k, v, scale, key_padding_mask, causal, sinks=sinks)
        with torch.no_grad():
            target = self.teacher(q, k, v, scale, key_padding_mask, causal, window, sinks)
        if self.mode == "transfer":
            self.last_loss = self._loss(q, k, v, target, scale, key_padding_mask, causal, window, sinks)
        return target

    def _loss(self, q, k, v, target, scale, key_padding_mask, causal, window, sinks=None) -> torch.Tensor:
        rows = _real_queries(q, key_padding_mask)  # (B, 1, T_q, 1) or None: padded queries are left out
        if self.loss_kind == "output_mse":
            error = (self.student(q, k, v, scale, key_padding_mask, causal, sinks=sinks).float() - target.float()) ** 2
        else:  # attention_ce: cross-entropy of the student's weights under the teacher's (the keys' shares)
            with torch.no_grad():
                teacher = _softmax_weights(q.float(), k.float(), scale, key_padding_mask, causal, self.softcap, window,
                                           sinks)
            weights = self.student_weights(q, k, scale, key_padding_mask, causal, sinks).float()
            error = -(teacher * torch.log(weights.clamp_min(1e-12))).sum(-1, keepdim=True)
        if rows is None:
            return error.mean()
        error = error * rows
        return error.sum() / (rows.sum() * error.shape[1] * error.shape[-1]).clamp_min(1)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """[v | 1]: values whose sums carry the normaliser in their last column."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _dense_mask(q, k, key_padding_mask, causal, window: Window = NO_WINDOW) -> Optional[torch.Tensor]:
    """SDPA's boolean mask (True = attend) for padding, causality and a sliding window (bottom-right
    aligned, flash-attn's bounds), or None."""
    mask = None
    if causal or window != NO_WINDOW:
        mask = ops.restricted.Pattern(window=window, causal=causal).dense_mask(q.shape[2], k.shape[2], q.device)[0, 0]
    if key_padding_mask is not None:
        keys = ~key_padding_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def _softmax_weights(q, k, scale, key_padding_mask, causal, softcap=None, window: Window = NO_WINDOW,
                     sinks=None) -> torch.Tensor:
    """The teacher's attention weights (B, H, T_q, T_k), dense; a row that sees no key is 0. With
    attention sinks (H,), the keys' shares of a softmax that also counts the sink."""
    mask = _dense_mask(q, k, key_padding_mask, causal, window)
    scores = ops.restricted.soft_capped((q @ k.transpose(-1, -2)) * scale, softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, -1)
    if sinks is not None:
        weights = with_sinks(weights, torch.logsumexp(scores, -1), sinks)
    return weights if mask is None else torch.where(mask.any(-1, keepdim=True), weights, 0.0)


def _sink_mass(sinks: Optional[torch.Tensor], lse: torch.Tensor, has_window=None) -> Optional[torch.Tensor]:
    """e^{s_h − lse}: an attention sink's mass relative to a softmax's keys of logsumexp lse (…, 1),
    (B, H, ·, 1); 0 in rows without a key (has_window False); None without sinks."""
    if sinks is None:
        return None
    logits = sinks.to(lse.dtype).view(1, -1, 1, 1)
    if has_window is None:
        return torch.exp(logits - lse)
    # (lse −inf never reaches the exponential: its infinite mass would give NaN gradients through where)
    return torch.where(has_window, torch.exp(logits - torch.where(has_window, lse, 0.0)), 0.0)


def _real_queries(q, key_padding_mask) -> Optional[torch.Tensor]:
    if key_padding_mask is None or key_padding_mask.shape[1] != q.shape[2]:
        return None
    return (~key_padding_mask)[:, None, :, None].to(torch.float32)


def band_sums(phi_q: torch.Tensor, phi_k: torch.Tensor, values: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """Σ_j φ_q(q_i)·φ_k(k_j) values_j over the window's keys ``|i − j| <= window`` (causal:
    i − window <= j <= i), (B, H, T, C), T_q == T_k: query blocks of `window` rows against their
    own and neighbouring key blocks, O(T·window·(m + C)), never T×T."""
    B, H, T, m = phi_q.shape
    C = values.shape[-1]
    if T == 0:
        return values.new_zeros(B, H, 0, C)
    b = max(window, 1)
    n = -(-T // b)
    pad = n * b - T
    before, after = b, 0 if causal else b
    span = before + b + after
    q = F.pad(phi_q, (0, 0, 0, pad)).view(B, H, n, b, m)
    k = F.pad(phi_k, (0, 0, before, pad + after)).unfold(2, span, b)  # (B, H, n, m, span)
    v = F.pad(values, (0, 0, before, pad + after)).unfold(2, span, b)  # (B, H, n, C, span)
    offset = torch.arange(b, device=q.device)[:, None] - (torch.arange(span, device=q.device)[None, :] - before)
    band = (offset <= window) & (offset >= (0 if causal else -window))  # offset = i − j
    weights = (q @ k) * band.to(q.dtype)
    return (weights @ v.transpose(-1, -2)).reshape(B, H, n * b, C)[:, :, :T]


def _global_key_sums(phi_q, phi_k, values, global_keys, window, causal) -> torch.Tensor:
    """Σ over the global keys outside row i's window (each once; causal: before it) of
    φ_q(q_i)·φ_k(k_g) values_g."""
    B, H, T, m = phi_q.shape
    index = global_keys[:, None, :, None]
    k_g = phi_k.gather(2, index.expand(B, H, global_keys.shape[1], m))
    v_g = values.gather(2, index.expand(B, H, global_keys.shape[1], values.shape[-1]))
    rows = torch.arange(T, device=phi_q.device)[None, :, None]
    offset = rows - global_keys[:, None, :]  # (B, T, G)
    outside = offset > window if causal else offset.abs() > window
    unique = torch.ones_like(global_keys, dtype=torch.bool)
    unique[:, 1:] = global_keys[:, 1:] != global_keys[:, :1]
    weights = (phi_q @ k_g.transpose(-1, -2)) * (outside & unique[:, None, :])[:, None].to(phi_q.dtype)
    return weights @ v_g
