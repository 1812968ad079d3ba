"""Shared pieces of matching functions: the per-model width and matrices from partners."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from graphmerge.matching_functions.registry import Statistics


def feature_width(stats: Statistics, num_models: int) -> int:
    """d, the number of features of one model, with a clear error if N*d does not split."""
    total = stats.mean.shape[0]
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 2:
        raise ValueError(f"num_models must be an integer >= 2, got {num_models!r}")
    if total % num_models:
        raise ValueError(f"{total} features cannot be split into {num_models} models")
    return total // num_models


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
