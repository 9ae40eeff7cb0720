"""Feature maps φ of kernelized linear attention (METHODS.md §1)."""
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1: positive, so the normalizer never vanishes (Katharopoulos et al.)."""
    return F.elu(x) + 1


def relu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = relu(x): non-negative; a query with no positive overlap gets a zero output."""
    return F.relu(x)


def identity_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = x: the caller's own features, possibly negative (use with normalize=False)."""
    return x


FEATURE_MAPS = {"elu": elu_feature_map, "relu": relu_feature_map, "identity": identity_feature_map}


def resolve_feature_map(feature_map: Union[str, FeatureMap, None], where: str) -> Optional[FeatureMap]:
    """The callable for `feature_map`, or None when q and k are already featurized."""
    if feature_map is None or callable(feature_map):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        return FEATURE_MAPS[feature_map]
    raise ValueError(
        f"{where}: feature_map must be one of {sorted(FEATURE_MAPS)}, None or a callable, got {feature_map!r}"
    )
