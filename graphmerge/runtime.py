"""Running models: eval mode with the modes restored, devices, copies, calls with clear errors.

The bottom layer of graphmerge: every pass over data (statistics, normalization,
evaluation, tracing) uses these helpers, and they import nothing of graphmerge.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore each submodule's own mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.train(training)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def on_device(models: Sequence[nn.Module], device: torch.device | str | None) -> list[nn.Module]:
    """``models`` on ``device``: each one already there as it is, the others as copies
    moved there (the caller's models are never moved). ``None`` keeps them where they are.
    """
    if device is None:
        return list(models)
    device = torch.device(device)
    placed = []
    for model in models:
        here = model_device(model)
        same = here.type == device.type and (device.index is None or here.index == device.index)
        placed.append(model if same else copy_model(model).to(device))
    return placed


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, also when it holds derived tensors (torch.nn.utils.prune
    keeps ``weight = weight_orig * weight_mask`` as a plain attribute, which deepcopy
    refuses while it is part of an autograd graph); those are copied detached."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def run_model(
    model: Callable[[Tensor], Any], inputs: Tensor, module: nn.Module | None = None
) -> Any:
    """``model(inputs)``, with an error that names the input shape (or dtype) when the model
    rejects it; ``module`` is the nn.Module behind ``model`` when that is a plain function."""
    try:
        return model(inputs)
    except TypeError as error:
        if "positional argument" not in str(error):  # not the model's signature: its own bug
            raise
        raise ValueError(
            f"the model cannot be called with one input tensor ({error}); graphmerge feeds each "
            "batch's input tensor (the first item of an (input, target) pair): wrap a model of "
            "several inputs so that it takes one"
        ) from error
    except RuntimeError as error:
        module = module if module is not None else model
        raise ValueError(
            f"the model cannot run on inputs of shape {tuple(inputs.shape)} and dtype "
            f"{inputs.dtype}: {error}. {input_hint(module, [inputs], error)}"
        ) from error


def smallest_training_batch(model: nn.Module) -> int:
    """The fewest samples a batch needs to run ``model`` in train mode: 2 with a BatchNorm1d
    (it cannot normalize one flat sample; such batches, a loader's last one say, are left
    out), else 1."""
    return 2 if any(isinstance(module, nn.BatchNorm1d) for module in model.modules()) else 1


def input_hint(model: object, inputs: Sequence[object], error: Exception) -> str:
    """What to change when ``model`` rejects ``inputs``: their dtype where it differs from
    the model's floating-point parameters and the error is about dtypes, else their layout."""
    parameters = model.parameters() if isinstance(model, nn.Module) else []
    dtypes = {p.dtype for p in parameters if p.is_floating_point()}
    message = str(error).lower()
    if len(dtypes) == 1 and ("dtype" in message or "scalar type" in message):
        (dtype,) = dtypes
        for tensor in inputs:
            if isinstance(tensor, Tensor) and tensor.dtype != dtype:
                return (
                    f"The inputs are {tensor.dtype} but the model's parameters are {dtype}: "
                    f"convert the data (e.g. inputs.to({dtype})) or the model."
                )
    return "Pass batches shaped like the model's training data (does the layout fit?)."


def check_positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is an int >= 1, else raise a clear error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value
