"""linattn.fla_compat (flash-linear-attention's delta-rule functions on linattn's operator) and
linattn.hf.use_fla_compat (transformers' own Gated DeltaNet / KDA layers routed to it).

fla_compat against the float64 per-token recurrence in fla's (B, T, H, K) layout: grouped value
attention, states in and out, the chunked and recurrent forms (one token: delta_rule_step),
packed sequences, KDA's gate activations, β's sigmoid, every gradient, compile; options it does not
implement raise naming them; flash-linear-attention's naive references as a second oracle when
installed. The transformers tests build small Qwen3-Next and Kimi Linear models (no downloads):
logits and greedy generation with the layers on linattn equal the models' own PyTorch path, and
a spy counts the calls that reached linattn."""
import pytest
import torch

import linattn
from linattn import fla_compat, reference
from linattn.delta_rule import l2_normalize

from conftest import assert_close


def make(B=2, T=70, H=2, HV=4, K=16, V=24, per_channel=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=g).to(dtype)
    beta = torch.rand(B, T, HV, generator=g).to(dtype)
    gate = -0.3 * torch.rand(B, T, HV, *((K,) if per_channel else ()), generator=g)
    S0 = torch.randn(B, HV, K, V, generator=g)
    return q, k, v, gate, beta, S0


def expected(q, k, v, gate, beta, S0, normalize=True, scale=None):
    """The float64 recurrence with q and k repeated to the value heads, back in fla's layout."""
    group = v.shape[2] // q.shape[2]
    q, k = (x.double().repeat_interleave(group, 2).transpose(1, 2) for x in (q, k))
    if normalize:
        q, k = l2_normalize(q), l2_normalize(k)
    out, S = reference.delta_rule(q, k, v.double().transpose(1, 2), beta.double().transpose(1, 2),
                                  gate=None if gate is None else gate.double().transpose(1, 2), scale=scale,
                                  initial_state=None if S0 is None else S0.double())
    return out.transpose(1, 2), S


@pytest.mark.parametrize("name, per_channel", [("chunk_gated_delta_rule", False),
                                               ("fused_recurrent_gated_delta_rule", False),
                                               ("chunk_kda", True), ("fused_recurrent_kda", True)])
@pytest.mark.parametrize("T", [1, 70])
def test_gated_forms_match_the_recurrence_with_grouped_value_heads(name, per_channel, T):
    q, k, v, gate, beta, S0 = make(T=T, per_channel=per_channel, seed=T)
    out, S = getattr(fla_compat, name)(q, k, v, gate, beta, initial_state=S0, output_final_state=True,
                                       use_qk_l2norm_in_kernel=True)
    ref_out, ref_S = expected(q, k, v, gate, beta, S0)
    assert out.shape == v.shape and out.is_contiguous() and S.dtype == torch.float32
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(S, ref_S, 1e-5, "final state")


@pytest.mark.parametrize("name", ["chunk_delta_rule", "fused_recurrent_delta_rule"])
def test_delta_rule_without_gate_state_or_normalisation(name):
    q, k, v, _, beta, _ = make(H=4, seed=3)
    q, k = l2_normalize(q), l2_normalize(k)
    out, S = getattr(fla_compat, name)(q, k, v, beta, scale=0.5)
    assert S is None
    assert_close(out, expected(q, k, v, None, beta, None, normalize=False, scale=0.5)[0], 1e-5, "out")


def test_packed_sequences_run_each_from_its_own_state():
    cu = torch.tensor([0, 20, 20, 90], dtype=torch.long)  # fla's LongTensor offsets
    q, k, v, gate, beta, _ = make(B=1, T=90, seed=4)
    S0 = torch.randn(3, 4, 16, 24)
    out, S = fla_compat.chunk_gated_delta_rule(q, k, v, gate, beta, initial_state=S0, output_final_state=True,
                                               use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    for n in range(3):
        a, b = int(cu[n]), int(cu[n + 1])
        if a == b:
            assert torch.equal(S[n], S0[n])
            continue
        ref_out, ref_S = expected(*(x[:, a:b] for x in (q, k, v, gate, beta)), S0[n:n + 1])
        assert_close(out[:, a:b], ref_out, 1e-5, f"out of sequence {n}")
        assert_close(S[n:n + 1], ref_S, 1e-5, f"state of sequence {n}")


def test_kda_gate_activation_and_beta_sigmoid():
    """use_gate_in_kernel: g = −e^{A_log} softplus(g + dt_bias) (or the lower-bound form);
    use_beta_sigmoid_in_kernel with allow_neg_eigval: β = 2 sigmoid(β)."""
    q, k, v, raw, beta, S0 = make(per_channel=True, seed=5)
    A_log, dt_bias = torch.randn(4), torch.randn(4 * 16)
    out, S = fla_compat.chunk_kda(q, k, v, raw, beta, initial_state=S0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                                  use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    gate = -A_log.exp().view(4, 1) * torch.nn.functional.softplus(raw + dt_bias.view(4, 16))
    ref_out, ref_S = expected(q, k, v, gate, 2 * torch.sigmoid(beta), S0)
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(S, ref_S, 1e-5, "final state")
    bounded = fla_compat.kda_gate(raw, A_log, dt_bias, lower_bound=-5.0)
    assert torch.allclose(bounded, -5.0 * torch.sigmoid(A_log.exp().view(4, 1) * (raw + dt_bias.view(4, 16))))


def test_gradients_match_the_recurrence():
    inputs = [x.double().requires_grad_() for x in make(T=40, per_channel=True, seed=6)]
    out, S = fla_compat.chunk_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
    ref_out, ref_S = expected(*inputs)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum() + S.sum(), inputs)
    want = torch.autograd.grad((ref_out * w).sum() + ref_S.sum(), inputs)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), got, want):
        assert_close(a, b, 1e-9, f"grad {name}")


def test_compiles_with_fullgraph():
    q, k, v, gate, beta, S0 = make(seed=7)

    def f(*args):
        return fla_compat.chunk_gated_delta_rule(*args[:5], initial_state=args[5], output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)

    eager = f(q, k, v, gate, beta, S0)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, gate, beta, S0)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option, value", [("return_intermediate_states", True), ("state_v_first", True),
                                           ("head_first", True)])
def test_options_it_does_not_implement_raise_naming_them(option, value):
    q, k, v, gate, beta, _ = make(T=5)
    with pytest.raises(NotImplementedError, match=option):
        fla_compat.chunk_gated_delta_rule(q, k, v, gate, beta, **{option: value})
    fla_compat.chunk_gated_delta_rule(q, k, v, gate, beta, chunk_size=64, disable_recompute=True)  # hints pass


def test_bad_shapes_raise_naming_them():
    q, k, v, gate, beta, _ = make(T=5, H=3, HV=4)
    with pytest.raises(ValueError, match="multiple of q and k's"):
        fla_compat.chunk_gated_delta_rule(q, k, v, gate, beta)
    q, k, v, gate, beta, _ = make(T=5)
    with pytest.raises(ValueError, match=r"g must be \(B, T, HV, K\)"):
        fla_compat.chunk_kda(q, k, v, gate, beta)
    with pytest.raises(ValueError, match="batch of 1"):
        fla_compat.chunk_gated_delta_rule(q, k, v, gate, beta, cu_seqlens=torch.tensor([0, 5]))


def test_agrees_with_flash_linear_attentions_naive_references():
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    naive_kda = pytest.importorskip("fla.ops.kda.naive")
    q, k, v, gate, beta, S0 = make(H=4, seed=8)
    q, k = l2_normalize(q), l2_normalize(k)
    out, S = fla_compat.chunk_gated_delta_rule(q, k, v, gate, beta, initial_state=S0, output_final_state=True)
    ref_out, ref_S = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, gate, initial_state=S0,
                                                            output_final_state=True)
    assert_close(out, ref_out.double(), 1e-5, "out vs fla")
    assert_close(S, ref_S.double(), 1e-5, "state vs fla")
    q, k, v, gate, beta, S0 = make(H=4, per_channel=True, seed=9)
    q, k = l2_normalize(q), l2_normalize(k)
    out, S = fla_compat.chunk_kda(q, k, v, gate, beta, initial_state=S0, output_final_state=True)
    ref_out, ref_S = naive_kda.naive_recurrent_kda(q, k, v, gate, beta, initial_state=S0, output_final_state=True)
    assert_close(out, ref_out.double(), 1e-5, "KDA out vs fla")
    assert_close(S, ref_S.double(), 1e-5, "KDA state vs fla")


# --- transformers' own layers ---------------------------------------------------------------------

def qwen3_next():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3NextConfig"):
        pytest.skip("this transformers has no Qwen3-Next")
    config = transformers.Qwen3NextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, full_attention_interval=2)
    return transformers.AutoModelForCausalLM.from_config(config)


def kimi_linear():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "KimiLinearConfig"):
        pytest.skip("this transformers has no Kimi Linear")
    config = transformers.KimiLinearConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        layer_types=["linear_attention", "full_attention"], linear_head_dim=16, linear_num_heads=4,
        linear_conv_kernel_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("build", [qwen3_next, kimi_linear])
def test_pretrained_hybrids_run_their_layers_on_linattn(build, monkeypatch):
    """The model's chunked and one-token kernel functions are replaced (2), its logits and greedy
    generation (prefill, then one-token steps from the cached state) equal its own PyTorch path,
    the calls reach linattn, and restore_fla_compat puts the originals back."""
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(3, 97, (2, 70))
    calls = []
    original = fla_compat._delta_rule
    monkeypatch.setattr(fla_compat, "_delta_rule", lambda *a, **kw: calls.append(a[0]) or original(*a, **kw))
    try:
        with torch.no_grad():
            want = model(ids).logits
            want_tokens = model.generate(ids[:, :20], max_new_tokens=8, do_sample=False)
            assert not calls
            assert linattn.hf.use_fla_compat(model) == 2
            assert linattn.hf.use_fla_compat(model) == 0  # (already routed)
            got = model(ids).logits
            got_tokens = model.generate(ids[:, :20], max_new_tokens=8, do_sample=False)
    finally:
        assert linattn.hf.restore_fla_compat() == 2
    assert {name.startswith("chunk") for name in calls} == {True, False}  # prefill chunks, one-token steps
    assert_close(got, want.double(), 1e-5, "logits")
    assert torch.equal(got_tokens, want_tokens)


# --- Gated DeltaProduct ------------------------------------------------------------------------------

def delta_product_expected(q, k, v, g, beta, n, S0=None, scale=None, normalize=False):
    """float64: per token, S ×= e^{g_t}, then n delta steps S += β k (v − Sᵀk)ᵀ, then o_t = scale · Sᵀq_t."""
    q, k, v, beta = (x.double() for x in (q, k, v, beta))
    if normalize:
        q, k = l2_normalize(q), l2_normalize(k)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if S0 is None else S0.double().clone()
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].double().exp()[..., None, None]
        for j in range(t * n, t * n + n):
            error = v[:, j] - torch.einsum("bhkv,bhk->bhv", S, k[:, j])
            S = S + beta[:, j, :, None, None] * k[:, j, :, :, None] * error[:, :, None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1), S


def delta_product_inputs(B=2, T=23, H=2, K=16, V=24, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = l2_normalize(torch.randn(B, T * n, H, K, generator=gen))
    v = torch.randn(B, T * n, H, V, generator=gen)
    beta = torch.rand(B, T * n, H, generator=gen)
    g = -0.3 * torch.rand(B, T, H, generator=gen)
    S0 = torch.randn(B, H, K, V, generator=gen)
    return q, k, v, g, beta, S0


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("gated", [True, False])
def test_gated_delta_product_matches_the_recurrence(n, gated):
    q, k, v, g, beta, S0 = delta_product_inputs(n=n, seed=20 + n)
    g = g if gated else None
    out, S = fla_compat.chunk_gated_delta_product(q, k, v, g, beta, n, initial_state=S0, output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True)
    ref_out, ref_S = delta_product_expected(q, k, v, g, beta, n, S0, normalize=True)
    assert out.shape == (2, 23, 2, 24) and out.is_contiguous()
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(S, ref_S, 1e-5, "final state")


def test_gated_delta_product_packed_sequences_and_gradients():
    n = 2
    cu = torch.tensor([0, 9, 23], dtype=torch.long)
    q, k, v, g, beta, _ = (x.double().requires_grad_() for x in delta_product_inputs(B=1, n=n, seed=25))
    S0 = torch.randn(2, 2, 16, 24, dtype=torch.float64, requires_grad=True)
    out, S = fla_compat.chunk_gated_delta_product(q, k, v, g, beta, n, scale=0.4, initial_state=S0,
                                                  output_final_state=True, cu_seqlens=cu)
    pieces = [delta_product_expected(q[:, a:b], k[:, a * n:b * n], v[:, a * n:b * n], g[:, a:b],
                                     beta[:, a * n:b * n], n, S0[i:i + 1], scale=0.4)
              for i, (a, b) in enumerate([(0, 9), (9, 23)])]
    ref_out, ref_S = torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 0)
    assert_close(out, ref_out, 1e-9, "out")
    assert_close(S, ref_S, 1e-9, "final states")
    w = torch.randn_like(out)
    leaves = [q, k, v, g, beta, S0]
    got = torch.autograd.grad((out * w).sum() + S.sum(), leaves)
    want = torch.autograd.grad((ref_out * w).sum() + ref_S.sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), got, want):
        assert_close(a, b, 1e-9, f"grad {name}")


def test_gated_delta_product_bad_input_raises_naming_it():
    q, k, v, g, beta, _ = delta_product_inputs(T=5, n=2)
    with pytest.raises(ValueError, match="num_householder"):
        fla_compat.chunk_gated_delta_product(q, k, v, g, beta, 0)
    with pytest.raises(ValueError, match="k must be"):
        fla_compat.chunk_gated_delta_product(q, k, v, g, beta, 3)
    with pytest.raises(ValueError, match="g must be"):
        fla_compat.chunk_gated_delta_product(q, k, v, g[:, :3], beta, 2)


def test_gated_delta_product_agrees_with_flash_linear_attentions_naive_reference():
    naive = pytest.importorskip("fla.ops.gated_delta_product.naive")
    q, k, v, g, beta, S0 = delta_product_inputs(n=2, seed=26)
    out, S = fla_compat.chunk_gated_delta_product(q, k, v, g, beta, 2, initial_state=S0, output_final_state=True)
    ref_out, ref_S = naive.naive_recurrent_gated_delta_product(q, k, v, g, beta, 16 ** -0.5, initial_state=S0,
                                                                output_final_state=True, num_householder=2)
    assert_close(out, ref_out.double(), 1e-5, "out vs fla")
    assert_close(S, ref_S.double(), 1e-5, "final state vs fla")
