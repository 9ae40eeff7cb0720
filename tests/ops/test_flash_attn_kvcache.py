"""linattn.flash_attn_compat.flash_attn_with_kvcache (linattn/flash_attn_kvcache.py) and the qkv-/kv-
packed forms of flash-attn's calls: against flash-attn's definitions in float64 — decoding token by
token into preallocated caches with per-row lengths (the new keys appended in place), grouped-query
heads, windows, softcap and ALiBi (the lse too), rotary embeddings (both layouts, causal or not),
cache_batch_idx, chunked prefill with several queries a row (equal and unequal lengths), compile;
and what it refuses, by name."""
import pytest
import torch

from linattn.flash_attn_compat import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                       flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                       flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from test_flash_attn_compat import flash_reference

H, HK, D, DV, CAPACITY = 4, 2, 8, 6, 24


def reference_rows(q, keys, values, lengths, **options):
    """Row b's queries (its last T_q positions) against its first lengths[b] keys, flash-attn's
    bottom-right alignment, float64; (out (B, T_q, H, dv), lse (B, H, T_q)) with ALiBi applied."""
    alibi = options.pop("alibi_slopes", None)
    outs, lses = [], []
    for b, n in enumerate(lengths):
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        out, lse = alibi_reference(q[b:b + 1], keys[b:b + 1, :n], values[b:b + 1, :n], slopes, **options)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def alibi_reference(q, k, v, slopes, causal=False, window_size=(-1, -1), softcap=0.0):
    if slopes is None:
        return flash_reference(q, k, v, causal=causal, window_size=window_size, softcap=softcap)
    from linattn import reference
    from linattn.ops.restricted import Pattern
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    left, right = window_size
    visible = Pattern(window=(left, 0 if causal else right), causal=causal).dense_mask(q.shape[2], k.shape[2])
    out, lse = reference.masked_softmax_attention(q, k, v, visible, q.shape[-1] ** -0.5, softcap=softcap,
                                                  alibi_slopes=slopes.view(1, -1).expand(1, q.shape[1]),
                                                  return_lse=True)
    return out.transpose(1, 2), lse


def tokens(B, T, heads, dim, seed):
    return torch.randn(B, T, heads, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


OPTIONS = {
    "plain": dict(),
    "causal window": dict(causal=True, window_size=(3, 0)),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_decoding_token_by_token_with_per_row_lengths(name):
    """Three rows with prompts of different lengths already cached, then 5 steps of one new token a
    row appended in place: every step's output and lse equal each row's attention over its keys
    so far, and the caches hold every token written at its place."""
    options = OPTIONS[name]
    B, prompts = 3, [4, 9, 1]
    keys, values = tokens(B, CAPACITY, HK, D, 1), tokens(B, CAPACITY, HK, DV, 2)
    k_cache, v_cache = torch.zeros_like(keys), torch.zeros_like(values)
    for b, n in enumerate(prompts):
        k_cache[b, :n], v_cache[b, :n] = keys[b, :n], values[b, :n]
    lengths = torch.tensor(prompts, dtype=torch.int32)
    for step in range(5):
        q = tokens(B, 1, H, D, 10 + step)
        new = [torch.stack([x[b, n] for b, n in enumerate(lengths.tolist())])[:, None] for x in (keys, values)]
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, *new, cache_seqlens=lengths, return_softmax_lse=True,
                                           **options)
        lengths = lengths + 1
        want, want_lse = reference_rows(q, keys, values, lengths.tolist(), **dict(options))
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(k_cache[b, :n], keys[b, :n]) and torch.equal(v_cache[b, :n], values[b, :n])
        assert torch.all(k_cache[b, n:] == 0)


def test_cache_batch_idx_and_chunked_prefill():
    """Rows reading cache rows chosen by cache_batch_idx; several new queries a row (chunked
    prefill) with equal lengths (one call, an int or a tensor) and with unequal ones (row by row)."""
    keys, values = tokens(4, CAPACITY, HK, D, 3), tokens(4, CAPACITY, HK, DV, 4)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    for lengths in (6, torch.tensor([6, 6], dtype=torch.int32), torch.tensor([3, 8], dtype=torch.int32)):
        k_cache, v_cache = keys.clone(), values.clone()
        q, k_new, v_new = tokens(2, 5, H, D, 5), tokens(2, 5, HK, D, 6), tokens(2, 5, HK, DV, 7)
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths,
                                      cache_batch_idx=idx, causal=True, window_size=(4, 0))
        starts = [lengths] * 2 if isinstance(lengths, int) else lengths.tolist()
        expected_keys, expected_values = keys[idx.long()].clone(), values[idx.long()].clone()
        for b, n in enumerate(starts):
            expected_keys[b, n:n + 5], expected_values[b, n:n + 5] = k_new[b], v_new[b]
        want, _ = reference_rows(q, expected_keys, expected_values, [n + 5 for n in starts], causal=True,
                                 window_size=(4, 0))
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        assert torch.equal(k_cache[idx.long()], expected_keys) and torch.equal(k_cache[[1, 3]], keys[[1, 3]])


def rotate(x, angles, interleaved):
    """Rotary embedding by complex multiplication (independent of the implementation): x (B, T, H, D),
    angles (B, T, R) radians for the first 2·R dims, paired (2i, 2i + 1) or (i, i + R)."""
    R = angles.shape[-1]
    part = x[..., :2 * R]
    pairs = part.unflatten(-1, (R, 2)) if interleaved else part.unflatten(-1, (2, R)).transpose(-1, -2)
    turned = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * torch.polar(
        torch.ones_like(angles), angles)[:, :, None])
    turned = turned.flatten(-2) if interleaved else turned.transpose(-1, -2).flatten(-2)
    return torch.cat([turned, x[..., 2 * R:]], dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary_embeddings_at_each_rows_positions(interleaved, causal):
    """New keys rotated at their positions and cached; queries at theirs (causal) or all at the row's
    length (not causal), as flash-attn does: equal to attention over keys and queries rotated first."""
    R, positions = 3, 40  # rotary_dim 6 of the head dim 8
    freqs = 1.0 / (100.0 ** (torch.arange(R, dtype=torch.float64) / R))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * freqs
    cos, sin = angles.cos(), angles.sin()
    prompts, new = [4, 7], 3
    keys, values = tokens(2, CAPACITY, HK, D, 20), tokens(2, CAPACITY, HK, DV, 21)
    k_cache, v_cache = keys.clone(), values.clone()  # the prompts' keys: cached already rotated
    q, k_new, v_new = tokens(2, new, H, D, 22), tokens(2, new, HK, D, 23), tokens(2, new, HK, DV, 24)
    lengths = torch.tensor(prompts, dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                  cache_seqlens=lengths, causal=causal, rotary_interleaved=interleaved)
    at = torch.tensor(prompts)[:, None] + torch.arange(new)
    k_rotated = rotate(k_new, angles[at], interleaved)
    q_at = at if causal else torch.tensor(prompts)[:, None].expand(2, new)
    q_rotated = rotate(q, angles[q_at], interleaved)
    expected_keys = keys.clone()
    for b, n in enumerate(prompts):
        expected_keys[b, n:n + new] = k_rotated[b]
    torch.testing.assert_close(k_cache, expected_keys, rtol=1e-12, atol=1e-12)
    values_now = values.clone()
    for b, n in enumerate(prompts):
        values_now[b, n:n + new] = v_new[b]
    want, _ = reference_rows(q_rotated, expected_keys, values_now, [n + new for n in prompts], causal=causal)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_decoding_step_compiles_fullgraph():
    k_cache, v_cache = tokens(2, CAPACITY, HK, D, 8).float(), tokens(2, CAPACITY, HK, DV, 9).float()
    # A row fills the caches: eager's cut to the longest row (CPU) is then the compiled call's whole
    # cache, and the two are the same arithmetic.
    lengths = torch.tensor([5, CAPACITY], dtype=torch.int32)
    q = tokens(2, 1, H, D, 10).float()

    def step(q, k_cache, v_cache, lengths):
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, window_size=(6, 0))

    expected = step(q, k_cache, v_cache, lengths)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, fullgraph=True)(q, k_cache, v_cache, lengths), expected)


def test_packed_forms_equal_the_unpacked_calls():
    q, k, v = tokens(2, 9, H, D, 11), tokens(2, 9, H, D, 12), tokens(2, 9, H, D, 13)
    qkv = torch.stack([q, k, v], dim=2).requires_grad_()
    out = flash_attn_qkvpacked_func(qkv, causal=True, softcap=2.0)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True, softcap=2.0), rtol=0, atol=0)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0
    kv = torch.stack([k[:, :, :HK], v[:, :, :HK]], dim=2)
    torch.testing.assert_close(flash_attn_kvpacked_func(q, kv, window_size=(2, 2)),
                               flash_attn_func(q, k[:, :, :HK], v[:, :, :HK], window_size=(2, 2)), rtol=0, atol=0)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    torch.testing.assert_close(flash_attn_varlen_qkvpacked_func(qkv[0].detach(), cu, 5, causal=True),
                               flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, causal=True), rtol=0, atol=0)
    cu_k = torch.tensor([0, 2, 9], dtype=torch.int32)
    torch.testing.assert_close(flash_attn_varlen_kvpacked_func(q[0], kv[0], cu, cu_k, 5, 7),
                               flash_attn_varlen_func(q[0], k[0, :, :HK], v[0, :, :HK], cu, cu_k, 5, 7), rtol=0,
                               atol=0)
    with pytest.raises(ValueError, match=r"qkv must have 3 at dim 2"):
        flash_attn_qkvpacked_func(qkv[:, :, :2])


def test_what_it_refuses_is_named():
    q = tokens(2, 1, H, D, 14)
    k_cache, v_cache = tokens(2, CAPACITY, HK, D, 15), tokens(2, CAPACITY, HK, DV, 16)
    lengths = torch.tensor([3, 4], dtype=torch.int32)
    for name in ("cache_leftpad", "block_table"):
        with pytest.raises(ValueError, match=f"{name} is not supported"):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, **{name: torch.zeros(1)})
    with pytest.raises(ValueError, match="k and v .* must be given together"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=tokens(2, 1, HK, D, 17), cache_seqlens=lengths)
    with pytest.raises(ValueError, match="new k and v need cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, tokens(2, 1, HK, D, 17), tokens(2, 1, HK, DV, 18))
    with pytest.raises(ValueError, match=r"cache_seqlens must be an int or an int32 tensor \(B=2,\)"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths.long())
    with pytest.raises(ValueError, match="overflows the caches' 24 positions"):
        flash_attn_with_kvcache(q, k_cache, v_cache, tokens(2, 3, HK, D, 17), tokens(2, 3, HK, DV, 18),
                                cache_seqlens=22)
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin must be given together"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, rotary_cos=torch.ones(30, 2))
    with pytest.raises(ValueError, match="rotary_dim <= the head dim 8"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, rotary_cos=torch.ones(30, 5),
                                rotary_sin=torch.ones(30, 5))
    with pytest.raises(ValueError, match="one row per batch entry"):
        flash_attn_with_kvcache(q, k_cache[:1], v_cache[:1], cache_seqlens=3)
