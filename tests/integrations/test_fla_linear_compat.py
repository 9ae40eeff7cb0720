"""linattn.fla_compat's linear-attention family (linattn/fla_linear.py): GLA, simple GLA,
linear_attn, retention and lightning attention against the float64 per-token recurrence of
flash-linear-attention's kernels (fla/ops/common/fused_recurrent.py: S_t = Diag(e^{g_t}) γ S_{t−1}
+ k_t v_tᵀ, o_t = scale · S_tᵀ q_t; normalized, divided by scale · q_t · z_t + 1e-10 with z_t the
running key sum; reverse: the same loop from the last token to the first), in fla's (B, T, H, ·)
layout: states in and out (state_v_first's transposed layout too), packed sequences, gradients,
compile; options it does not implement raise naming them; fla's naive references as a second
oracle when installed."""
import pytest
import torch

from linattn import fla_compat
from linattn.fla_linear import lightning_decay, retention_decay

from conftest import assert_close


def make(B=2, T=70, H=2, K=16, V=24, per_channel=False, seed=0, dtype=torch.float32, positive=False):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g).to(dtype) for _ in range(2))
    if positive:  # featurized (normalized linear attention divides by q · z)
        q, k = q.sigmoid(), k.sigmoid()
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    gate = -0.3 * torch.rand(B, T, H, *((K,) if per_channel else ()), generator=g)
    S0 = torch.randn(B, H, K, V, generator=g)
    return q, k, v, gate, S0


def recurrence(q, k, v, g=None, S0=None, scale=None, decay=None, reverse=False, normalize=False, z0=None):
    """fla's per-token loop in float64; (out, S_final[, z_final]) with z (B, 1, H, K)."""
    q, k, v = (x.double() for x in (q, k, v))
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if S0 is None else S0.double().clone()
    z = torch.zeros(B, H, K, dtype=torch.float64) if z0 is None else z0.double()[:, 0].clone()
    outs = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        fade = torch.ones(B, H, K, dtype=torch.float64)
        if g is not None:
            gate = g[:, t].double().exp()
            fade = fade * (gate if g.dim() == 4 else gate[..., None])
        if decay is not None:
            fade = fade * decay.double()[:, None]
        S = fade[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        o = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        if normalize:
            o = o / ((scale * q[:, t] * z).sum(-1, keepdim=True) + 1e-10)
        outs[t] = o
    out = torch.stack(outs, 1)
    return (out, S, z[:, None]) if normalize else (out, S)


def packed_recurrence(bounds, q, k, v, g=None, S0=None, **options):
    """recurrence() sequence by sequence over packed rows (batch 1), states one per sequence."""
    pieces = [recurrence(*(x[:, a:b] for x in (q, k, v)), None if g is None else g[:, a:b],
                         None if S0 is None else S0[n:n + 1], **options) for n, (a, b) in enumerate(bounds)]
    return torch.cat([p[0] for p in pieces], 1), *(torch.cat(parts, 0) for parts in list(zip(*pieces))[1:])


def assert_gradients_agree(results, ref_results, leaves, names):
    """The gradients of Σ w · result over the leaves, for the same random w, within 1e-9 (float64)."""
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(r.shape, generator=g, dtype=r.dtype) for r in ref_results]
    got = torch.autograd.grad(sum((r * w).sum() for r, w in zip(results, weights)), leaves)
    want = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref_results, weights)), leaves)
    for name, a, b in zip(names, got, want):
        assert_close(a, b, 1e-9, f"grad {name}")


# --- gated linear attention ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chunk_gla", "fused_recurrent_gla"])
def test_gla_matches_the_recurrence(name):
    q, k, v, g, S0 = make(per_channel=True, seed=10)
    out, S = getattr(fla_compat, name)(q, k, v, g, initial_state=S0, output_final_state=True)
    ref_out, ref_S = recurrence(q, k, v, g, S0)
    assert out.shape == v.shape and out.is_contiguous()
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(S, ref_S, 1e-5, "final state")


@pytest.mark.parametrize("name", ["chunk_simple_gla", "fused_recurrent_simple_gla"])
def test_simple_gla_with_gates_and_a_head_decay(name):
    q, k, v, g, S0 = make(seed=11)
    g_gamma = torch.tensor([-0.05, -0.2])
    out, S = getattr(fla_compat, name)(q, k, v, g, g_gamma=g_gamma, scale=0.3, initial_state=S0,
                                       output_final_state=True)
    ref_out, ref_S = recurrence(q, k, v, g, S0, scale=0.3, decay=g_gamma.exp())
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(S, ref_S, 1e-5, "final state")


def test_gla_packed_sequences_and_gradients():
    cu = torch.tensor([0, 30, 70], dtype=torch.long)
    inputs = [x.double().requires_grad_() for x in make(B=1, per_channel=True, seed=12)]
    q, k, v, g, _ = inputs
    S0 = torch.randn(2, 2, 16, 24, dtype=torch.float64, requires_grad=True)
    out, S = fla_compat.chunk_gla(q, k, v, g, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    ref_out, ref_S = packed_recurrence([(0, 30), (30, 70)], q, k, v, g, S0)
    assert_close(out, ref_out, 1e-9, "out")
    assert_close(S, ref_S, 1e-9, "final states")
    assert_gradients_agree((out, S), (ref_out, ref_S), [q, k, v, g, S0], ("q", "k", "v", "g", "initial_state"))


# --- reverse and state_v_first -------------------------------------------------------------------------

@pytest.mark.parametrize("name, per_channel", [("fused_recurrent_gla", True), ("fused_recurrent_simple_gla", False)])
def test_reverse_runs_from_the_last_token(name, per_channel):
    q, k, v, g, S0 = make(per_channel=per_channel, seed=14)
    out, S = getattr(fla_compat, name)(q, k, v, g, initial_state=S0, output_final_state=True, reverse=True)
    ref_out, ref_S = recurrence(q, k, v, g, S0, reverse=True)
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(S, ref_S, 1e-5, "final state (after the first token)")
    forward_out, _ = getattr(fla_compat, name)(q, k, v, g, initial_state=S0)
    assert (forward_out - out).abs().max() > 0.1, "reverse changed nothing"


def test_reverse_packed_sequences_and_gradients():
    """Each packed sequence read backwards on its own (rows gathered on the device), gradients too."""
    cu = torch.tensor([0, 1, 33, 70], dtype=torch.int32)
    bounds = [(0, 1), (1, 33), (33, 70)]
    q, k, v, g, _ = (x.double().requires_grad_() for x in make(B=1, seed=15))
    S0 = torch.randn(3, 2, 16, 24, dtype=torch.float64, requires_grad=True)
    g_gamma = torch.tensor([-0.1, 0.0], dtype=torch.float64)
    out, S = fla_compat.fused_recurrent_simple_gla(q, k, v, g, g_gamma=g_gamma, initial_state=S0,
                                                   output_final_state=True, reverse=True, cu_seqlens=cu)
    ref_out, ref_S = packed_recurrence(bounds, q, k, v, g, S0, decay=g_gamma.exp(), reverse=True)
    assert_close(out, ref_out, 1e-9, "out")
    assert_close(S, ref_S, 1e-9, "final states")
    assert_gradients_agree((out, S), (ref_out, ref_S), [q, k, v, g, S0], ("q", "k", "v", "g", "initial_state"))


@pytest.mark.parametrize("name", ["fused_recurrent_simple_gla", "fused_recurrent_retention", "fused_recurrent_gla"])
def test_state_v_first_takes_and_returns_transposed_states(name):
    q, k, v, g, S0 = make(per_channel=name == "fused_recurrent_gla", seed=16)
    gate = () if name == "fused_recurrent_retention" else (g,)
    plain, S = getattr(fla_compat, name)(q, k, v, *gate, initial_state=S0, output_final_state=True)
    out, S_t = getattr(fla_compat, name)(q, k, v, *gate, initial_state=S0.transpose(-1, -2).contiguous(),
                                         output_final_state=True, state_v_first=True)
    assert S_t.shape == (2, 2, 24, 16) and S_t.is_contiguous()
    assert torch.equal(out, plain)
    assert torch.equal(S_t, S.transpose(-1, -2))


# --- linear_attn -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn"])
def test_normalized_linear_attn_carries_the_key_sum(name):
    """Normalized: divided by scale · q · (z0 + Σ k) + 1e-10; the state is (S, z), z (B, 1, H, K), given
    and returned, so that two calls continue one sequence."""
    q, k, v, _, S0 = make(seed=17, positive=True)
    z0 = torch.rand(2, 1, 2, 16) * 5
    f = getattr(fla_compat, name)
    out, (S, z) = f(q, k, v, initial_state=(S0, z0), output_final_state=True, normalize=True)
    ref_out, ref_S, ref_z = recurrence(q, k, v, S0=S0, normalize=True, z0=z0)
    assert z.shape == (2, 1, 2, 16)
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(S, ref_S, 1e-5, "S")
    assert_close(z, ref_z, 1e-5, "z")
    first, (S1, z1) = f(q[:, :30], k[:, :30], v[:, :30], initial_state=(S0, z0), output_final_state=True,
                        normalize=True)
    second, _ = f(q[:, 30:], k[:, 30:], v[:, 30:], initial_state=(S1, z1), normalize=True)
    assert_close(torch.cat([first, second], 1), ref_out, 1e-5, "two calls")
    # Without a state: z from 0, and fla 0.6 returns the key sum even without output_final_state.
    out, (S, z) = f(q, k, v, normalize=True)
    ref_out, _, ref_z = recurrence(q, k, v, normalize=True)
    assert S is None
    assert_close(out, ref_out, 1e-5, "out from zero")
    assert_close(z, ref_z, 1e-5, "z from zero")


def test_linear_attn_defaults_unnormalized_and_reverse():
    q, k, v, _, S0 = make(seed=18, positive=True)
    out, S = fla_compat.fused_recurrent_linear_attn(q, k, v, scale=0.5, initial_state=S0, output_final_state=True)
    ref_out, ref_S = recurrence(q, k, v, S0=S0, scale=0.5)
    assert_close(out, ref_out, 1e-5, "unnormalized (the default) out")
    assert_close(S, ref_S, 1e-5, "unnormalized S")
    out, (S, z) = fla_compat.fused_recurrent_linear_attn(q, k, v, initial_state=S0, output_final_state=True,
                                                         normalize=True, reverse=True)
    ref_out, ref_S, ref_z = recurrence(q, k, v, S0=S0, normalize=True, reverse=True)
    assert_close(out, ref_out, 1e-5, "normalized, reversed out")
    assert_close(z, ref_z, 1e-5, "z (all the keys)")


def test_normalized_linear_attn_gradients_with_packed_sequences():
    cu = torch.tensor([0, 25, 70], dtype=torch.long)
    q, k, v, _, _ = (x.double().requires_grad_() for x in make(B=1, seed=19, positive=True))
    S0 = torch.randn(2, 2, 16, 24, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(2, 1, 2, 16, dtype=torch.float64) + 1).requires_grad_()
    out, (S, z) = fla_compat.chunk_linear_attn(q, k, v, initial_state=(S0, z0), output_final_state=True,
                                               cu_seqlens=cu)
    pieces = [recurrence(q[:, a:b], k[:, a:b], v[:, a:b], S0=S0[n:n + 1], z0=z0[n:n + 1], normalize=True)
              for n, (a, b) in enumerate([(0, 25), (25, 70)])]
    ref_out, ref_S, ref_z = (torch.cat([p[i] for p in pieces], 1 if i == 0 else 0) for i in range(3))
    assert_close(out, ref_out, 1e-9, "out")
    assert_close(z, ref_z, 1e-9, "z")
    assert_gradients_agree((out, S, z), (ref_out, ref_S, ref_z), [q, k, v, S0, z0], ("q", "k", "v", "S0", "z0"))


# --- retention and lightning attention -------------------------------------------------------------

def test_the_head_decays():
    """RetNet's γ_h = 1 − 2^(−5−h); Lightning's e^(−8h/H · (1 − l/L)): head 0 keeps its state."""
    assert torch.equal(retention_decay(3), torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128]))
    expected = torch.exp(-torch.tensor([0.0, 2.0, 4.0, 6.0]) * 0.75)
    assert_close(lightning_decay(4, 1, 4), expected.double(), 1e-7, "lightning decay")


@pytest.mark.parametrize("name", ["chunk_retention", "fused_chunk_retention", "fused_recurrent_retention",
                                  "chunk_lightning_attn", "fused_recurrent_lightning_attn"])
def test_retention_and_lightning_match_the_recurrence(name):
    q, k, v, _, S0 = make(H=4, seed=20)
    lightning = "lightning" in name
    layer = (3, 8) if lightning else ()
    out, S = getattr(fla_compat, name)(q, k, v, *layer, scale=0.2, initial_state=S0, output_final_state=True)
    decay = lightning_decay(4, 3, 8) if lightning else retention_decay(4)
    ref_out, ref_S = recurrence(q, k, v, S0=S0, scale=0.2, decay=decay)
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(S, ref_S, 1e-5, "final state")


def test_parallel_retention_and_its_refusal():
    q, k, v, _, _ = make(H=3, seed=21)
    out, attn = fla_compat.parallel_retention(q, k, v)
    assert attn is None
    assert_close(out, recurrence(q, k, v, decay=retention_decay(3))[0], 1e-5, "out")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        fla_compat.parallel_retention(q, k, v, output_attentions=True)


# --- compile, refusals, bad input --------------------------------------------------------------------

def test_reverse_and_normalized_forms_compile_with_fullgraph():
    q, k, v, g, S0 = make(B=1, seed=22, positive=True)
    cu = torch.tensor([0, 31, 70], dtype=torch.int32)
    S0 = S0.repeat(2, 1, 1, 1)

    def f(q, k, v, g, S0):
        a, S = fla_compat.fused_recurrent_simple_gla(q, k, v, g, initial_state=S0, output_final_state=True,
                                                     reverse=True, cu_seqlens=cu)
        b, (_, z) = fla_compat.chunk_linear_attn(q, k, v, cu_seqlens=cu)
        c, _ = fla_compat.chunk_retention(q, k, v)
        return a, S, b, z, c

    eager = f(q, k, v, g, S0)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, g, S0)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option, value", [("gv", torch.zeros(1)), ("head_first", True), ("cp_context", 1)])
def test_options_it_does_not_implement_raise_naming_them(option, value):
    q, k, v, g, _ = make(T=5, per_channel=True)
    with pytest.raises(NotImplementedError, match=option):
        fla_compat.fused_recurrent_gla(q, k, v, g, **{option: value})
    fla_compat.chunk_retention(q, k, v, chunk_size=64)  # hints pass


def test_bad_shapes_and_states_raise_naming_them():
    q, k, v, _, S0 = make(T=5)
    with pytest.raises(ValueError, match="q and k must be"):
        fla_compat.chunk_retention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="batch of 1"):
        fla_compat.chunk_linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        fla_compat.fused_recurrent_simple_gla(q[:1], k[:1], v[:1], reverse=True, cu_seqlens=torch.tensor([0, 3, 9]))
    with pytest.raises(ValueError, match="initial_state"):
        fla_compat.chunk_linear_attn(q, k, v, initial_state=(S0[:, :, :3], None))


def test_agrees_with_flash_linear_attentions_naive_references():
    naive_gla = pytest.importorskip("fla.ops.gla.naive")
    naive_simple = pytest.importorskip("fla.ops.simple_gla.naive")
    naive_retention = pytest.importorskip("fla.ops.retention.naive")
    naive_linear = pytest.importorskip("fla.ops.linear_attn.naive")
    q, k, v, g, S0 = make(per_channel=True, seed=13)
    out, S = fla_compat.chunk_gla(q, k, v, g, initial_state=S0, output_final_state=True)
    ref_out, ref_S = naive_gla.naive_recurrent_gla(q, k, v, g, initial_state=S0, output_final_state=True)
    assert_close(out, ref_out.double(), 1e-5, "GLA out vs fla")
    assert_close(S, ref_S.double(), 1e-5, "GLA state vs fla")
    g = g[..., 0]
    out, S = fla_compat.chunk_simple_gla(q, k, v, g, initial_state=S0, output_final_state=True)
    ref_out, ref_S = naive_simple.naive_recurrent_simple_gla(q, k, v, g, initial_state=S0, output_final_state=True)
    assert_close(out, ref_out.double(), 1e-5, "simple GLA out vs fla")
    assert_close(S, ref_S.double(), 1e-5, "simple GLA state vs fla")
    out, _ = fla_compat.chunk_retention(q, k, v)
    ref_out = naive_retention.naive_retention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert_close(out, ref_out.double(), 1e-5, "retention out vs fla")
    q, k = q.sigmoid(), k.sigmoid()
    z0 = torch.rand(2, 1, 2, 16)
    out, (S, z) = fla_compat.chunk_linear_attn(q, k, v, initial_state=(S0, z0), output_final_state=True)
    ref_out, (ref_S, ref_z) = naive_linear.naive_recurrent_linear_attn(q, k, v, initial_state=(S0, z0),
                                                                      output_final_state=True, normalize=True)
    for what, a, b in (("out", out, ref_out), ("S", S, ref_S), ("z", z, ref_z)):
        assert_close(a, b.double(), 1e-5, f"normalized linear attention {what} vs fla")
