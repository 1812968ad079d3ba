"""Shared pieces of matching functions: what statistics they read, the per-model width, the
similarity of units, and merge/unmerge matrices from partners or clusters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


class Statistics(Protocol):
    """What a matching function may read: moments of the concatenated features (N*d)."""

    @property
    def mean(self) -> Tensor: ...

    @property
    def covariance(self) -> Tensor: ...

    @property
    def correlation(self) -> Tensor: ...


def feature_width(stats: Statistics, num_models: int) -> int:
    """d, the number of features of one model, with a clear error if N*d does not split."""
    total = stats.mean.shape[0]
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 2:
        raise ValueError(f"num_models must be an integer >= 2, got {num_models!r}")
    if total % num_models:
        raise ValueError(f"{total} features cannot be split into {num_models} models")
    return total // num_models


# A unit whose standard deviation is below this share of the space's scale (its largest
# root mean square) is constant on the data: what varies is float32 rounding, which a deep
# stack of layers brings to about 1e-5 of the values it sums.
CONSTANT_RTOL = 1e-4


def unit_similarity(stats: Statistics) -> Tensor:
    """The correlation of every pair of the N*d units, defined for constant units too.

    A unit constant on the data (a dead channel, a zeroed row with its bias) correlates
    with nothing, so correlation alone cannot tell such units apart and matches them at
    random. A pair of which one unit is constant (std below 1e-4 of the space's largest
    root mean square) gets 1 - |m_u - m_v| / (|m_u| + |m_v| + s) instead (m the means,
    s the space's largest std): 1 for equal values, as for a unit and its permuted copy,
    and less the further apart they are.
    """
    correlation = stats.correlation.detach().cpu().double().clone()
    mean = stats.mean.detach().cpu().double()
    variance = stats.covariance.detach().cpu().double().diagonal().clamp_min(0)
    if not variance.numel():
        return correlation
    std, scale = variance.sqrt(), float((variance + mean**2).sqrt().max())
    constant = std <= CONSTANT_RTOL * scale
    if not bool(constant.any()):
        return correlation
    gap = (mean[:, None] - mean[None, :]).abs()
    spread = mean.abs()[:, None] + mean.abs()[None, :] + float(std.max())
    close = 1.0 - gap / spread.clamp_min(torch.finfo(torch.float64).tiny)
    either = constant[:, None] | constant[None, :]
    return torch.where(either, close, correlation)


def assignment(similarity: Tensor) -> Tensor:
    """The permutation k -> partner[k] maximising sum_k similarity[k, partner[k]] (scipy's
    linear_sum_assignment on a square matrix)."""
    rows, columns = linear_sum_assignment(similarity.detach().cpu().numpy(), maximize=True)
    return torch.as_tensor(columns)[torch.as_tensor(rows).argsort()]


def permutation_match(partners: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(merge, unmerge) averaging unit ``partners[i][k]`` of every model i into merged unit k.

    M[k, i*d + partners[i][k]] = 1/N and U[i*d + partners[i][k], k] = 1.
    """
    count, width = len(partners), len(partners[0])
    merge = torch.zeros(width, count * width, dtype=torch.float64)
    unmerge = torch.zeros(count * width, width, dtype=torch.float64)
    units = torch.arange(width)
    for model, partner in enumerate(partners):
        merge[units, model * width + partner.long()] = 1.0 / count
        unmerge[model * width + partner.long(), units] = 1.0
    return merge, unmerge


def membership_match(labels: Tensor, merged_width: int) -> tuple[Tensor, Tensor]:
    """(merge, unmerge) of a clustering: U[u, labels[u]] = 1, M = (U / column sums)^T."""
    unmerge = torch.zeros(labels.shape[0], merged_width, dtype=torch.float64)
    unmerge[torch.arange(labels.shape[0]), labels.long()] = 1.0
    return (unmerge / unmerge.sum(dim=0, keepdim=True)).T.contiguous(), unmerge
