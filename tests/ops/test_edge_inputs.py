"""Edge inputs never give a silently wrong result: mixed devices, bad calls seen by the fake
kernels, non-finite values at masked positions, deep-negative elu+1 features, vanishing
normalizers and second derivatives."""
import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import linattn
from linattn import reference
from conftest import assert_close

FORWARD_OPS = ["linear_attn_fwd", "linear_attn_fwd_generic"]
BACKWARD_OPS = ["linear_attn_bwd", "linear_attn_bwd_generic"]


def qkv(B=2, H=2, T=10, D=4, dv=None, seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, T, D), (B, H, T, D), (B, H, T, dv or D))
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad) for s in shapes]


# --- item: every kernel (CPU, generic, Meta/fake) refuses the same calls -----------------------

BAD_FORWARD_CALLS = {
    "feature map code": (lambda q, k, v: (q, k, v, None, None, 7, False, True, 1e-6), r"feature_map code must be"),
    "negative eps": (lambda q, k, v: (q, k, v, None, None, 1, False, True, -1e-6), r"eps must be a finite number > 0"),
    "zero eps": (lambda q, k, v: (q, k, v, None, None, 1, False, True, 0.0), r"eps must be a finite number > 0"),
    "nan eps": (lambda q, k, v: (q, k, v, None, None, 1, False, True, math.nan), r"eps must be a finite number > 0"),
    "head dim": (lambda q, k, v: (q, k[..., :3], v, None, None, 1, False, True, 1e-6), r"same head dim"),
    "lengths": (lambda q, k, v: (q, k, v[:, :, :4], None, None, 1, False, True, 1e-6), r"same length"),
    "causal lengths": (lambda q, k, v: (q[:, :, :3], k, v, None, None, 1, True, True, 1e-6), r"as many queries"),
    "state shape": (lambda q, k, v: (q, k, v, q.new_zeros(2, 2, 4, 4), None, 1, False, True, 1e-6),
                    re.escape("initial_state must have shape [2, 2, 4, 5]")),
    "state dtype": (lambda q, k, v: (q, k, v, q.new_zeros(2, 2, 4, 5, dtype=torch.float64), None, 1, False, True, 1e-6),
                    r"initial_state must be Float"),
    "mask dtype": (lambda q, k, v: (q, k, v, None, q.new_zeros(2, 10), 1, False, True, 1e-6), r"key_padding_mask must be a bool"),
    "mask shape": (lambda q, k, v: (q, k, v, None, q.new_zeros(2, 9, dtype=torch.bool), 1, False, True, 1e-6),
                   re.escape("key_padding_mask must have shape [2, 10]")),
    "int inputs": (lambda q, k, v: (q.long(), k.long(), v.long(), None, None, 1, False, True, 1e-6), r"q must be float32"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD_CALLS))
@pytest.mark.parametrize("name", FORWARD_OPS)
@pytest.mark.parametrize("device", ["cpu", "meta", "fake"])
def test_every_kernel_refuses_the_same_forward_calls(case, name, device):
    make_args, message = BAD_FORWARD_CALLS[case]
    op = getattr(torch.ops.linattn, name)
    q, k, v = qkv()
    if device == "meta":
        q, k, v = q.to("meta"), k.to("meta"), v.to("meta")
    mode = FakeTensorMode() if device == "fake" else None
    if mode is not None:
        q, k, v = (mode.from_tensor(t) for t in (q, k, v))
        with mode, pytest.raises(RuntimeError, match=message):
            op(*make_args(q, k, v))
        return
    with pytest.raises(RuntimeError, match=message):
        op(*make_args(q, k, v))


@pytest.mark.parametrize("name", BACKWARD_OPS)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_every_kernel_refuses_the_same_backward_calls(name, device):
    q, k, v = qkv()
    out, state, normalizer = torch.ops.linattn.linear_attn_fwd(q, k, v, None, None, 1, True, True, 1e-6)
    args = [out, None, q, k, v, out, normalizer, None, None, 1, True, True]
    if device == "meta":
        args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    op = getattr(torch.ops.linattn, name)
    bad = {1: (args[6].new_zeros(2, 2, 4, 4), r"grad_final_state must have shape"),
           6: (args[6].double(), r"normalizer must be Float"),
           0: (args[0][:, :, :3], r"grad_out must have shape"),
           9: (7, r"feature_map code")}
    for index, (value, message) in bad.items():
        call = list(args)
        call[index] = value
        with pytest.raises(RuntimeError, match=message):
            op(*call)


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_mixed_meta_and_cpu_arguments_are_refused(name):
    op = getattr(torch.ops.linattn, name)
    q, k, v = qkv()
    state = torch.zeros(2, 2, 4, 5)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    calls = [
        ((q, k.to("meta"), v, None, None), r"k and q must be on the same device, got meta and cpu"),
        ((q.to("meta"), k, v, None, None), r"k and q must be on the same device, got cpu and meta"),
        ((q, k, v.to("meta"), None, None), r"v and q must be on the same device"),
        ((q, k, v, state.to("meta"), None), r"initial_state and q must be on the same device"),
        ((q, k, v, None, mask.to("meta")), r"key_padding_mask and q must be on the same device"),
    ]
    for tensors, message in calls:
        with pytest.raises(RuntimeError, match=message):
            op(*tensors, 1, False, True, 1e-6)


def test_mixed_devices_in_backward_are_refused():
    q, k, v = qkv()
    out, state, normalizer = torch.ops.linattn.linear_attn_fwd(q, k, v, None, None, 1, False, True, 1e-6)
    for op in (torch.ops.linattn.linear_attn_bwd, torch.ops.linattn.linear_attn_bwd_generic):
        with pytest.raises(RuntimeError, match=r"grad_out and q must be on the same device"):
            op(out.to("meta"), None, q, k, v, out, normalizer, None, None, 1, False, True)
        with pytest.raises(RuntimeError, match=r"normalizer and q must be on the same device"):
            op(out, None, q, k, v, out, normalizer.to("meta"), None, None, 1, False, True)


def test_fake_kernel_traces_symbolic_sizes():
    """torch.compile(dynamic=True) runs the C++ Meta kernels on symbolic sizes."""
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: linattn.linear_attention(q, k, v, causal=True), fullgraph=True, dynamic=True)
    for T in (5, 9, 70):
        q, k, v = qkv(T=T)
        assert_close(fn(q, k, v), linattn.linear_attention(q, k, v, causal=True), 1e-6, f"T={T}")


# --- item: non-finite values at masked positions never reach a query --------------------------

def _sanitized(t, index, value=0.0):
    t = t.detach().clone()
    t[index] = value
    return t


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("position", [0, 5, 63, 64, 99])
def test_causal_non_finite_value_reaches_only_later_rows(bad, position, linear_implementation):
    q, k, v = qkv(B=1, H=2, T=100, D=8, dv=6)
    v_bad = _sanitized(v, (0, 1, position, 2), bad)
    out = linattn.linear_attention(q, k, v_bad, causal=True)
    clean = linattn.linear_attention(q, k, _sanitized(v_bad, (0, 1, position, 2)), causal=True)
    before, after = out[:, :, :position], out[0, 1, position:, 2]
    assert torch.equal(torch.isfinite(out[0, 0]), torch.ones_like(out[0, 0], dtype=torch.bool))  # other head
    assert torch.isfinite(before).all(), f"a non-finite value at {position} reached an earlier row"
    assert_close(before, clean[:, :, :position], 1e-6, "rows before the bad value")
    assert not torch.isfinite(after).any(), "rows that see the bad value must not be finite"
    # Other columns of the same rows stay finite.
    assert torch.isfinite(out[0, 1, :, [0, 1, 3, 4, 5]]).all()
    expected, _ = reference.linear_attention(q, k, v_bad, causal=True)
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("position", [3, 63, 64, 70])
def test_causal_backward_keeps_non_finite_inputs_to_the_rows_that_see_them(where, position, linear_implementation):
    """A NaN in row `position` of q, k or v, with a loss on every row that cannot see it: the
    gradients of the positions that do not interact with it equal those of a finite input."""
    q, k, v = qkv(B=1, H=1, T=100, D=8, dv=6)
    inputs = {"q": q, "k": k, "v": v}
    index = (0, 0, position, 1)
    grads = {}
    for name, value in (("nan", math.nan), ("finite", 0.3)):
        leaves = {n: (_sanitized(t, index, value) if n == where else t.detach().clone()).requires_grad_()
                  for n, t in inputs.items()}
        out = linattn.linear_attention(leaves["q"], leaves["k"], leaves["v"], causal=True)
        # Rows that see the NaN: all rows >= position for k, v; only the row itself for q.
        seeing = torch.zeros(100, dtype=torch.bool)
        if where == "q":
            seeing[position] = True
        else:
            seeing[position:] = True
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).masked_fill(
            seeing[None, None, :, None], 0.0)
        grads[name] = torch.autograd.grad((out * cotangent).sum(), (leaves["q"], leaves["k"], leaves["v"]))
    # Positions that never meet the NaN: with a NaN query, the other queries and the keys after
    # it (the keys it sees meet it in 0·NaN, a genuine NaN); with a NaN key or value, the queries
    # before it and every other key.
    for label, got, want in zip("qkv", grads["nan"], grads["finite"]):
        keep = torch.ones(100, dtype=torch.bool)
        if where == "q" and label in "kv":
            keep[: position + 1] = False
        elif where != "q" and label == "q":
            keep[position:] = False
        else:
            keep[position] = False
        got, want = got[0, 0, keep], want[0, 0, keep]
        assert torch.isfinite(got).all(), f"NaN in {where}[{position}] leaked into d{label}"
        assert_close(got, want, 1e-5, f"d{label} with a NaN in {where}")


@pytest.mark.parametrize("causal", [False, True])
def test_padded_key_with_non_finite_value_is_excluded(causal, linear_implementation):
    q, k, v = qkv(B=2, H=2, T=70, D=8, dv=5, requires_grad=False)
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[0, 10] = mask[1, 69] = True
    v_bad, k_bad = v.clone(), k.clone()
    v_bad[0, :, 10] = math.nan
    v_bad[1, :, 69] = math.inf
    k_bad[1, :, 69] = math.nan
    leaves = [t.clone().requires_grad_() for t in (q, k_bad, v_bad)]
    out, (S, z) = linattn.linear_attention(*leaves, causal=causal, key_padding_mask=mask, output_final_state=True)
    expected, (S_ref, z_ref) = reference.linear_attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert_close(out, expected, 1e-5, "out")
    assert_close(S, S_ref, 1e-5, "S")
    assert_close(z, z_ref, 1e-5, "z")
    grads = torch.autograd.grad(out.sum() + S.sum() + z.sum(), leaves)
    for name, grad in zip("qkv", grads):
        assert torch.isfinite(grad).all(), f"d{name}"
    assert (grads[1][0, :, 10] == 0).all() and (grads[2][1, :, 69] == 0).all()


def test_reference_excludes_masked_terms():
    q, k, v = qkv(B=1, H=1, T=6, D=3)
    v[0, 0, 4, 0] = math.inf
    out, _ = reference.linear_attention(q, k, v, causal=True)
    assert torch.isfinite(out[0, 0, :4]).all() and torch.isinf(out[0, 0, 4:, 0]).all()


def test_performer_padded_keys_never_overflow_into_gradients():
    q, k, v = qkv(B=1, H=2, T=12, D=16)
    k = k.clone()
    k[0, :, -3:] = 40.0  # padded keys far above the others: exp would overflow
    k.requires_grad_()
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, -3:] = True
    W = linattn.random_features(32, 16, generator=torch.Generator().manual_seed(0))
    out = linattn.performer_attention(q, k, v, W, key_padding_mask=mask)
    (grad,) = torch.autograd.grad(out.sum(), k)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert (grad[0, :, -3:] == 0).all()


# --- item: elu+1 is exp(x) for x <= 0, identical on every path --------------------------------

def test_elu_feature_map_is_exp_down_to_the_smallest_normal():
    x = torch.cat([torch.linspace(-110.0, -80.0, 3001), torch.linspace(-80.0, 5.0, 3001)])
    n = x.numel()
    # One key per batch entry and one feature: with normalize=False, out_b = φ(0) φ(x_b) · 1.
    q = torch.zeros(n, 1, 1, 1)
    k = x.view(n, 1, 1, 1)
    v = torch.ones(n, 1, 1, 1)
    got = {name: getattr(torch.ops.linattn, name)(q, k, v, None, None, 1, False, False, 1e-6)[0].flatten()
           for name in FORWARD_OPS}
    xs = x.double()
    expected = torch.where(xs > 0, xs + 1, xs.exp()).float()
    normal = expected.abs() >= torch.finfo(torch.float32).tiny
    for name, value in got.items():
        assert torch.isfinite(value).all()
        assert torch.allclose(value[normal], expected[normal], rtol=4e-7, atol=0), name
        # Below the normal range: within the smallest normal float of exp(x), never negative.
        assert (value[~normal] - expected[~normal]).abs().max() <= torch.finfo(torch.float32).tiny, name
        assert (value >= 0).all()
    # The CPU kernel and the device-generic path agree to a few ulp (and below FLT_MIN).
    assert torch.allclose(got[FORWARD_OPS[0]], got[FORWARD_OPS[1]], rtol=4e-7, atol=torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_features_below_exps_range_vanish_on_every_path(dtype):
    """Queries around -100: elu+1 = e^-100 underflows float32's normal range. The CPU kernel's
    exp gives 0 there (it gave FLT_MIN, 1e30 times e^-100), so with a tiny eps the row matches
    the float64 reference and the device-generic path; and when eps itself underflows (1e-50),
    the row's normalizer vanishes and it is 0 on both paths."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 6, 4, generator=g)
    q[:, :, 2] = -100.0 + torch.rand(1, 2, 4, generator=g)
    q = q.to(dtype)
    k = torch.randn(1, 2, 6, 4, generator=g).to(dtype)
    v = torch.randn(1, 2, 6, 4, generator=g).to(dtype)
    for causal in (False, True):
        expected, _ = linattn.reference.linear_attention(q.double(), k.double(), v.double(), causal=causal, eps=1e-30)
        for generic in (False, True):
            with linattn.ops.generic_implementation(generic):
                out = linattn.linear_attention(q, k, v, causal=causal, eps=1e-30).double()
                vanished = linattn.linear_attention(q, k, v, causal=causal, eps=1e-50)
            assert (out[:, :, 2] - expected[:, :, 2]).abs().max() < 1e-9, (causal, generic)
            assert (vanished[:, :, 2] == 0).all(), (causal, generic)


def test_elu_feature_map_gradient_is_exp():
    x = torch.tensor([-100.0, -50.0, -17.5, -1.0, 0.5], dtype=torch.float64)
    q = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    for generic in (False, True):
        with linattn.ops.generic_implementation(generic):
            for value in x:
                k = value.view(1, 1, 1, 1).clone().requires_grad_()
                out = linattn.linear_attention(q, k, torch.ones_like(k), normalize=False)
                (grad,) = torch.autograd.grad(out.sum(), k)
                expected = 1.0 if value > 0 else math.exp(value)
                assert grad.item() == pytest.approx(expected, rel=1e-12)


# --- item: eps > 0, and a normalizer of exactly 0 gives 0 -------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_vanishing_normalizer_gives_zero_output_and_gradients(causal, linear_implementation):
    q, k, v = qkv(B=1, H=1, T=20, D=4, requires_grad=False)
    q = -q.abs() - 0.1  # relu(q) = 0: these queries match no key
    q[0, 0, ::2] = q[0, 0, ::2].abs()  # every other query matches some keys
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = linattn.linear_attention(*leaves, causal=causal, feature_map="relu", eps=1e-50)  # 1e-50 -> 0 in float32
    assert torch.isfinite(out).all()
    assert (out[0, 0, 1::2] == 0).all()
    grads = torch.autograd.grad(out.square().sum(), leaves)
    for grad in grads:
        assert torch.isfinite(grad).all()
    assert (grads[0][0, 0, 1::2] == 0).all()
    expected, _ = reference.linear_attention(q, k, v, causal=causal, feature_map="relu", eps=1e-50)
    assert_close(out, expected, 1e-5, "out")


@pytest.mark.parametrize("eps", [0, 0.0, -1e-6, math.inf, math.nan])
def test_eps_must_be_positive_and_finite(eps):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0"):
        linattn.linear_attention(q, k, v, eps=eps)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0"):
        linattn.performer_attention(q, k, v, linattn.random_features(8, 4), eps=eps)
    with pytest.raises(ValueError, match=r"eps must be a finite float > 0"):
        linattn.nn.MultiheadAttention(8, 2, method="linear", eps=eps)


# --- item: second derivatives raise -----------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_double_backward_raises(causal, linear_implementation):
    q, k, v = qkv(requires_grad=True)
    out = linattn.linear_attention(q, k, v, causal=causal)
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"second derivatives \(double backward\) are not implemented"):
        grad_q.sum().backward()


# --- item: validation gaps: the documented result or a clear error ---------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_performer_with_no_tokens_returns_empty(causal):
    q = torch.randn(1, 2, 0, 4, requires_grad=True)
    W = linattn.random_features(8, 4)
    mask = torch.zeros(1, 0, dtype=torch.bool)
    out = linattn.performer_attention(q, q, q, W, causal=causal, key_padding_mask=mask)
    assert out.shape == (1, 2, 0, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_performer_refuses_zero_head_dim_and_complex_projection():
    q = torch.randn(1, 2, 5, 0)
    with pytest.raises(ValueError, match=r"performer_attention: the head dim D of q and k must be at least 1"):
        linattn.performer_attention(q, q, torch.randn(1, 2, 5, 3), torch.randn(8, 0))
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"projection must be float32.*got torch.complex64"):
        linattn.performer_attention(q, k, v, linattn.random_features(8, 4).to(torch.complex64))


@pytest.mark.parametrize("args", [(True, 4), (4, True), (0, 4), (4.0, 4)])
def test_random_features_refuses_non_int_sizes(args):
    with pytest.raises(ValueError, match=r"linattn.random_features: (nb_features|dim) must be a positive int"):
        linattn.random_features(*args)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_zero_width_values_and_features(causal, normalize, linear_implementation):
    q, k, _ = qkv(requires_grad=True)
    v = torch.randn(2, 2, 10, 0, requires_grad=True)
    out = linattn.linear_attention(q, k, v, causal=causal, normalize=normalize)
    assert out.shape == (2, 2, 10, 0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, (q, k, v)))
    q0 = torch.randn(2, 2, 10, 0)
    out = linattn.linear_attention(q0, q0, torch.randn(2, 2, 10, 3), causal=causal)
    assert (out == 0).all()  # no features: every normalizer is eps and every numerator 0


def test_empty_batch_in_functional_ops(linear_implementation):
    q = torch.randn(0, 2, 5, 4, requires_grad=True)
    out = linattn.linear_attention(q, q, q, causal=True)
    assert out.shape == (0, 2, 5, 4)
    out.sum().backward()
    assert linattn.performer_attention(q, q, q, linattn.random_features(8, 4)).shape == (0, 2, 5, 4)
    assert linattn.efficient_attention(q, q, q).shape == (0, 2, 5, 4)
