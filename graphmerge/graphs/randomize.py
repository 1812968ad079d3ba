"""Random values in every parameter and buffer, so that a graph's self-check sees them all."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphmerge.evaluation.metrics import copy_model
from graphmerge.graphs.rules import BATCH_NORMS

NORM_LAYERS = (*BATCH_NORMS, nn.LayerNorm, nn.GroupNorm)
# Uniform ranges: a norm layer's affine and running statistics, by tensor name.
NORM_RANGES = {
    "weight": (0.5, 1.5),
    "bias": (-0.5, 0.5),
    "running_mean": (-0.5, 0.5),
    "running_var": (0.5, 2.0),
}
SCALE_RANGE = NORM_RANGES["weight"]  # vectors: layer scales, gates, tokens, PReLU slopes
BIAS_RANGE = NORM_RANGES["bias"]
MIN_STD = 0.02  # the smallest spread given to a matrix that had none (a zero head, a table)


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` in which every floating parameter and buffer holds random values.

    A value that no permutation changes hides a missing permutation from
    ``check_symmetries``: BatchNorm statistics at 0 and 1, LayerNorm / GroupNorm affines
    at 1 and 0, a layer scale at 1e-6, a zero class token, bias or head. The copy holds,
    drawn from ``seed``:

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
            norm = isinstance(module, NORM_LAYERS) or "running_var" in module._buffers
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None or id(tensor) in seen or not _randomizable(tensor):
                    continue
                seen.add(id(tensor))
                tensor.copy_(_random_like(tensor, name, norm, generator))
    return randomized


def _randomizable(tensor: Tensor) -> bool:
    return tensor.is_floating_point() and tensor.numel() > 1 and bool(torch.isfinite(tensor).all())


def _random_like(tensor: Tensor, name: str, norm: bool, generator: torch.Generator) -> Tensor:
    if (norm and name in NORM_RANGES) or name in ("running_mean", "running_var"):
        return _uniform(tensor, NORM_RANGES[name], generator)
    if "bias" in name:
        return _uniform(tensor, BIAS_RANGE, generator)
    if sum(size > 1 for size in tensor.shape) == 1:
        return _uniform(tensor, SCALE_RANGE, generator)
    std, mean = (value.item() for value in torch.std_mean(tensor.detach().double()))
    if not std > 0:
        fan_in = max(1, tensor[0].numel()) if tensor.dim() > 1 else tensor.numel()
        std = max(fan_in**-0.5, MIN_STD)
    noise = torch.randn(tensor.shape, generator=generator, dtype=_draw_dtype(tensor))
    return mean + std * noise


def _uniform(tensor: Tensor, bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
    low, high = bounds
    draw = torch.rand(tensor.shape, generator=generator, dtype=_draw_dtype(tensor))
    return low + (high - low) * draw


def _draw_dtype(tensor: Tensor) -> torch.dtype:
    """Draw in the tensor's precision (half precision draws in float32, then rounds)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
