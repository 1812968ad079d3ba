"""Identity (plain averaging) and permute (activation matching by linear assignment)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from graphmerge.matching_functions.registry import Statistics, register


def _width(stats: Statistics, num_models: int) -> int:
    total = stats.mean.shape[0]
    if num_models < 2 or total % num_models:
        raise ValueError(f"{total} features cannot be split into {num_models} models")
    return total // num_models


@register("identity")
def identity(stats: Statistics, num_models: int) -> tuple[Tensor, Tensor]:
    """Unit k of every model is unit k of the merged model: plain weight averaging.

    M = [I/N ... I/N] (d x N*d), U = [I; ...; I] (N*d x d).
    """
    width = _width(stats, num_models)
    eye = torch.eye(width, dtype=torch.float64)
    return torch.cat([eye / num_models] * num_models, dim=1), torch.cat([eye] * num_models)


@register("permute")
def permute(stats: Statistics, num_models: int) -> tuple[Tensor, Tensor]:
    """Align every model to model 0 by the permutation of maximal total feature correlation.

    For i > 0: pi_i = argmax_pi sum_k corr(model 0 unit k, model i unit pi(k)) (linear
    assignment); M averages matched units, U_i[pi_i(k), k] = 1.
    """
    width = _width(stats, num_models)
    correlation = stats.correlation.detach().cpu().double()
    merge = torch.zeros(width, num_models * width, dtype=torch.float64)
    unmerge = torch.zeros(num_models * width, width, dtype=torch.float64)
    units = torch.arange(width)
    for model in range(num_models):
        if model == 0:
            partner = units
        else:
            block = correlation[:width, model * width : (model + 1) * width]
            rows, columns = linear_sum_assignment(block.numpy(), maximize=True)
            partner = torch.as_tensor(columns)[torch.as_tensor(rows).argsort()]
        merge[units, model * width + partner] = 1.0 / num_models
        unmerge[model * width + partner, units] = 1.0
    return merge, unmerge
