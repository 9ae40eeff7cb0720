"""linattn.fla_compat's RWKV-6 (linattn/fla_rwkv6.py: the recurrence on the gated operator with keys,
values and gates moved one row later) against the float64 per-token loop of fla's kernel
(o_t = scale · r_tᵀ (h_{t−1} + Diag(u) k_t v_tᵀ), h_t = Diag(e^{w_t}) h_{t−1} + k_t v_tᵀ): states in
and out, packed sequences (an empty one, one of a single token), reverse, strong decays, every
gradient, compile; fla's naive reference as a second oracle when installed."""
import pytest
import torch
import torch.nn.functional as F

from linattn import fla_compat
from linattn.fla_rwkv6 import sequence_starts, shifted_rows

from conftest import assert_close


def make(B=2, T=50, H=2, K=16, V=24, seed=0, dtype=torch.float32, strength=1.0):
    g = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(B, T, H, K, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    w = (F.logsigmoid(torch.randn(B, T, H, K, generator=g)) * strength).to(dtype)
    u = torch.randn(H, K, generator=g).to(dtype)
    h0 = torch.randn(B, H, K, V, generator=g)
    return r, k, v, w, u, h0


def recurrence(r, k, v, w, u, h0=None, scale=None, reverse=False):
    r, k, v, w, u = (x.double() for x in (r, k, v, w, u))
    B, T, H, K = r.shape
    scale = K ** -0.5 if scale is None else scale
    h = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double().clone()
    outs = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        outs[t] = scale * torch.einsum("bhk,bhkv->bhv", r[:, t], h + u[None, :, :, None] * kv)
        h = w[:, t].exp()[..., None] * h + kv
    out = torch.stack(outs, 1) if T else v.double() * 0
    return out, h


def packed_recurrence(bounds, r, k, v, w, u, h0, **options):
    pieces = [recurrence(r[:, a:b], k[:, a:b], v[:, a:b], w[:, a:b], u, h0[n:n + 1], **options)
              for n, (a, b) in enumerate(bounds)]
    return torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 0)


def test_shifted_rows_restart_at_each_sequence():
    x = torch.arange(1, 8).view(1, 7, 1)
    assert shifted_rows(x, sequence_starts("test", None, 7, x.device)).flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]
    cu = torch.tensor([0, 3, 3, 4, 7], dtype=torch.int32)
    assert shifted_rows(x, sequence_starts("test", cu, 7, x.device)).flatten().tolist() == [0, 1, 2, 0, 0, 5, 6]


@pytest.mark.parametrize("name", ["chunk_rwkv6", "fused_recurrent_rwkv6"])
@pytest.mark.parametrize("T", [1, 50])
def test_rwkv6_matches_the_recurrence(name, T):
    r, k, v, w, u, h0 = make(T=T, seed=1)
    out, h = getattr(fla_compat, name)(r, k, v, w, u, initial_state=h0, output_final_state=True)
    ref_out, ref_h = recurrence(r, k, v, w, u, h0)
    assert out.shape == v.shape and out.is_contiguous() and out.dtype == r.dtype
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(h, ref_h, 1e-5, "final state")
    out, h = getattr(fla_compat, name)(r, k, v, w, u, scale=0.7)
    assert h is None
    assert_close(out, recurrence(r, k, v, w, u, scale=0.7)[0], 1e-5, "out without a state")


def test_strong_decays_stay_finite():
    """Log-decays of −60 a channel (a state forgotten within a token): no e^{+60} anywhere."""
    r, k, v, w, u, h0 = make(seed=2, strength=60.0)
    out, h = fla_compat.chunk_rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True)
    ref_out, ref_h = recurrence(r, k, v, w, u, h0)
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(h, ref_h, 1e-5, "final state")


def test_packed_reverse_and_gradients():
    """Packed sequences (an empty one keeps its state, one of a single token), read forwards and
    backwards, every gradient (r, k, v, w, u, h0) in float64."""
    cu = torch.tensor([0, 20, 20, 21, 50], dtype=torch.long)
    bounds = [(0, 20), (20, 20), (20, 21), (21, 50)]
    r, k, v, w, u, _ = (x.double().requires_grad_() for x in make(B=1, seed=3))
    h0 = torch.randn(4, 2, 16, 24, dtype=torch.float64, requires_grad=True)
    leaves = [r, k, v, w, u, h0]
    for reverse in (False, True):
        out, h = fla_compat.fused_recurrent_rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True,
                                                  reverse=reverse, cu_seqlens=cu)
        ref_out, ref_h = packed_recurrence(bounds, r, k, v, w, u, h0, reverse=reverse)
        assert_close(out, ref_out, 1e-9, f"out (reverse={reverse})")
        assert_close(h, ref_h, 1e-9, f"final states (reverse={reverse})")
        assert torch.equal(h[1], h0[1]), "an empty sequence keeps its state"
        wo, wh = torch.randn_like(out), torch.randn_like(h)
        got = torch.autograd.grad((out * wo).sum() + (h * wh).sum(), leaves)
        want = torch.autograd.grad((ref_out * wo).sum() + (ref_h * wh).sum(), leaves)
        for name, a, b in zip(("r", "k", "v", "w", "u", "h0"), got, want):
            assert_close(a, b, 1e-9, f"grad {name} (reverse={reverse})")


def test_bfloat16_inputs():
    r, k, v, w, u, h0 = make(seed=4, dtype=torch.bfloat16)
    out, h = fla_compat.chunk_rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True)
    ref_out, ref_h = recurrence(r, k, v, w, u, h0)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close(out, ref_out, 2e-2, "out")
    assert_close(h, ref_h, 2e-2, "final state")


def test_compiles_with_fullgraph():
    r, k, v, w, u, _ = make(B=1, seed=5)
    cu = torch.tensor([0, 17, 50], dtype=torch.int32)
    h0 = torch.randn(2, 2, 16, 24)

    def f(r, k, v, w, u, h0):
        return fla_compat.fused_recurrent_rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True,
                                                reverse=True, cu_seqlens=cu)

    eager = f(r, k, v, w, u, h0)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(r, k, v, w, u, h0)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_bad_shapes_and_options_raise_naming_them():
    r, k, v, w, u, _ = make(T=5)
    with pytest.raises(ValueError, match="u must be"):
        fla_compat.chunk_rwkv6(r, k, v, w, u[:, :3])
    with pytest.raises(ValueError, match="w must be"):
        fla_compat.chunk_rwkv6(r, k, v, w[..., :3], u)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        fla_compat.fused_recurrent_rwkv6(r[:1], k[:1], v[:1], w[:1], u, reverse=True,
                                         cu_seqlens=torch.tensor([0, 3, 9]))
    with pytest.raises(NotImplementedError, match="head_first"):
        fla_compat.chunk_rwkv6(r, k, v, w, u, head_first=True)
    fla_compat.chunk_rwkv6(r, k, v, w, u, chunk_size=64, cu_seqlens_cpu=None)  # hints pass


def test_agrees_with_flash_linear_attentions_naive_reference():
    naive = pytest.importorskip("fla.ops.rwkv6.recurrent_naive")
    r, k, v, w, u, h0 = make(seed=6)
    out, h = fla_compat.chunk_rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True)
    heads_first = [x.transpose(1, 2) for x in (r, k, v, w)]
    ref_out, ref_h = naive.naive_recurrent_rwkv6(*heads_first, u, initial_state=h0, output_final_state=True)
    assert_close(out, ref_out.transpose(1, 2).double(), 1e-5, "out vs fla")
    assert_close(h, ref_h.double(), 1e-5, "final state vs fla")
