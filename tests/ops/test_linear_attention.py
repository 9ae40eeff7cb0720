"""linattn.linear_attention against the float64 reference of docs/methods.md §1, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import linattn
from linattn import reference
from conftest import TOLERANCE, assert_close


def make_inputs(B, H, Tq, Tk, m, dv, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, m, generator=g).to(dtype)
    k = torch.randn(B, H, Tk, m, generator=g).to(dtype)
    v = torch.randn(B, H, Tk, dv, generator=g).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def random_state(B, H, m, dv, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, H, m, dv, generator=g, dtype=dtype)
    z = torch.rand(B, H, m, generator=g, dtype=dtype) * 3
    return S.requires_grad_(), z.requires_grad_()


def check_against_reference(q, k, v, tol, initial_state=None, **options):
    """Forward, final state and every gradient (through out and the final state)."""
    out, (S, z) = linattn.linear_attention(q, k, v, initial_state=initial_state, output_final_state=True, **options)
    ref, (S_ref, z_ref) = reference.linear_attention(q, k, v, initial_state=initial_state, **options)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert S.dtype == z.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_close(out, ref, tol, "out")
    assert_close(S, S_ref, tol, "final S")
    assert_close(z, z_ref, tol, "final z")

    g = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (ref, S_ref, z_ref)]
    inputs = [t for t in (q, k, v) + tuple(initial_state or ()) if t.requires_grad]
    loss = sum((a.double() * c).sum() for a, c in zip((out, S, z), cotangents))
    loss_ref = sum((a * c).sum() for a, c in zip((ref, S_ref, z_ref), cotangents))
    grads = torch.autograd.grad(loss, inputs)
    grads_ref = torch.autograd.grad(loss_ref, inputs)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a.dtype == inputs[i].dtype
        assert_close(a, b, tol, f"grad of input {i}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 1000])
@pytest.mark.parametrize("D", [16, 60, 64, 128])
def test_float32_sizes(linear_implementation, causal, T, D):
    B, H = (2, 3) if T < 1000 else (1, 1)  # batch·heads above and below the core count
    q, k, v = make_inputs(B, H, T, T, D, D)
    check_against_reference(q, k, v, TOLERANCE[torch.float32], causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(linear_implementation, causal, dtype):
    q, k, v = make_inputs(2, 2, 131, 131, 32, 48, dtype=dtype)
    check_against_reference(q, k, v, TOLERANCE[dtype], causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_feature_maps_and_normalize(linear_implementation, causal, normalize, feature_map):
    q, k, v = make_inputs(1, 3, 97, 97, 24, 24)
    check_against_reference(q, k, v, TOLERANCE[torch.float32], causal=causal, normalize=normalize,
                            feature_map=feature_map)


@pytest.mark.parametrize("causal", [False, True])
def test_identity_and_prefeaturized(linear_implementation, causal):
    q, k, v = make_inputs(2, 2, 70, 70, 16, 20)
    check_against_reference(q, k, v, TOLERANCE[torch.float32], causal=causal, feature_map="identity",
                            normalize=False)
    # feature_map=None: q and k are features already (positive here, so normalizing is fine).
    pq, pk = (torch.rand_like(t).requires_grad_() for t in (q, k))
    check_against_reference(pq, pk, v, TOLERANCE[torch.float32], causal=causal, feature_map=None)


@pytest.mark.parametrize("causal", [False, True])
def test_callable_feature_map_with_m_not_dv(linear_implementation, causal):
    def doubled(x):  # m = 2·D features, unlike dv
        return torch.cat([F.elu(x) + 1, torch.sigmoid(x)], dim=-1)

    q, k, v = make_inputs(2, 2, 66, 66, 12, 40)
    check_against_reference(q, k, v, TOLERANCE[torch.float32], causal=causal, feature_map=doubled)


def test_cross_attention_lengths(linear_implementation):
    q, k, v = make_inputs(2, 3, 37, 100, 16, 24)
    check_against_reference(q, k, v, TOLERANCE[torch.float32], causal=False)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(linear_implementation, causal):
    T = 90
    q, k, v = make_inputs(3, 2, T, T, 16, 16)
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[0, 60:] = True  # right padding
    mask[1, :] = True  # every key padded: outputs are 0 and the state is empty
    mask[2, ::3] = True  # scattered
    check_against_reference(q, k, v, TOLERANCE[torch.float32], causal=causal, key_padding_mask=mask)
    out = linattn.linear_attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_initial_state_gradients(linear_implementation, causal):
    q, k, v = make_inputs(2, 2, 75, 75, 16, 8)
    state = random_state(2, 2, 16, 8)
    check_against_reference(q, k, v, TOLERANCE[torch.float32], initial_state=state, causal=causal)


@pytest.mark.parametrize("split", [1, 64, 100])
def test_state_chaining_equals_whole_sequence(linear_implementation, split):
    T = 161
    q, k, v = make_inputs(2, 3, T, T, 16, 24, requires_grad=False)
    whole, (S, z) = linattn.linear_attention(q, k, v, causal=True, output_final_state=True)
    first, state = linattn.linear_attention(
        q[:, :, :split], k[:, :, :split], v[:, :, :split], causal=True, output_final_state=True)
    second, (S2, z2) = linattn.linear_attention(
        q[:, :, split:], k[:, :, split:], v[:, :, split:], causal=True, initial_state=state,
        output_final_state=True)
    assert_close(torch.cat([first, second], dim=2), whole, 1e-6, "chained output")
    assert_close(S2, S, 1e-6, "chained S")
    assert_close(z2, z, 1e-6, "chained z")


def test_state_chaining_gradients(linear_implementation):
    T, split = 130, 57
    q, k, v = make_inputs(1, 2, T, T, 8, 8)
    whole = linattn.linear_attention(q, k, v, causal=True)
    grads_whole = torch.autograd.grad(whole.square().sum(), (q, k, v))
    first, state = linattn.linear_attention(
        q[:, :, :split], k[:, :, :split], v[:, :, :split], causal=True, output_final_state=True)
    second = linattn.linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], causal=True,
                                      initial_state=state)
    grads = torch.autograd.grad(first.square().sum() + second.square().sum(), (q, k, v))
    for a, b in zip(grads, grads_whole):
        assert_close(a, b, 1e-5, "chained gradient")


@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs_without_copies(linear_implementation, causal):
    B, T, H, D = 2, 77, 3, 16
    g = torch.Generator().manual_seed(3)
    # (B, T, H, D) storage viewed as (B, H, T, D), and a last dim with stride 2.
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, H, 2 * D, generator=g).transpose(1, 2)[..., ::2].detach().requires_grad_()
    v = torch.randn(B, T, H, D, generator=g).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous() and k.stride(-1) == 2
    check_against_reference(q, k, v, TOLERANCE[torch.float32], causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_empty_sequence(linear_implementation, causal):
    q, k, v = make_inputs(2, 3, 0, 0, 8, 5)
    out, (S, z) = linattn.linear_attention(q, k, v, causal=causal, output_final_state=True)
    assert out.shape == (2, 3, 0, 5)
    assert (S == 0).all() and (z == 0).all() and S.shape == (2, 3, 8, 5)
    grads = torch.autograd.grad(out.sum() + S.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_no_keys_cross_attention(linear_implementation):
    q, k, v = make_inputs(1, 2, 5, 0, 8, 4)
    out = linattn.linear_attention(q, k, v)
    assert out.shape == (1, 2, 5, 4) and (out == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(linear_implementation, causal, normalize):
    q, k, v = make_inputs(1, 2, 9, 9, 3, 4, dtype=torch.float64)
    S, z = random_state(1, 2, 3, 4, dtype=torch.float64)

    def fn(q, k, v, S, z):
        out, (S1, z1) = linattn.linear_attention(q, k, v, causal=causal, normalize=normalize,
                                                 initial_state=(S, z), output_final_state=True)
        return out, S1, z1

    assert torch.autograd.gradcheck(fn, (q, k, v, S, z))


@pytest.mark.parametrize("feature_map", ["elu", "relu", None])
def test_nan_propagates_without_crash(linear_implementation, feature_map):
    q, k, v = make_inputs(1, 1, 10, 10, 4, 4, requires_grad=False)
    q[0, 0, 3, 1] = float("nan")
    out = linattn.linear_attention(q.abs(), k.abs(), v, causal=True, feature_map=feature_map) if feature_map is None \
        else linattn.linear_attention(q, k, v, causal=True, feature_map=feature_map)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, :3]).all()
    k[0, 0, 5, 0] = float("nan")  # a NaN key reaches every later query
    out = linattn.linear_attention(q, k, v, causal=True, feature_map="elu")
    assert torch.isnan(out[0, 0, 5:]).all() and torch.isfinite(out[0, 0, :3]).all()


def test_cpu_kernel_equals_generic():
    """The fused CPU kernel and the device-generic path agree closely in float32."""
    q, k, v = make_inputs(2, 4, 300, 300, 32, 32, requires_grad=False)
    for causal in (False, True):
        fused = linattn.linear_attention(q, k, v, causal=causal)
        with linattn.ops.generic_implementation():
            generic = linattn.linear_attention(q, k, v, causal=causal)
        assert_close(fused, generic, 1e-6, "fused vs generic")
