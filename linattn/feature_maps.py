"""Feature maps φ of kernelized linear attention (docs/methods.md §1)."""
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .ops import accumulate_dtype

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1: positive, so the normalizer never vanishes (Katharopoulos et al.).

    Computed as x + 1 for x > 0 and exp(x) otherwise, as the kernels do: F.elu(x) + 1 is
    expm1(x) + 1, which rounds to exactly 0 below x ≈ −17 in float32 (−37 in float64). The
    exponent is clamped at 0 so the branch not taken never overflows (its gradient would be NaN)."""
    return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0)))


def relu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = relu(x): non-negative; a query with no positive overlap gets a zero output."""
    return F.relu(x)


def identity_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = x: the caller's own features, possibly negative (use with normalize=False)."""
    return x


FEATURE_MAPS = {"elu": elu_feature_map, "relu": relu_feature_map, "identity": identity_feature_map}
# The codes of the maps the C++ kernels apply themselves (kernel.h FeatureMap).
FUSED_FEATURE_MAPS = {"identity": 0, "elu": 1, "relu": 2}
# The built-in maps a plain call may hand an operator without the Python checks; "identity" is
# left out (it needs them: it can only run unnormalized).
PLAIN_FEATURE_MAPS = {"elu": FUSED_FEATURE_MAPS["elu"], "relu": FUSED_FEATURE_MAPS["relu"]}


def resolve_feature_map(feature_map: Union[str, FeatureMap, None], where: str) -> Optional[FeatureMap]:
    """The callable for `feature_map`, or None when q and k are already featurized."""
    if feature_map is None or callable(feature_map):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        return FEATURE_MAPS[feature_map]
    raise ValueError(
        f"{where}: feature_map must be one of {sorted(FEATURE_MAPS)}, None or a callable, got {feature_map!r}"
    )


# --- FAVOR+ random features (Performer, docs/methods.md §2) -------------------------------------

# Largest exponent a causal key feature may reach (see favor_features): with φ(q) <= 1/√m,
# a score φ(q)·φ(k) stays below e^60 and a sum over up to 2^31 keys below e^82, inside float32's
# (and bfloat16's) range of e^88.
CAUSAL_KEY_EXPONENT_BOUND = 60.0

PERFORMER_KERNELS = ("softmax", "relu")


def random_features(
    nb_features: int,
    dim: int,
    *,
    orthogonal: bool = True,
    scaling: str = "norm",
    generator: Optional[torch.Generator] = None,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """A (nb_features, dim) FAVOR+ projection W (Choromanski et al. 2021).

    Args:
        orthogonal: rows in blocks of `dim` mutually orthogonal rows (QR of Gaussian blocks),
            which lowers the variance of the softmax-kernel estimate; False gives i.i.d.
            Gaussian rows.
        scaling: "norm" rescales each row to the norm of an independent Gaussian vector (so
            rows are distributed like Gaussian rows); "sqrt_d" gives every row norm √dim.
        generator: a torch.Generator on the CPU for reproducible draws; the result is moved to
            device.
    """
    where = "linattn.random_features"
    if isinstance(nb_features, bool) or not isinstance(nb_features, int) or nb_features < 1:
        raise ValueError(f"{where}: nb_features must be a positive int, got {nb_features!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{where}: dim must be a positive int, got {dim!r}")
    if scaling not in ("norm", "sqrt_d"):
        raise ValueError(f"{where}: scaling must be 'norm' or 'sqrt_d', got {scaling!r}")
    dtype = dtype or torch.get_default_dtype()
    # Drawn in float64 on the CPU: reproducible with a CPU generator whatever the target device.
    draw = dict(generator=generator, dtype=torch.float64)
    if orthogonal:
        blocks = []
        for start in range(0, nb_features, dim):
            gaussian = torch.randn(dim, dim, **draw)
            q, r = torch.linalg.qr(gaussian)
            # Sign fix makes Q Haar-distributed (QR alone is biased by its sign convention).
            q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
            blocks.append(q.T[: min(dim, nb_features - start)])
        directions = torch.cat(blocks, dim=0)
    else:
        directions = torch.randn(nb_features, dim, **draw)
        directions = directions / directions.norm(dim=1, keepdim=True)
    if scaling == "norm":
        norms = torch.randn(nb_features, dim, **draw).norm(dim=1, keepdim=True)
    else:
        norms = torch.full((nb_features, 1), float(dim) ** 0.5, dtype=torch.float64)
    return (directions * norms).to(device=device, dtype=dtype)


def favor_features(
    x: torch.Tensor,
    projection: torch.Tensor,
    *,
    is_query: bool,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """φ(x) of FAVOR+ for x (B, H, T, d) and W = projection (m, d): (B, H, T, m), float32 for
    half inputs (their range is too small for exp features), else x's dtype.

    softmax kernel: φ(x) = exp(W x' − ‖x'‖²/2 − c) / √m with x' = x·d^(−1/4), so that
    E[φ(q)·φ(k)] ∝ exp(q·k/√d). The stabilizer c is detached (it cancels in the normalized ratio):

      - queries: the max over the query's own features;
      - keys, non-causal: the max over all unpadded keys and features of the sequence;
      - keys, causal: a bound that depends on W only, never on any key, so no position sees a
        later one: since W x' − ‖x'‖²/2 <= ‖w_r‖²/2, c = max(0, max_r ‖w_r‖²/2 − 60) keeps every
        feature below e^60 (and c = 0 whenever the rows are short enough: d ≲ 100).

    relu kernel: φ(x) = relu(W x') + 1e-3 (the "generalized attention" of the paper).
    """
    if projection.is_meta and not x.is_meta:
        # A module built on the meta device (or loaded with assign=True from one) has no
        # projection yet; copying it would fail with torch's "Cannot copy out of meta tensor".
        raise ValueError(
            f"linattn.favor_features: projection is on the meta device (it holds no values) while the inputs are on "
            f"{x.device}; materialize it first, e.g. module.to_empty(device=...) then redraw_projection()"
        )
    d = x.shape[-1]
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x = x.to(compute_dtype) * d**-0.25
    w = projection.to(device=x.device, dtype=compute_dtype)
    projected = x @ w.T  # (B, H, T, m)
    if kernel == "relu":
        return F.relu(projected) + 1e-3
    exponent = projected - 0.5 * (x * x).sum(-1, keepdim=True)
    with torch.no_grad():
        if is_query:
            shift = exponent.amax(dim=-1, keepdim=True)
        elif causal:
            half_sq_norm = 0.5 * (w * w).sum(-1).amax()
            shift = (half_sq_norm - CAUSAL_KEY_EXPONENT_BOUND).clamp(min=0)
        else:
            masked = exponent
            if key_padding_mask is not None:
                masked = exponent.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
            if masked.shape[-2] == 0:  # no keys: nothing to scale
                masked = masked.new_zeros(*masked.shape[:-2], 1, masked.shape[-1])
            shift = masked.amax(dim=(-1, -2), keepdim=True)
            # A sequence whose keys are all padded has no max; any finite shift does.
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    if key_padding_mask is not None and not is_query:
        # A padded key's exponent may lie far above the unpadded keys' max: exp would overflow,
        # and the Inf would turn the zero gradient of an excluded key into 0·Inf = NaN.
        exponent = exponent.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
    m = projection.shape[0]
    return torch.exp(exponent - shift) * m**-0.5


# --- Efficient Attention (Shen et al., docs/methods.md §3) ---------------------------------------


def efficient_feature_maps(q: torch.Tensor, k: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None):
    """(ρ_q(Q), ρ_k(K)) in float32 (float64 for float64 inputs): a softmax over each query's
    features, and a softmax over the sequence for each key feature with padded keys excluded
    (zero; a sequence with every key padded gets all zeros instead of the softmax's 0/0)."""
    acc = accumulate_dtype(q.dtype)
    rho_q = torch.softmax(q.to(acc), dim=-1)
    keys = k.to(acc)
    if key_padding_mask is None:
        return rho_q, torch.softmax(keys, dim=-2)
    padded = key_padding_mask[:, None, :, None]
    rho_k = torch.softmax(keys.masked_fill(padded, float("-inf")), dim=-2)
    return rho_q, rho_k.masked_fill(padded, 0.0)
