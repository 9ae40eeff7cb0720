"""Property-based fuzzing (hypothesis) of every public linear-attention entry point and raw op.

Each drawn case either raises a clear linattn error or equals an independent float64 reference
that excludes masked terms (linattn.reference): shapes around the chunk lengths (0-size too),
strides (transposed, zero-stride expanded, sliced, offset views), every dtype (plus ints, bool,
complex), meta and mixed devices, masks (all-padded rows too), initial states, eps down to
underflow, NaN/Inf placed anywhere, large float16 magnitudes; both the CPU kernel and the
device-generic implementation. Where the reference is not finite the result must not be either,
and where it is finite the result must be too, and close.

The number of cases per test is LINATTN_FUZZ_EXAMPLES (default 300, derandomized so CI runs the
same cases every time); run with --hypothesis-show-statistics for the counts.
"""
import math
import os

import pytest
import torch

import linattn
from linattn import ops, reference
from conftest import LINEAR_IMPLEMENTATIONS, TOLERANCE, relative_error, use_implementation

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("LINATTN_FUZZ_EXAMPLES", "300")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.complex64]
LENGTHS = st.one_of(st.sampled_from([0, 1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257]), st.integers(0, 140))
LAYOUTS = ["contiguous", "transposed", "expanded", "sliced", "offset"]


def _place(base: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """base (B, H, T, D) float64, returned with equal values in `layout` and `dtype`."""
    B, H, T, D = base.shape
    if layout == "transposed":  # a (B, T, H, D) activation viewed as (B, H, T, D)
        return base.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    if layout == "expanded" and B > 0 and bool((base == base[:1]).all() | base[:1].isnan().all()):
        return base[:1].to(dtype).expand(B, H, T, D)
    if layout == "sliced":  # stride 2 in the last dim
        wide = torch.zeros(B, H, T, 2 * D, dtype=dtype)
        wide[..., ::2] = base.to(dtype)
        return wide[..., ::2]
    if layout == "offset":  # a view that starts inside its storage
        big = torch.zeros(B, H, T + 5, D, dtype=dtype)
        big[:, :, 3:3 + T] = base.to(dtype)
        return big[:, :, 3:3 + T]
    return base.to(dtype).contiguous()


@st.composite
def cases(draw):
    causal = draw(st.booleans())
    B = draw(st.integers(0, 3))
    H = draw(st.integers(1, 3))
    Tq = draw(LENGTHS)
    Tk = Tq if causal else draw(LENGTHS)
    m = draw(st.sampled_from([1, 2, 3, 8, 16]))
    dv = draw(st.sampled_from([0, 1, 5, 8]))
    feature_map = draw(st.sampled_from(["elu", "relu", "identity"]))
    normalize = feature_map != "identity" and draw(st.booleans())
    return dict(
        B=B, H=H, Tq=Tq, Tk=Tk, m=m, dv=dv, causal=causal, feature_map=feature_map, normalize=normalize,
        eps=draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e-50])),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        scale=draw(st.sampled_from([1.0, 1.0, 0.01, 30.0])),
        mask=draw(st.sampled_from([None, "random", "all_padded_row"])),
        state=draw(st.booleans()),
        bad=[(draw(st.sampled_from("qkv")), draw(st.floats(0, 1)), draw(st.sampled_from([math.nan, math.inf, -math.inf])))
             for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2])))],
        seed=draw(st.integers(0, 2**16)),
        implementation=draw(st.sampled_from(LINEAR_IMPLEMENTATIONS)),
    )


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    shapes = {"q": (c["B"], c["H"], c["Tq"], c["m"]), "k": (c["B"], c["H"], c["Tk"], c["m"]),
              "v": (c["B"], c["H"], c["Tk"], c["dv"])}
    base = {name: torch.randn(shape, generator=g, dtype=torch.float64) * c["scale"] for name, shape in shapes.items()}
    if c["dtype"] == torch.float16 and c["normalize"] and c["scale"] == 1.0:
        base["v"] = base["v"] * 1000.0  # large float16 values (a normalized output stays below them)
    for name, where, value in c["bad"]:
        flat = base[name].view(-1)
        if flat.numel():
            flat[min(int(where * flat.numel()), flat.numel() - 1)] = value
    if any(layout == "expanded" for layout in c["layouts"]):
        for name in base:  # equal batch entries, so an expanded view holds the same values
            if c["B"] > 0:
                base[name] = base[name][:1].expand_as(base[name]).clone()
    tensors = [_place(base[n], layout, c["dtype"]) for n, layout in zip("qkv", c["layouts"])]
    mask = None
    if c["mask"] is not None:
        mask = torch.rand(c["B"], c["Tk"], generator=g) < 0.3
        if c["mask"] == "all_padded_row" and c["B"] > 0:
            mask[0] = True
    state = None
    if c["state"] and c["causal"]:
        acc = ops.accumulate_dtype(c["dtype"])
        state = (torch.randn(c["B"], c["H"], c["m"], c["dv"], generator=g, dtype=acc),
                 torch.rand(c["B"], c["H"], c["m"], generator=g, dtype=acc))
    return tensors, mask, state


def _compare(got, expected, dtype, what, tolerance=None):
    """got equals the float64 reference: non-finite exactly where the reference, rounded to got's
    dtype (a value beyond float16's range is Inf there), is; close elsewhere."""
    finite = torch.isfinite(expected.to(got.dtype))
    assert torch.equal(torch.isfinite(got), finite), f"{what}: finite where the reference is not, or not where it is"
    if finite.any():
        err = relative_error(got[finite], expected[finite])
        assert err <= (tolerance or FUZZ_TOLERANCE[dtype]), f"{what}: relative error {err:.2e}"


# Wider than the suite's tolerances: inputs scaled by 30 make elu features as small as e^-60,
# next to eps, where the result is ill-conditioned in any precision.
FUZZ_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 5e-2}


# The normalized output's gradient is a difference of two terms, through the numerator and
# through the normalizer, that can cancel to a small fraction of their size (with m = 1 the
# output does not depend on q at all, so dq is rounding noise around 0); half precision computes
# it from the saved output rounded to 8 or 11 bits (as flash attention does). So gradients are
# compared relative to the size of those two terms, which is what their rounding error scales
# with, rather than to their difference.
GRADIENT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _gradient_term_scales(q, k, v, state, cotangent, options):
    """|∂/∂x through the numerator| + |∂/∂x through the normalizer| of the float64 reference, per
    element of q, k, v (for normalize=False, just |the gradient|)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if not options["normalize"]:
        out, _ = reference.linear_attention(*leaves, initial_state=state, **options)
        return [g.abs() for g in torch.autograd.grad((out * cotangent).sum(), leaves)]
    plain = {**options, "normalize": False}
    numerator, _ = reference.linear_attention(*leaves, initial_state=state, **plain)
    ones = torch.ones_like(leaves[2][..., :1])
    S0 = None if state is None else (state[1][..., None], state[1])
    denominator = reference.linear_attention(leaves[0], leaves[1], ones, initial_state=S0, **plain)[0] + options["eps"]
    scales = None
    for out in (numerator / denominator.detach(), numerator.detach() / denominator):
        grads = torch.autograd.grad((out * cotangent).sum(), leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g.abs() for g, t in zip(grads, leaves)]
        scales = grads if scales is None else [a + b for a, b in zip(scales, grads)]
    return scales


@FUZZ
@given(cases())
def test_linear_attention_equals_reference_or_raises(c):
    (q, k, v), mask, state = _inputs(c)
    options = dict(causal=c["causal"], feature_map=c["feature_map"], normalize=c["normalize"], eps=c["eps"],
                   key_padding_mask=mask)
    with use_implementation(c["implementation"]):
        out, (S, z) = linattn.linear_attention(q, k, v, initial_state=state, output_final_state=True, **options)
    expected, (S_ref, z_ref) = reference.linear_attention(q, k, v, initial_state=state, **options)
    assert out.dtype == q.dtype and out.shape == expected.shape
    rows = torch.zeros_like(out, dtype=torch.bool)
    if c["normalize"] and c["dtype"] != torch.float64:
        # Rows whose normalizer underflows float32 (eps = 1e-50 rounds to 0 there, and the
        # features of scaled inputs can vanish) are defined as 0: finite, but not the float64 value.
        ones = torch.ones_like(v[..., :1], dtype=torch.float64)
        normalizer, _ = reference.linear_attention(
            q, k, ones, **{**options, "normalize": False},
            initial_state=None if state is None else (state[1][..., None], state[1]))
        rows = ((normalizer + c["eps"]).abs() < 1e-30).expand_as(out)
        assert torch.equal(torch.isfinite(out[rows]), torch.isfinite(expected[rows]))
        out, expected = out.masked_fill(rows, 0.0), expected.masked_fill(rows, 0.0)
    _compare(out, expected, c["dtype"], "out")
    _compare(S, S_ref, c["dtype"], "final S")
    _compare(z, z_ref, c["dtype"], "final z")
    if c["bad"] or rows.any():
        return  # (rows defined as 0 in float32 pass no gradient; the float64 reference's do)
    if c["dtype"] == torch.float16 and c["scale"] != 1.0:
        return  # gradients of large float16 values overflow float16 itself
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    g = torch.Generator().manual_seed(c["seed"] + 1)
    cotangent = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    with use_implementation(c["implementation"]):
        got = linattn.linear_attention(*leaves, initial_state=state, **options)
    grads = torch.autograd.grad((got.double() * cotangent).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.linear_attention(*ref_leaves, initial_state=state, **options)
    ref_grads = torch.autograd.grad((ref_out * cotangent).sum(), ref_leaves)
    scales = _gradient_term_scales(q, k, v, state, cotangent, options)
    for name, a, b, scale in zip("qkv", grads, ref_grads, scales):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"d{name}"
        bound = GRADIENT_TOLERANCE[c["dtype"]] * max(scale.norm().item(), 1e-2 * scale.numel() ** 0.5)
        err = (a.double() - b).norm().item()
        assert err <= bound, f"d{name}: error {err:.2e} > {bound:.2e} (the size of its terms x tolerance)"


@FUZZ
@given(st.data())
def test_bad_dtypes_and_devices_raise_clear_errors(data):
    kind = data.draw(st.sampled_from(["dtype", "device", "mask_dtype", "state_device"]))
    q, k, v = (torch.randn(2, 2, data.draw(st.integers(0, 70)), 4) for _ in range(3))
    which = data.draw(st.sampled_from([0, 1, 2]))
    tensors = [q, k, v]
    mask, state = None, None
    if kind == "dtype":
        dtype = data.draw(st.sampled_from(BAD_DTYPES))
        tensors[which] = tensors[which].to(dtype)
    elif kind == "device":
        tensors[which] = tensors[which].to("meta")
    elif kind == "mask_dtype":
        mask = torch.zeros(2, q.shape[2], dtype=data.draw(st.sampled_from([torch.int64, torch.uint8, torch.float32])))
    else:
        state = (torch.zeros(2, 2, 4, 4, device="meta"), torch.zeros(2, 2, 4))
    generic = data.draw(st.booleans())
    with ops.generic_implementation(generic), pytest.raises((TypeError, ValueError)) as info:
        linattn.linear_attention(*tensors, causal=True, key_padding_mask=mask, initial_state=state)
    assert "linattn.linear_attention" in str(info.value)


@FUZZ
@given(st.data())
def test_raw_ops_agree_on_what_is_valid_and_on_results(data):
    """CPU kernel, device-generic kernel and Meta kernel: all refuse a call, or all accept it
    (and then the two real ones agree)."""
    T = data.draw(LENGTHS)
    causal = data.draw(st.booleans())
    Tk = T if causal or data.draw(st.booleans()) else data.draw(LENGTHS)
    m, dv = data.draw(st.sampled_from([1, 4, 9])), data.draw(st.sampled_from([0, 3, 8]))
    q = torch.randn(2, 2, T, m)
    k = torch.randn(2, 2, Tk, data.draw(st.sampled_from([m, m, m + 1])))
    v = torch.randn(2, 2, data.draw(st.sampled_from([Tk, Tk, Tk + 1])), dv)
    code = data.draw(st.sampled_from([-1, 0, 1, 2, 3]))
    eps = data.draw(st.sampled_from([1e-6, 0.0, -1.0, math.inf, math.nan, 1e-300]))
    normalize = data.draw(st.booleans())
    state = data.draw(st.sampled_from([None, "ok", "shape", "dtype"]))
    if state == "ok":
        state = torch.rand(2, 2, m, dv + 1)
    elif state == "shape":
        state = torch.rand(2, 2, m, dv)
    elif state == "dtype":
        state = torch.rand(2, 2, m, dv + 1, dtype=torch.float64)
    mask = data.draw(st.sampled_from([None, "ok", "shape", "dtype"]))
    if mask == "ok":
        mask = torch.rand(2, Tk) < 0.5
    elif mask == "shape":
        mask = torch.zeros(2, Tk + 1, dtype=torch.bool)
    elif mask == "dtype":
        mask = torch.zeros(2, Tk)
    outcomes = {}
    for name in ("linear_attn_fwd", "linear_attn_fwd_generic", "meta"):
        op = torch.ops.linattn.linear_attn_fwd if name == "meta" else getattr(torch.ops.linattn, name)
        args = [q, k, v, state, mask]
        if name == "meta":
            args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        try:
            outcomes[name] = op(*args, code, causal, normalize, eps)
        except RuntimeError as error:
            assert "linattn.linear_attention" in str(error)
            outcomes[name] = str(error)
    kinds = {name: isinstance(result, str) for name, result in outcomes.items()}
    assert len(set(kinds.values())) == 1, f"kernels disagree on validity: {outcomes}"
    if kinds["meta"]:
        assert len(set(outcomes.values())) == 1, f"different messages: {outcomes}"
        return
    for a, b, meta in zip(outcomes["linear_attn_fwd"], outcomes["linear_attn_fwd_generic"], outcomes["meta"]):
        assert a.shape == b.shape == meta.shape and a.dtype == b.dtype == meta.dtype
        assert a.stride() == meta.stride()
        if code == 0 and normalize:
            continue  # signed features divided by their own (near-cancelling) sum: ill-posed values
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        if finite.any():
            assert relative_error(a[finite], b[finite]) <= 1e-5


@FUZZ
@given(st.data())
def test_performer_and_efficient_equal_their_references(data):
    causal = data.draw(st.booleans())
    B, H, T = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 2)), data.draw(LENGTHS)
    D, nb = data.draw(st.sampled_from([1, 4, 16])), data.draw(st.sampled_from([1, 7, 32]))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(B, H, T, D, generator=g).mul(0.5).to(dtype) for _ in range(3))
    mask = (torch.rand(B, T, generator=g) < 0.3) if data.draw(st.booleans()) else None
    if mask is not None and B > 0 and data.draw(st.booleans()):
        mask[0] = True
    kernel = data.draw(st.sampled_from(["softmax", "relu"]))
    W = linattn.random_features(nb, D, generator=g)
    with ops.generic_implementation(data.draw(st.booleans())):
        out = linattn.performer_attention(q, k, v, W, causal=causal, kernel=kernel, eps=1e-300, key_padding_mask=mask)
        efficient = linattn.efficient_attention(q, k, v, key_padding_mask=mask)
    expected = reference.performer_attention(q, k, v, W, causal=causal, kernel=kernel, key_padding_mask=mask)
    # The reference has no stabilizer: its rows with every feature underflowing are 0/0.
    rows = torch.isfinite(expected).all(-1, keepdim=True).expand_as(expected)
    assert torch.isfinite(out).all()
    if rows.any():
        assert relative_error(out[rows], expected[rows]) <= 10 * max(TOLERANCE[dtype], 1e-5)
    _compare(efficient, reference.efficient_attention(q, k, v, key_padding_mask=mask), dtype, "efficient")


@FUZZ
@given(st.data())
def test_sliding_window_attention_equals_reference(data):
    """sliding_window_attention against float64 softmax under the dense mask built from the
    definition: windows and (left, right) bounds incl. unbounded, T_q != T_k, dilation, global
    tokens, padding (all-padded rows too), strided views, every dtype, NaN/Inf anywhere."""
    causal = data.draw(st.booleans())
    B, H = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 2))
    Tq = data.draw(LENGTHS)
    Tk = Tq if data.draw(st.booleans()) else data.draw(LENGTHS)
    D, dv = data.draw(st.sampled_from([1, 4, 16])), data.draw(st.sampled_from([0, 3, 8]))
    window = data.draw(st.one_of(st.integers(0, 70), st.tuples(st.integers(-1, 70), st.integers(-1, 70))))
    dilation = data.draw(st.sampled_from([1, 1, 2, 3]))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    base = {"q": torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64),
            "k": torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64),
            "v": torch.randn(B, H, Tk, dv, generator=g, dtype=torch.float64)}
    bad = data.draw(st.sampled_from([None, None, None, "q", "k", "v"]))
    if bad is not None and base[bad].numel():
        base[bad].view(-1)[data.draw(st.integers(0, base[bad].numel() - 1))] = data.draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))
    q, k, v = (_place(base[n], data.draw(st.sampled_from(["contiguous", "transposed", "sliced", "offset"])), dtype)
               for n in "qkv")
    padding = (torch.rand(B, Tk, generator=g) < 0.2) if data.draw(st.booleans()) else None
    if padding is not None and B > 0 and data.draw(st.booleans()):
        padding[0] = True
    global_mask = None
    if not causal and Tq == Tk and data.draw(st.booleans()):
        global_mask = torch.rand(B, Tk, generator=g) < 0.05
    options = dict(causal=causal, dilation=dilation, global_mask=global_mask, key_padding_mask=padding)
    with ops.generic_implementation(data.draw(st.booleans())):
        out = linattn.sliding_window_attention(q, k, v, window, **options)
        expected = reference.sliding_window_attention(q, k, v, window, **options)
        _compare(out, expected, dtype, "out")
        if bad is not None or q.numel() == 0 or dtype == torch.float16:
            return
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        cotangent = torch.randn(expected.shape, generator=g, dtype=torch.float64)
        got = linattn.sliding_window_attention(*leaves, window, **options)
        grads = torch.autograd.grad((got.double() * cotangent).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.sliding_window_attention(*ref_leaves, window, **options)
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), ref_leaves)
    for name, a, b in zip("qkv", grads, ref_grads):
        _compare(a, b, dtype, f"d{name}", 3 * FUZZ_TOLERANCE[dtype])


@FUZZ
@given(st.data())
def test_block_sparse_attention_equals_reference(data):
    """block_sparse_attention against float64 softmax under the expanded layout: random layouts
    (per head or shared), block sizes incl. 1 and larger than T, T_q != T_k, causal, padding,
    views, dtypes, NaN/Inf anywhere, both implementations."""
    B, H = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 2))
    Tq, Tk = data.draw(LENGTHS), data.draw(LENGTHS)
    D, dv = data.draw(st.sampled_from([1, 4, 16])), data.draw(st.sampled_from([0, 3, 8]))
    b = data.draw(st.sampled_from([1, 3, 16, 64, 300]))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    layout = torch.rand(data.draw(st.sampled_from([1, H])), math.ceil(Tq / b), math.ceil(Tk / b), generator=g) < \
        data.draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    base = [torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, Tk, dv, generator=g, dtype=torch.float64)]
    bad = data.draw(st.sampled_from([None, None, 0, 1, 2]))
    if bad is not None and base[bad].numel():
        base[bad].view(-1)[data.draw(st.integers(0, base[bad].numel() - 1))] = data.draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))
    q, k, v = (_place(t, data.draw(st.sampled_from(["contiguous", "transposed", "sliced", "offset"])), dtype)
               for t in base)
    padding = (torch.rand(B, Tk, generator=g) < 0.2) if data.draw(st.booleans()) else None
    options = dict(causal=data.draw(st.booleans()), key_padding_mask=padding)
    with ops.generic_implementation(data.draw(st.booleans())):
        out = linattn.block_sparse_attention(q, k, v, layout, b, **options)
        expected = reference.block_sparse_attention(q, k, v, layout, b, **options)
        _compare(out, expected, dtype, "out")
        if bad is not None or q.numel() == 0 or dtype == torch.float16:
            return
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        cotangent = torch.randn(expected.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((linattn.block_sparse_attention(*leaves, layout, b, **options).double()
                                     * cotangent).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.block_sparse_attention(*ref_leaves, layout, b, **options)
    for name, a, r in zip("qkv", grads, torch.autograd.grad((ref * cotangent).sum(), ref_leaves)):
        _compare(a, r, dtype, f"d{name}", 3 * FUZZ_TOLERANCE[dtype])
