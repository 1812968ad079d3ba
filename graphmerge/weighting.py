"""Model weights: how much each of N models counts in a merge or an interpolation.

A merge matrix M (d' x N*d) averages the models' units with weight 1/N each.
``reweighted`` turns it into the alpha-weighted combination used for
interpolation curves and for REPAIR targets with interpolation weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

WEIGHT_TOLERANCE = 1e-6


def model_weights(weights: float | Sequence[float], count: int) -> Tensor:
    """N weights (float64) from a sequence of N non-negative numbers summing to 1, or from
    a single alpha in [0, 1] for two models (weights 1 - alpha, alpha).

    Example:
        >>> model_weights(0.25, 2)
        tensor([0.7500, 0.2500], dtype=torch.float64)
    """
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        if count != 2:
            raise ValueError(
                f"a single alpha interpolates between 2 models, but there are {count}: "
                "give one weight per model"
            )
        if not 0.0 <= float(weights) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {weights!r}")
        return torch.tensor([1.0 - float(weights), float(weights)], dtype=torch.float64)
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"got {len(values)} weights for {count} models: give one per model")
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"model weights must be finite and >= 0, got {values}")
    if abs(sum(values) - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"model weights must sum to 1, got {values} (sum {sum(values)})")
    return torch.tensor(values, dtype=torch.float64)


def reweighted(merge: Tensor, weights: Tensor) -> Tensor:
    """The merge matrix with model i's columns weighted by ``weights[i]`` instead of 1/N.

    M'_i = N w_i M_i; then every row without negative entries (averages of matched
    units: identity, permute, zip) is rescaled back to its original sum, so that a
    merged unit made of units of some models only stays an average of them (and one
    made only of units of zero-weight models keeps its plain average). Rows of maps
    that mix channels with signs (cca) keep N w_i M_i.
    """
    count = weights.shape[0]
    width = merge.shape[1] // count
    scale = (count * weights.to(merge)).repeat_interleave(width)
    result = merge * scale
    rows = (merge >= 0).all(dim=1)
    old, new = merge.sum(dim=1), result.sum(dim=1)
    fixable = rows & (new > 0)
    result[fixable] *= (old[fixable] / new[fixable])[:, None]
    # rows of one model only (units kept side by side, within-model clusters) and rows
    # whose models all weigh 0 stay exactly as they were, not up to rounding
    models_in_row = (merge.view(merge.shape[0], count, width) != 0).any(dim=2).sum(dim=1)
    unchanged = rows & ((models_in_row <= 1) | (new <= 0))
    result[unchanged] = merge[unchanged]
    return result
