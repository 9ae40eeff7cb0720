"""The restricted-softmax operator's one schema and linattn.ops.restricted.Pattern (docs/methods.md
§5–§7): every kind of pattern through the CPU kernel and the device-generic kernel equals softmax
under Pattern.dense_mask in float64, forward and backward (lse's cotangent included); op_args
follows the schema."""
import pytest
import torch

from linattn.ops.restricted import Pattern

B, H = 2, 3


def ids(*shape, high=3, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def cases():
    padding = torch.zeros(B, 41, dtype=torch.bool)
    padding[1, 30:] = True
    global_mask = torch.zeros(B, 41, dtype=torch.bool)
    global_mask[0, [3, 20]] = True
    layout = torch.rand(H, 6, 6, generator=torch.Generator().manual_seed(4)) < 0.6
    return {
        # T_q != T_k: a window aligned bottom-right, per-head segments of queries and keys.
        "window, dilation, per-head segments": (29, 41, Pattern(window=(5, 2), dilation=2, key_padding_mask=padding,
                                                                q_segments=ids(B, H, 29), k_segments=ids(B, H, 41, seed=1))),
        "unbounded causal window with segments": (41, 41, Pattern(causal=True, q_segments=ids(B, 1, 41, seed=2),
                                                                  k_segments=ids(B, 1, 41, seed=2))),
        "global tokens and padding": (41, 41, Pattern(window=(4, 4), global_mask=global_mask,
                                                      key_padding_mask=padding)),
        "layout, causal, segments, padding": (41, 41, Pattern(layout=layout, block_size=7, causal=True,
                                                              key_padding_mask=padding, q_segments=ids(B, H, 41, seed=3),
                                                              k_segments=ids(B, H, 41, seed=3))),
    }


def dense_reference(q, k, v, scale, visible):
    """Softmax under the dense mask in float64; a row that sees no key is 0 (lse −inf)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    empty = torch.isinf(lse)
    probs = torch.exp(scores - torch.where(empty, 0, lse).unsqueeze(-1)).masked_fill(~visible, 0)
    return probs @ v, lse


def check_against_dense_mask(op, T_q, T_k, pattern, seed=7, heads=H):
    """op's out, lse and gradients (lse's cotangent included) equal softmax under the pattern's dense
    mask, in float64."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, T, 8, generator=g, dtype=torch.float64).requires_grad_()
               for T in (T_q, T_k, T_k))
    out, lse = op(q, k, v, 0.4, *pattern.op_args())
    ref_out, ref_lse = dense_reference(q, k, v, 0.4, pattern.dense_mask(T_q, T_k))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).masked_fill(torch.isinf(ref_lse), 0)

    def loss(out, lse):
        return (out * w_out).sum() + (torch.where(torch.isinf(lse), 0, lse) * w_lse).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"grad {name}")


@pytest.mark.parametrize("suffix", ["", "_generic"])
@pytest.mark.parametrize("case", list(cases()))
def test_every_pattern_equals_softmax_under_its_dense_mask(case, suffix):
    check_against_dense_mask(getattr(torch.ops.linattn, "restricted_softmax_fwd" + suffix), *cases()[case])


def test_op_args_follow_the_schema():
    arguments = torch.ops.linattn.restricted_softmax_fwd.default._schema.arguments[4:]
    fields = {"window_left": "window", "window_right": "window"}
    pattern = Pattern()
    defaults = pattern.op_args()
    for argument, default in zip(arguments, defaults):
        field = fields.get(argument.name, argument.name)
        assert hasattr(pattern, field), argument.name
        expected = argument.default_value
        assert default == expected or (default is None and expected is None), (argument.name, default, expected)
    assert len(arguments) == len(defaults)
