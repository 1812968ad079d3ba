"""Identity (plain averaging) and permute (activation matching by linear assignment)."""

from __future__ import annotations

import torch
from torch import Tensor

from graphmerge.matching_functions.common import (
    Statistics,
    assignment,
    feature_width,
    permutation_match,
    unit_similarity,
)
from graphmerge.matching_functions.registry import register


@register(
    "identity",
    paper="weight averaging (Utans 1996; Wortsman et al. 2022, model soups)",
    blocks="aligned",
)
def identity(stats: Statistics, num_models: int) -> tuple[Tensor, Tensor]:
    """Unit k of every model is unit k of the merged model: plain weight averaging.

    M = [I/N ... I/N] (d x N*d), U = [I; ...; I] (N*d x d).
    """
    width = feature_width(stats, num_models)
    return permutation_match([torch.arange(width)] * num_models)


@register("permute", paper="Ainsworth et al. 2023, Git Re-Basin (activation matching), ICLR")
def permute(stats: Statistics, num_models: int) -> tuple[Tensor, Tensor]:
    """Align every model to model 0 by the permutation of maximal total feature correlation.

    For i > 0: pi_i = argmax_pi sum_k corr(model 0 unit k, model i unit pi(k)) (linear
    assignment; units constant on the data are paired by their values, see
    ``unit_similarity``); M averages matched units, U_i[pi_i(k), k] = 1.
    """
    width = feature_width(stats, num_models)
    correlation = unit_similarity(stats)
    partners = [torch.arange(width)]
    for model in range(1, num_models):
        block = correlation[:width, model * width : (model + 1) * width]
        partners.append(assignment(block))
    return permutation_match(partners)
