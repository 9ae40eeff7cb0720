"""linattn.nn.MultiheadAttention: torch.nn.MultiheadAttention with a choice of attention method."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import ArgumentError, ArgumentTypeError
from .masks import is_causal_mask, key_padding_as_bool
from .decoding import DecodingCache, decode
from .methods import build_method, methods_summary


def _keep_torch_fast_paths_off(module, args):
    """A forward pre-hook that does nothing. nn.TransformerEncoderLayer skips its fused inference
    path (torch._transformer_encoder_layer_fwd, which reads in_proj_weight and computes softmax
    attention itself) whenever a submodule has hooks; without this, an eval-mode encoder layer
    would never call this module."""
    return None


class MultiheadAttention(nn.MultiheadAttention):
    """A drop-in for torch.nn.MultiheadAttention whose attention is `method`.

    Same constructor, forward signature, parameters and state_dict keys as torch's module (it is
    a subclass), so a state_dict loads in either direction; methods with tensors of their own
    (Linformer's E/F, Performer's projection) add them under `core.` — load torch's state_dict
    into one with strict=True and those keep their initial values; load one's into torch's with
    strict=False.

    method: one of the methods below; method_options go to the method (see linattn.nn.methods,
    e.g. feature_map="relu", nb_features=256, max_seq_len=1024). The methods other than softmax
    accept key padding and causal masks only; efficient and linformer are non-causal only.
    need_weights=True returns the
    attention matrix the method applies implicitly (out = weights @ v), computed only when asked,
    in O(L·S) memory. The meaning of dropout per method is in linattn.nn.methods.

    Methods:
    {methods}
    """

    def __init__(
        self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
        kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, method="linear", **method_options,
    ):
        super().__init__(
            embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device, dtype=dtype,
        )
        self.method = method
        self.core = build_method(
            method, num_heads=num_heads, head_dim=self.head_dim, device=device, dtype=dtype, **method_options
        )
        self.register_forward_pre_hook(_keep_torch_fast_paths_off)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first: say what to use instead of
        # failing deep inside TorchScript's compiler.
        raise RuntimeError(
            f"linattn.nn.MultiheadAttention(method={self.method!r}) cannot be compiled with torch.jit.script "
            "(TorchScript does not support its custom operators and method modules); use "
            "torch.compile(model) or torch.export.export(model, ...) instead"
        )

    def reset_parameters(self) -> None:
        """Re-initialises the weights as torch's module does, and the method's own tensors
        (Performer's projection, Linformer's E/F): what FSDP-style meta-device init calls after
        to_empty()."""
        self._reset_parameters()
        if hasattr(self.core, "reset_parameters"):
            self.core.reset_parameters()

    def extra_repr(self) -> str:
        return f"method={self.method!r}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, method="linear", **method_options) -> "MultiheadAttention":
        """A linattn module with the configuration and weights of a torch.nn.MultiheadAttention."""
        weight = module.out_proj.weight
        new = cls(
            module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
            vdim=module.vdim, batch_first=module.batch_first, device=weight.device, dtype=weight.dtype,
            method=method, **method_options,
        )
        new.load_state_dict(module.state_dict())  # strict: every torch key must land
        new.train(module.training)
        return new

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False,
        global_mask: Optional[torch.Tensor] = None, cache: Optional[DecodingCache] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """torch.nn.MultiheadAttention's forward; global_mask (N, L) bool marks Longformer's
        global tokens (method="longformer" only; default: its global_tokens option).

        cache: a linattn.nn.DecodingCache for incremental (token by token) causal decoding: the
        new tokens (one or many) attend causally to themselves and to every token this module
        saw through the cache before, with the results of running the whole sequence at once.
        Methods softmax (a growing key/value cache), linear, gla, performer, deltanet and
        gated_deltanet (a constant-size state), local (the window's keys) and hybrid; self-attention without masks,
        and need_weights=False."""
        where = f"linattn.nn.MultiheadAttention(method={self.method!r})"
        if cache is not None:
            return self._forward_cached(where, query, key, value, key_padding_mask, need_weights, attn_mask, cache)
        if global_mask is not None and not self.core.takes_global_tokens:
            raise ArgumentError(f"{where}: global_mask is only for method='longformer'")
        if torch.compiler.is_compiling() and not (is_causal is True or is_causal is False):
            # nn.TransformerEncoder(Layer) derives is_causal from the mask's values when it is not
            # given; a compiled graph cannot branch on that.
            raise ArgumentError(
                f"{where}: under torch.compile, is_causal was computed from the mask's values (nn.TransformerEncoder "
                "does that when is_causal is not given); pass is_causal=True (or False) explicitly with the mask, "
                "e.g. encoder(x, mask=causal_mask, is_causal=True)"
            )
        if any(t.is_nested for t in (query, key, value)):
            return self._forward_nested(
                where, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        batched = _check_ranks(where, query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            # Self-attention keeps query is key is value, so that _project runs one GEMM.
            self_attention = query is key and key is value
            query = query.transpose(0, 1)
            key, value = (query, query) if self_attention else (key.transpose(0, 1), value.transpose(0, 1))
        # From here on (L, N, E), as torch's functional multi_head_attention_forward.
        length, batch, _ = query.shape
        source_length = key.shape[0]
        _check_mask_dtype(where, "key_padding_mask", key_padding_mask)
        _check_mask_dtype(where, "attn_mask", attn_mask)
        if is_causal and attn_mask is None and self.core.is_causal_needs_mask:
            raise RuntimeError(
                f"{where}: Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask (as torch.nn.MultiheadAttention)")
        if is_causal and attn_mask is not None and (
            not self.core.takes_any_mask or (key_padding_mask is None and not need_weights)
        ):
            # As torch: the mask only accompanies the is_causal hint, which is what is used, so
            # it is not validated (torch drops it the same way for SDPA's is_causal).
            attn_mask = None
        self._check_inputs(where, query, key, value, key_padding_mask, attn_mask)

        q, k, v = self._project(query, key, value)  # (L, N, E), (S, N, E), (S, N, E)
        if self.core.takes_any_mask:
            # torch's rule: with the is_causal hint, no key padding and no weights asked for, the
            # mask is dropped for SDPA's is_causal (which then also hides bias_kv / zero_attn keys,
            # unlike the padded mask). Without any attn_mask torch raises; here it means causal.
            causal = is_causal and (attn_mask is None or (key_padding_mask is None and not need_weights))
            if causal:
                attn_mask = None
        else:
            causal = is_causal_mask(attn_mask, is_causal, length, source_length, self.method)
            if causal and not self.core.supports_causal:
                raise ValueError(f"{where}: this method is non-causal only; got a causal attn_mask or is_causal=True")
            key_padding_mask = key_padding_as_bool(key_padding_mask, self.method)
            attn_mask = None
        # bias_kv / zero_attn append keys that every query sees. Appended to the sequence, they
        # suit masks; a causal kernel instead takes them as its initial state (visible_kv).
        as_state = causal and not self.core.takes_any_mask
        q, k, v = self._split_heads(q, batch), self._split_heads(k, batch), self._split_heads(v, batch)
        visible_k, visible_v = self._always_visible_keys(k, v)
        extra = {} if global_mask is None else {"global_mask": global_mask if batched else global_mask.unsqueeze(0)}
        if visible_k and not self.core.supports_extra_keys:
            raise ValueError(f"{where}: add_bias_kv and add_zero_attn are not supported by this method (their keys "
                             "would have to be seen by every query, outside its window)")
        if visible_k and as_state:
            extra["visible_kv"] = (torch.cat(visible_k, dim=2), torch.cat(visible_v, dim=2))
        elif visible_k:
            k, v = torch.cat([k, *visible_k], dim=2), torch.cat([v, *visible_v], dim=2)
            for _ in visible_k:
                attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)

        dropout_p = self.dropout if self.training else 0.0
        out, weights = self.core(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            dropout_p=dropout_p, need_weights=need_weights, **extra,
        )
        out = self._merge_heads_and_project(out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _split_heads(self, t, batch):
        """(L, N, E) -> (N, H, L, hd), a view without a copy."""
        return t.view(t.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _merge_heads_and_project(self, out):
        """(N, H, L, hd) attention output -> (L, N, E) through out_proj."""
        batch, _, length, _ = out.shape
        out = out.permute(2, 0, 1, 3).reshape(length * batch, self.embed_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias).view(length, batch, self.embed_dim)

    def _always_visible_keys(self, k, v):
        """The (N, H, 1, hd) keys and values of add_bias_kv / add_zero_attn, which every query sees."""
        batch, heads, _, head_dim = k.shape
        visible_k, visible_v = [], []
        if self.bias_k is not None:
            visible_k.append(self._split_heads(self.bias_k.expand(1, batch, -1), batch))
            visible_v.append(self._split_heads(self.bias_v.expand(1, batch, -1), batch))
        if self.add_zero_attn:
            visible_k.append(k.new_zeros(batch, heads, 1, head_dim))
            visible_v.append(v.new_zeros(batch, heads, 1, head_dim))
        return visible_k, visible_v

    def _forward_cached(self, where, query, key, value, key_padding_mask, need_weights, attn_mask, cache):
        """forward(..., cache=cache): see forward's docstring."""
        if not isinstance(cache, DecodingCache):
            raise ArgumentTypeError(f"{where}: cache must be a linattn.nn.DecodingCache, got {type(cache).__name__}")
        for name, given in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            if given is not None:
                raise ArgumentError(f"{where}: with cache= the attention is causal over the cached tokens and "
                                    f"takes no {name}; got one")
        if need_weights:
            raise ArgumentError(f"{where}: with cache= no attention weights are formed; pass need_weights=False")
        if self.training and self.dropout > 0.0:
            raise ArgumentError(f"{where}: incremental decoding applies no dropout; call .eval() (dropout="
                                f"{self.dropout} in training mode)")
        if any(t.is_nested for t in (query, key, value)):
            raise ArgumentError(f"{where}: with cache= query, key and value must be dense tensors")
        if query.dim() not in (2, 3) or key.shape != query.shape[:-1] + key.shape[-1:] or \
                value.shape != query.shape[:-1] + value.shape[-1:]:
            raise ArgumentError(
                f"{where}: with cache= query, key and value must be the same new tokens (decoder self-attention): "
                f"same rank (2 or 3) and length, got {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        elif self.batch_first:
            # Self-attention keeps query is key is value, so that _project runs one GEMM.
            self_attention = query is key and key is value
            query = query.transpose(0, 1)
            key, value = (query, query) if self_attention else (key.transpose(0, 1), value.transpose(0, 1))
        batch = query.shape[1]
        self._check_inputs(where, query, key, value, None, None)
        entry = cache.layer(self)
        if entry is not None and entry["batch"] != batch:
            raise ArgumentError(f"{where}: the cache holds a batch of {entry['batch']} sequences, the new tokens "
                                f"have batch {batch}; use DecodingCache.select to change it")
        q, k, v = (self._split_heads(t, batch) for t in self._project(query, key, value))
        visible = None
        visible_k, visible_v = self._always_visible_keys(k, v) if entry is None else ([], [])
        if visible_k:  # the first call brings them into the cache
            if not self.core.supports_extra_keys:
                raise ValueError(f"{where}: add_bias_kv and add_zero_attn are not supported by this method")
            visible = (torch.cat(visible_k, dim=2), torch.cat(visible_v, dim=2))
        out, entry = decode(self.core, q, k, v, entry, visible, where)
        entry["batch"] = batch
        cache.set_layer(self, entry)
        out = self._merge_heads_and_project(out)
        if not batched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _forward_nested(self, where, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal):
        """Nested (ragged) batch_first inputs, as nn.TransformerEncoder's eval fast path builds
        them: padded to a dense batch whose padding is a key padding mask, attended, and the
        output cut back to the same ragged lengths."""
        if not (query.is_nested and key.is_nested and value.is_nested):
            raise ArgumentError(f"{where}: query, key and value must all be nested tensors or none of them")
        if not self.batch_first:
            raise ArgumentError(f"{where}: nested tensor inputs need batch_first=True, as in torch")
        if key_padding_mask is not None:
            raise ArgumentError(f"{where}: nested inputs carry their own lengths; pass key_padding_mask=None")
        if any(t.dim() != 3 for t in (query, key, value)):
            # An empty nested tensor (no sequences) has one dimension; torch refuses it the same way.
            raise ArgumentError(
                f"{where}: nested query, key and value must be batched (N, L, E) with at least one sequence, got "
                f"nested tensors of {query.dim()}, {key.dim()} and {value.dim()} dims")
        query_lengths = [t.shape[0] for t in query.unbind()]
        key_lengths = [t.shape[0] for t in key.unbind()]
        if [t.shape[0] for t in value.unbind()] != key_lengths:
            raise ArgumentError(f"{where}: key and value must have the same lengths")
        if max(query_lengths) == 0:
            # No query: nothing to attend (to_padded_tensor refuses a nested tensor of empty sequences).
            self._check_embed_dims(where, query.size(-1), key.size(-1), value.size(-1))
            return torch.nested.as_nested_tensor([t.new_zeros(0, self.embed_dim) for t in query.unbind()]), None
        dense_query = torch.nested.to_padded_tensor(query, 0.0)
        dense_key = dense_query if key is query else torch.nested.to_padded_tensor(key, 0.0)
        dense_value = dense_key if value is key else torch.nested.to_padded_tensor(value, 0.0)
        positions = torch.arange(dense_key.shape[1], device=dense_key.device)
        padding = positions[None, :] >= torch.tensor(key_lengths, device=dense_key.device)[:, None]
        out, weights = self.forward(
            dense_query, dense_key, dense_value, key_padding_mask=padding, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        ragged = torch.nested.as_nested_tensor([out[i, :n] for i, n in enumerate(query_lengths)])
        return ragged, weights

    def _project(self, query, key, value):
        embed = self.embed_dim
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim and query is key and key is value:
            # Self-attention: one GEMM for all three, as torch does.
            return F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(embed)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(embed)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _check_embed_dims(self, where, query_dim, key_dim, value_dim):
        if query_dim != self.embed_dim:
            raise ArgumentError(f"{where}: query must have embed_dim={self.embed_dim} features, got {query_dim}")
        if key_dim != self.kdim or value_dim != self.vdim:
            raise ArgumentError(
                f"{where}: key and value must have kdim={self.kdim} and vdim={self.vdim} features, "
                f"got {key_dim} and {value_dim}"
            )

    def _check_inputs(self, where, query, key, value, key_padding_mask, attn_mask):
        length, batch, _ = query.shape
        self._check_embed_dims(where, query.shape[2], key.shape[2], value.shape[2])
        if key.shape[:2] != value.shape[:2] or key.shape[1] != batch:
            raise ArgumentError(
                f"{where}: key and value must have the same length and batch as each other and batch {batch} "
                f"of query, got key {tuple(key.shape)} and value {tuple(value.shape)} (in (L, N, E) order)"
            )
        source_length = key.shape[0]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, source_length):
            raise ArgumentError(
                f"{where}: key_padding_mask must be (batch, source length) = {(batch, source_length)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if attn_mask is not None:
            allowed = ((length, source_length), (batch * self.num_heads, length, source_length))
            if tuple(attn_mask.shape) not in allowed:
                raise ArgumentError(
                    f"{where}: attn_mask must be (L, S) = {allowed[0]} or (N·num_heads, L, S) = {allowed[1]}, "
                    f"got {tuple(attn_mask.shape)}"
                )


MultiheadAttention.__doc__ = MultiheadAttention.__doc__.replace("    {methods}", methods_summary(indent="    "))


def _check_ranks(where, query, key, value, key_padding_mask, attn_mask, num_heads) -> bool:
    """Whether the call is batched; a bad rank raises with torch.nn.MultiheadAttention's own
    message (prefixed by where), so code that matches torch's errors keeps working after a swap."""
    if query.dim() not in (2, 3):
        raise ArgumentError(
            f"{where}: query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")
    batched = query.dim() == 3
    kind, rank, mask_rank = ("batched (3-D)", 3, 2) if batched else ("unbatched (2-D)", 2, 1)
    if key.dim() != rank or value.dim() != rank:
        raise ArgumentError(f"{where}: For {kind} `query`, expected `key` and `value` to be {rank}-D but found "
                            f"{key.dim()}-D and {value.dim()}-D tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != mask_rank:
        raise ArgumentError(f"{where}: For {kind} `query`, expected `key_padding_mask` to be `None` or {mask_rank}-D "
                            f"but found {key_padding_mask.dim()}-D tensor instead")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ArgumentError(f"{where}: For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                            f"{attn_mask.dim()}-D tensor instead")
    if not batched and attn_mask is not None and attn_mask.dim() == 3:
        expected = (num_heads, query.shape[0], key.shape[0])
        if tuple(attn_mask.shape) != expected:
            raise ArgumentError(f"{where}: Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
    return batched


def _check_mask_dtype(where: str, name: str, mask) -> None:
    """torch accepts bool masks (True = masked) and float masks (added to the scores) only."""
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise ArgumentTypeError(
            f"{where}: {name} must be a bool (True = masked) or floating-point (additive) tensor, as in "
            f"torch.nn.MultiheadAttention, got {mask.dtype}"
        )


def _pad_masks(attn_mask, key_padding_mask):
    """One more key column that every query may see, as torch pads its masks for bias_kv / zero_attn."""
    if attn_mask is not None:
        attn_mask = F.pad(attn_mask, (0, 1))
    if key_padding_mask is not None:
        key_padding_mask = F.pad(key_padding_mask, (0, 1))
    return attn_mask, key_padding_mask
