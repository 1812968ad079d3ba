"""Accuracy and cross-entropy loss of a model on data, joint and per task.

Also the small helpers every pass over data shares: eval mode with the modes
restored, the model's device, a copy that survives pruning masks, and clear
errors for loaders and inputs that do not fit.

Example:
    >>> import graphmerge as gm
    >>> data = gm.data.digits()
    >>> model = gm.models.build("mlp", hidden=(32,), seed=0)
    >>> sorted(gm.evaluation.evaluate(model, data.test))
    ['accuracy', 'loss', 'num_samples']
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
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


def check_loader(loader: object) -> None:
    """A clear error for what cannot serve as a loader: a bare tensor, or no iterable at all."""
    if isinstance(loader, Tensor):
        raise TypeError(
            f"the loader is a single tensor of shape {tuple(loader.shape)}: iterating it would "
            "yield samples without their batch axis; pass [tensor] (one batch), a list of "
            "batches or a DataLoader"
        )
    if not isinstance(loader, Iterable):
        raise TypeError(
            "the loader must be an iterable of batches (a DataLoader, or a list of input tensors "
            f"or (input, target) pairs), got an object of type {type(loader).__name__}"
        )


def labelled_batches(loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (inputs, targets) from a loader of (inputs, targets, ...) tuples; explain others."""
    check_loader(loader)
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                "evaluation needs a loader of (inputs, targets) pairs; got a batch of type "
                f"{type(batch).__name__}"
            )
        yield batch[0], batch[1]


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


def check_logits(outputs: Tensor, targets: Tensor) -> None:
    """Raise a clear error when outputs are not finite or labels exceed the number of outputs."""
    check_tensor_output(outputs)
    if not torch.isfinite(outputs).all():
        raise FloatingPointError(
            "the model produced NaN or Inf outputs; check its weights "
            "(e.g. from a diverged training run)"
        )
    check_labels(outputs, targets)


def check_tensor_output(outputs: object) -> None:
    """A clear error when a model returns something else than one logits tensor."""
    if not isinstance(outputs, Tensor):
        kind = type(outputs).__name__
        keys = f" with keys {', '.join(map(repr, outputs))}" if isinstance(outputs, dict) else ""
        raise ValueError(
            f"the model returns a {kind}{keys}, not one tensor of (batch, classes) logits: "
            "evaluation and ensembles read logits; wrap the model so that it returns them "
            "(e.g. its first output, or output['logits'])"
        )


def check_labels(outputs: Tensor, targets: Tensor) -> None:
    """Raise a clear error when outputs are not (batch, classes) logits covering the labels."""
    if outputs.ndim != 2:
        raise ValueError(f"expected logits of shape (batch, classes), got {tuple(outputs.shape)}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= outputs.shape[1]):
        raise ValueError(
            f"labels range over {int(targets.min())}..{int(targets.max())} but the model has "
            f"{outputs.shape[1]} outputs: build it with num_classes covering the labels, or "
            "remap the labels (graphmerge.data remap_labels=True)"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str | None = None,
    tasks: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Accuracy (fraction correct) and mean cross-entropy loss of ``model`` on ``loader``.

    With ``tasks`` (disjoint lists of logit columns, one per task: the ZipIt! protocol for
    models trained on different label sets, e.g. ``[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]``),
    ``accuracy`` is the joint accuracy (argmax over all outputs) and ``task_accuracy``
    lists, per task, the accuracy on that task's samples with the argmax taken over the
    task's own columns only; ``mean_task_accuracy`` is their mean. The model runs in
    eval mode; its modes are restored afterwards.

    Example:
        >>> metrics = evaluate(joint_model, data.test, tasks=[range(5), range(5, 10)])
        >>> metrics["accuracy"], metrics["task_accuracy"]
    """
    device = torch.device(device) if device is not None else model_device(model)
    columns = None if tasks is None else _task_columns(tasks)
    correct, loss_sum, count = 0, 0.0, 0
    task_correct = [0] * len(columns or [])
    task_count = [0] * len(columns or [])
    with evaluating(model):
        for inputs, targets in labelled_batches(loader):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = run_model(model, inputs)
            check_logits(outputs, targets)
            loss_sum += F.cross_entropy(outputs, targets, reduction="sum").item()
            correct += (outputs.argmax(dim=1) == targets).sum().item()
            count += targets.numel()
            for index, task in enumerate(columns or []):
                task = task.to(device)
                if task.max() >= outputs.shape[1]:
                    raise ValueError(
                        f"task {index} names output column {int(task.max())} but the model "
                        f"has {outputs.shape[1]} outputs"
                    )
                mine = torch.isin(targets, task)
                predicted = task[outputs[mine][:, task].argmax(dim=1)]
                task_correct[index] += (predicted == targets[mine]).sum().item()
                task_count[index] += int(mine.sum().item())
    if count == 0:
        raise ValueError("the loader yielded no samples: nothing to evaluate")
    metrics: dict[str, Any] = {
        "accuracy": correct / count,
        "loss": loss_sum / count,
        "num_samples": count,
    }
    if columns is not None:
        empty = [index for index, seen in enumerate(task_count) if seen == 0]
        if empty:
            raise ValueError(
                f"task(s) {empty} have no samples in the loader: each task's labels must "
                "appear in the data"
            )
        metrics["task_accuracy"] = [c / n for c, n in zip(task_correct, task_count, strict=True)]
        metrics["mean_task_accuracy"] = sum(metrics["task_accuracy"]) / len(columns)
    return metrics


def _task_columns(tasks: Sequence[Sequence[int]]) -> list[Tensor]:
    """The tasks as index tensors; disjoint, non-empty and non-negative, or a clear error."""
    columns = [torch.as_tensor(list(task), dtype=torch.long) for task in tasks]
    if not columns or any(task.numel() == 0 for task in columns):
        raise ValueError("tasks must be a non-empty list of non-empty lists of output columns")
    joined = torch.cat(columns)
    if joined.min() < 0:
        raise ValueError(f"task columns must be >= 0, got {joined.min().item()}")
    if joined.unique().numel() != joined.numel():
        raise ValueError("tasks must not share output columns (each label belongs to one task)")
    return columns
