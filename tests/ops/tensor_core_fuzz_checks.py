"""What the tensor-core fuzzers (test_tensor_core_fading_fuzz.py, test_tensor_core_split_fuzz.py)
compare with: errors in norm relative to the size of the terms a result is a sum or difference of,
from a float64 reference `attend(q, k, v, initial_state, normalize)` -> (out, (S, z)) with every sign
made positive. A gradient whose terms cancel (a state that forgets within a token leaves each
normalized row its own value, so dq is about 0) is then compared to what it is made of, not to its
own size."""
import torch


def close(got, expected, tol, what, scale=0.0):
    """Relative error in norm, relative to at least `scale` (the size of the terms a result sums) and
    1e-3 of an element's typical size."""
    floor = max(1e-3 * expected.numel() ** 0.5, scale)
    err = (got.double() - expected).norm().item() / max(expected.norm().item(), floor)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.1e}"


def signless_inputs(q, k, v, state, signless):
    """float64 leaves with the signs that can cancel made positive: |v|, |S0|, |z0|, and |q|, |k| under a
    feature map that keeps signs (the identity)."""
    leaves = [(t.abs() if signless else t).detach().double().requires_grad_() for t in (q, k)]
    leaves.append(v.detach().double().abs().requires_grad_())
    S0 = None if state is None else tuple(t.double().abs() for t in state)
    return leaves, S0


def output_scales(attend, q, k, v, state, signless, normalize):
    """The sizes of out, S_N and z_N's terms: the reference on signless inputs."""
    leaves, S0 = signless_inputs(q, k, v, state, signless)
    with torch.no_grad():
        out, (S, z) = attend(*leaves, S0, normalize)
    return [t.norm().item() for t in (out, S, z)]


def gradient_scales(attend, q, k, v, state, weights, signless, normalize):
    """The sizes of the terms each gradient of q, k, v sums, per tensor: the reference's gradients on
    signless inputs and |cotangents| (`weights` of out, S_N, z_N) and, normalized, the output's two
    parts (through the numerator, through the normalizer) added rather than subtracted
    (test_fuzz.py's _gradient_term_scales)."""
    leaves, S0 = signless_inputs(q, k, v, state, signless)
    numerator, (S, z) = attend(*leaves, S0, False)
    w_out, w_S, w_z = (w.abs() for w in weights)
    parts = [(S * w_S).sum() + (z * w_z).sum()]
    if normalize:
        ones = torch.ones_like(leaves[2][..., :1])
        Z0 = None if S0 is None else (S0[1][..., None], S0[1])
        denominator = attend(leaves[0], leaves[1], ones, Z0, False)[0] + 1e-6
        parts += [(numerator / denominator.detach() * w_out).sum(), (numerator.detach() / denominator * w_out).sum()]
    else:
        parts.append((numerator * w_out).sum())
    scales = [torch.zeros_like(t) for t in leaves]
    for part in parts:
        grads = torch.autograd.grad(part, leaves, allow_unused=True, retain_graph=True)
        scales = [s + (0 if g is None else g.abs()) for s, g in zip(scales, grads)]
    return [x.norm().item() for x in scales]


def gate_terms_scale(q, k, dq, dk, final_terms, per_channel):
    """The size of what the gate's gradient is a difference of: the reverse cumulative sums of
    |q ⊙ dq| + |k ⊙ dk| (per channel, or summed over the features per token), as dL/dc's terms
    φ(q)·dφ(q) − φ(k)·dφ(k) are summed, with |dS_N ⊙ S_N| (final_terms, (B, H, m)) at the last row
    (with one row and no state they cancel to exactly 0). Packed sequences: pass each sequence's
    rows, or all of them when final_terms is 0."""
    terms = (q.double() * dq).abs() + (k.double() * dk).abs()
    terms[:, :, -1] += final_terms
    if not per_channel:
        terms = terms.sum(-1)
    return terms.flip(2).cumsum(2).flip(2).norm().item()
