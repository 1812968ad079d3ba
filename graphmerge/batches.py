"""Batches: what a loader may yield, and the inputs of a pass over it.

A loader is any re-iterable (a DataLoader, a list) of batches. Every pass over data in
graphmerge reads its batches here, by one convention:

- a tensor: the input, ``model(batch)``;
- an ``(input, target, ...)`` tuple: ``input`` is a tensor (``model(input)``), a tuple or
  list of tensors (several positional inputs, ``model(*input)``), a dict (keyword inputs,
  ``model(**input)``) or a ModelInputs;
- a dict (HuggingFace style): its ``labels`` (or ``label``, ``targets``, ``target``) is
  the target, every other key a keyword input, ``model(input_ids=..., attention_mask=...)``;
- anything else: reshape it with ``graphmerge.data.formatted(loader, function)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from graphmerge import distributed
from graphmerge.runtime import (
    Inputs,
    ModelInputs,
    check_positive_int,
    example_inputs,
    first_samples,
    sample_count,
)

# The keys of a dict batch that hold its targets (never passed to the model).
TARGET_KEYS = ("labels", "label", "targets", "target")


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


def labelled_batches(loader: Iterable) -> Iterator[tuple[Inputs, Tensor]]:
    """Yield (inputs, targets) from a loader of (inputs, targets, ...) tuples or of dicts
    with a ``labels`` key; explain others."""
    check_loader(loader)
    for batch in loader:
        if isinstance(batch, Mapping):
            key = next((key for key in TARGET_KEYS if key in batch), None)
            if key is None:
                keys = ", ".join(repr(k) for k in batch)
                raise ValueError(
                    f"evaluation needs targets: the loader yields dicts with keys {keys} and "
                    f"none of {', '.join(TARGET_KEYS)}"
                )
            yield batch_inputs(batch), batch[key]
            continue
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                "evaluation needs a loader of (inputs, targets) pairs or of dicts with "
                f"'labels'; got a batch of type {type(batch).__name__}"
            )
        yield batch_inputs(batch), batch[1]


def call_inputs(value: object) -> Inputs | None:
    """``value`` as the inputs of one model call (None when it is not one): a tensor as it
    is, a dict or a tuple of tensors by ``runtime.example_inputs``."""
    if isinstance(value, (Tensor, ModelInputs)):
        return value
    several = (
        isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value)
    )
    if several or (isinstance(value, Mapping) and all(isinstance(key, str) for key in value)):
        return example_inputs(value)
    return None


def batch_inputs(batch: object) -> Inputs:
    """The inputs of a batch: a tensor, the first item of an (input, target) pair, or the
    keyword inputs of a dict batch (see the module docstring)."""
    if isinstance(batch, (Tensor, ModelInputs)):
        return batch
    if isinstance(batch, Mapping) and all(isinstance(key, str) for key in batch):
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        if not any(isinstance(v, Tensor) for v in inputs.values()):
            keys = ", ".join(repr(k) for k in batch)
            raise ValueError(
                f"the loader yields dicts (keys {keys}) without an input tensor: graphmerge "
                "passes every key but the targets as a keyword input; reshape the batches "
                "with graphmerge.data.formatted(loader, function)"
            )
        return ModelInputs(kwargs=inputs)
    if isinstance(batch, (tuple, list)) and batch:
        inputs = call_inputs(batch[0])
        if inputs is not None:
            return inputs
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(first, np.ndarray):
        raise ValueError(
            "the loader yields numpy arrays: graphmerge needs torch tensors; convert them, e.g. "
            "TensorDataset(torch.from_numpy(inputs), torch.from_numpy(targets)) in a DataLoader"
        )
    raise ValueError(
        "the loader must yield input tensors, (input, target) pairs or dicts of keyword "
        f"inputs; got a batch of type {type(batch).__name__}: reshape the batches with "
        "graphmerge.data.formatted(loader, function)"
    )


class FormattedLoader:
    """A loader whose batches are ``function(batch)`` of another's, as (ModelInputs,
    target) pairs (see :func:`formatted`)."""

    def __init__(self, loader: Iterable, function: Callable[[Any], tuple]) -> None:
        check_loader(loader)
        self.loader, self.function = loader, function

    def __iter__(self) -> Iterator[tuple[ModelInputs, Any]]:
        for batch in self.loader:
            found = self.function(batch)
            if not isinstance(found, tuple) or len(found) != 3 or not isinstance(found[1], dict):
                raise ValueError(
                    "the function given to graphmerge.data.formatted must return "
                    f"(args, kwargs, target) with kwargs a dict, got {type(found).__name__}"
                )
            args, kwargs, target = found
            yield ModelInputs(tuple(args), kwargs), target

    def __len__(self) -> int:
        return len(self.loader)


def formatted(loader: Iterable, function: Callable[[Any], tuple]) -> FormattedLoader:
    """``loader`` with each batch turned into the model's arguments and the target by
    ``function(batch) -> (args, kwargs, target)``: for batches no convention reads.

    Example:
        >>> loader = gm.data.formatted(raw, lambda b: ((b["img"],), {"mask": b["m"]}, b["y"]))
    """
    return FormattedLoader(loader, function)


def input_batches(
    loader: Iterable,
    max_batches: int | None,
    max_samples: int | None,
    progress: bool,
    description: str = "statistics",
) -> Iterator[Inputs]:
    """The inputs of ``loader``, at most ``max_batches`` / ``max_samples``, empty ones
    skipped, with a tqdm bar (on rank 0 only). Under torch.distributed ``max_samples``
    counts all processes: this one takes its share (``gm.distributed.local_samples``)."""
    check_loader(loader)
    for name, limit in (("max_batches", max_batches), ("max_samples", max_samples)):
        if limit is not None:
            check_positive_int(name, limit)
    max_samples = distributed.local_samples(max_samples)
    seen = 0
    total = max_batches
    if total is None and hasattr(loader, "__len__"):
        total = len(loader)
    show = progress and distributed.is_main()
    bar = tqdm(total=total, desc=description, unit="batch", disable=not show, leave=False)
    try:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            inputs = batch_inputs(batch)
            if max_samples is not None:
                inputs = first_samples(inputs, max(0, max_samples - seen))
                if sample_count(inputs) == 0:
                    break
            if sample_count(inputs) == 0:
                continue
            seen += sample_count(inputs)
            yield inputs
            bar.update(1)
    finally:
        bar.close()
