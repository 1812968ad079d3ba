"""Randomised per-channel statistics, so that a graph's self-check sees every buffer."""

from __future__ import annotations

import copy

import torch
from torch import nn

from graphmerge.graphs.rules import BATCH_NORMS


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose norm layers have random affine parameters and running stats.

    Fresh models have BatchNorm mean 0, variance 1, weight 1 and bias 0: values a
    permutation cannot change, so a graph that forgets them would still pass
    ``check_symmetries``. After this, it would not.

    Example:
        >>> graph = gm.graphs.trace(gm.graphs.randomize_statistics(model), x)
    """
    randomized = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)

    def fill(tensor: torch.Tensor | None, low: float, high: float) -> None:
        if tensor is not None and tensor.is_floating_point():
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
            tensor.data.copy_(low + (high - low) * values)

    with torch.no_grad():
        for module in randomized.modules():
            if isinstance(module, (*BATCH_NORMS, nn.LayerNorm, nn.GroupNorm)):
                fill(getattr(module, "weight", None), 0.5, 1.5)
                fill(getattr(module, "bias", None), -0.5, 0.5)
                fill(getattr(module, "running_mean", None), -0.5, 0.5)
                fill(getattr(module, "running_var", None), 0.5, 2.0)
    return randomized
