"""Random values in every parameter and buffer, so that a graph's self-check sees them all."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphmerge.graphs.layers import DEFAULT_RULE, rule_for
from graphmerge.runtime import copy_model


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` in which every floating parameter and buffer holds random values.

    A value that no permutation changes hides a missing permutation from
    ``check_symmetries``: BatchNorm statistics at 0 and 1, LayerNorm / GroupNorm affines
    at 1 and 0, a layer scale at 1e-6, a zero class token, bias or head. The copy holds,
    drawn from ``seed`` (each layer's rule draws its tensors: ``LayerRule.random_tensor``):

    - norm layers (and any layer with a ``running_var``): weight U(0.5, 1.5), bias and
      running mean U(-0.5, 0.5), running variance U(0.5, 2);
    - other biases (names containing "bias"): U(-0.5, 0.5);
    - other vectors, i.e. tensors with a single dim above 1 (layer scales ``(C, 1, 1)``,
      class tokens ``(1, 1, E)``, gates, PReLU slopes): U(0.5, 1.5);
    - other tensors (weights, embeddings, position tables): normal with the tensor's own
      mean and standard deviation, or, where it had none (zeros), a standard deviation of
      max(fan_in^-1/2, 0.02), the scale of a fresh layer.

    Integer and boolean tensors (indices, counters, masks), single numbers and tensors
    with non-finite values (additive masks at -inf) are kept. The scales keep a model's
    outputs finite and each unit distinct; the model computes another function, so use
    the copy for checks, never for results.

    Example:
        >>> checked = gm.graphs.randomize_statistics(model)
        >>> gm.graphs.trace(checked, x).check_symmetries(x, relative=True)  # ~1e-7
    """
    randomized = copy_model(model)
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for module in randomized.modules():
            rule = rule_for(module) or DEFAULT_RULE
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None or id(tensor) in seen or not _randomizable(tensor):
                    continue
                seen.add(id(tensor))
                tensor.copy_(rule.random_tensor(module, name, tensor, generator))
    return randomized


def _randomizable(tensor: Tensor) -> bool:
    return tensor.is_floating_point() and tensor.numel() > 1 and bool(torch.isfinite(tensor).all())
