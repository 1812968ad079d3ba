"""Accuracy and cross-entropy loss of a model on data, joint and per task.

Example:
    >>> import graphmerge as gm
    >>> data = gm.data.digits()
    >>> model = gm.models.build("mlp", hidden=(32,), seed=0)
    >>> sorted(gm.evaluation.evaluate(model, data.test))
    ['accuracy', 'loss', 'num_samples']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphmerge.batches import labelled_batches
from graphmerge.runtime import evaluating, logits_of, model_device, moved_to, run_model


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
            "evaluation and ensembles read logits (a tensor, or a dict's or ModelOutput's "
            "'logits'); wrap the model so that it returns them (e.g. its first output)"
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
            inputs, targets = moved_to(inputs, device), targets.to(device)
            outputs = logits_of(run_model(model, inputs))
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
