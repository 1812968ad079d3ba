"""Running models: eval mode with the modes restored, devices, copies, calls with clear errors.

The bottom layer of graphmerge: every pass over data (statistics, normalization,
evaluation, tracing) uses these helpers, and they import nothing of graphmerge.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class ModelInputs:
    """The arguments of one call of a model, ``model(*args, **kwargs)``: what a batch of
    several inputs (a dict of ``input_ids`` and ``attention_mask``, a tuple of tensors)
    feeds. Tensors share their first axis, the samples; other values pass as they are.

    Example:
        >>> inputs = ModelInputs(kwargs={"input_ids": ids, "attention_mask": mask})
        >>> inputs.samples, inputs.first(2).samples
        (32, 2)
    """

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, Tensor)]

    @property
    def samples(self) -> int:
        tensors = [t for t in self.tensors() if t.dim() > 0]
        return tensors[0].shape[0] if tensors else 0

    def map(self, function: Callable[[Tensor], Tensor]) -> ModelInputs:
        """The same call with ``function`` applied to every tensor of at least one axis."""

        def apply(value: Any) -> Any:
            return function(value) if isinstance(value, Tensor) and value.dim() > 0 else value

        return ModelInputs(
            tuple(apply(v) for v in self.args), {k: apply(v) for k, v in self.kwargs.items()}
        )

    def first(self, count: int) -> ModelInputs:
        return self.map(lambda tensor: tensor[:count])

    def describe(self) -> str:
        """The shapes and dtypes of the tensors, by argument (for error messages)."""

        def shown(value: Any) -> str:
            if isinstance(value, Tensor):
                return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
            return type(value).__name__

        parts = [shown(v) for v in self.args] + [f"{k}={shown(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def example_inputs(example: object) -> ModelInputs:
    """``example`` (a tensor, a tuple of positional input tensors, a dict of keyword inputs,
    a ModelInputs) as the arguments of one call."""
    if isinstance(example, ModelInputs):
        return example
    if isinstance(example, Tensor):
        return ModelInputs((example,))
    if isinstance(example, Mapping) and all(isinstance(key, str) for key in example):
        return ModelInputs(kwargs=dict(example))
    if isinstance(example, (tuple, list)):
        return ModelInputs(tuple(example))
    raise TypeError(
        "the example input must be a tensor, a tuple of tensors, a dict of keyword inputs or "
        f"a graphmerge.ModelInputs, got {type(example).__name__}"
    )


# A batch's inputs: one tensor (the common case, ``model(tensor)``) or a call of several.
Inputs = Tensor | ModelInputs


def sample_count(inputs: Inputs) -> int:
    """The number of samples of ``inputs`` (their first axis)."""
    return inputs.samples if isinstance(inputs, ModelInputs) else inputs.shape[0]


def first_samples(inputs: Inputs, count: int) -> Inputs:
    """The first ``count`` samples of ``inputs``."""
    return samples_at(inputs, slice(None, count))


def samples_at(inputs: Inputs, index: Any) -> Inputs:
    """The samples of ``inputs`` at ``index`` (a slice, a boolean mask) of the first axis."""
    if isinstance(inputs, ModelInputs):
        return inputs.map(lambda tensor: tensor[index])
    return inputs[index]


def moved_to(inputs: Inputs, device: torch.device) -> Inputs:
    """``inputs`` on ``device``."""
    if isinstance(inputs, ModelInputs):
        return inputs.map(lambda tensor: tensor.to(device))
    return inputs.to(device)


def call_model(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model(inputs)``, or ``model(*args, **kwargs)`` for ModelInputs."""
    if isinstance(inputs, ModelInputs):
        return model(*inputs.args, **inputs.kwargs)
    return model(inputs)


def logits_of(outputs: Any) -> Any:
    """The prediction tensor of a model's outputs: a ModelOutput's or a dict's ``logits``
    (HuggingFace's convention), anything else as it is (evaluation then checks that it is
    one tensor: a tuple is never guessed at)."""
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    return outputs


def run_model(model: Callable[..., Any], inputs: Inputs, module: nn.Module | None = None) -> Any:
    """``model(inputs)`` (``model(*args, **kwargs)`` for ModelInputs), with an error that
    names the input shape (or dtype) when the model rejects it; ``module`` is the nn.Module
    behind ``model`` when that is a plain function."""
    several = isinstance(inputs, ModelInputs)
    try:
        return call_model(model, inputs)
    except TypeError as error:
        if "argument" not in str(error):  # not the model's signature: its own bug
            raise
        if several:
            raise ValueError(
                f"the model cannot be called with the batch's inputs {inputs.describe()} "
                f"({error}): a dict batch is passed as keyword arguments (all keys but "
                "'labels', 'label', 'targets' and 'target'), a tuple input as positional ones; "
                "reshape the batches with graphmerge.data.formatted(loader, function)"
            ) from error
        raise ValueError(
            f"the model cannot be called with one input tensor ({error}); graphmerge feeds each "
            "batch's input tensor (the first item of an (input, target) pair): yield dicts of "
            "keyword inputs, ((input1, input2), target) pairs, or reshape the batches with "
            "graphmerge.data.formatted(loader, function)"
        ) from error
    except RuntimeError as error:
        module = module if module is not None else model
        shown = (
            inputs.describe()
            if several
            else f"of shape {tuple(inputs.shape)} and dtype {inputs.dtype}"
        )
        tensors = inputs.tensors() if several else [inputs]
        raise ValueError(
            f"the model cannot run on inputs {shown}: {error}. {input_hint(module, tensors, error)}"
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
