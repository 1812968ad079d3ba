"""Batches: what a loader may yield, and the input tensors of a pass over it.

A loader is any re-iterable of input tensors or (input, target, ...) tuples (a
DataLoader, a list). Every pass over data in graphmerge reads its batches here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from graphmerge import distributed
from graphmerge.runtime import check_positive_int


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


def batch_inputs(batch: object) -> Tensor:
    """The input tensor of a batch: a tensor, or the first item of an (input, target) pair."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(first, np.ndarray):
        raise ValueError(
            "the loader yields numpy arrays: graphmerge needs torch tensors; convert them, e.g. "
            "TensorDataset(torch.from_numpy(inputs), torch.from_numpy(targets)) in a DataLoader"
        )
    if isinstance(batch, dict):
        keys = ", ".join(repr(key) for key in batch)
        raise ValueError(
            f"the loader yields dicts (keys {keys}); graphmerge needs input tensors or "
            "(input, target) pairs: pass e.g. [(batch['image'], batch['label']) for batch in "
            "loader], or a DataLoader whose collate_fn returns such pairs"
        )
    raise ValueError(
        "the loader must yield input tensors or (input, target) pairs; got a batch of type "
        f"{type(batch).__name__}"
    )


def input_batches(
    loader: Iterable,
    max_batches: int | None,
    max_samples: int | None,
    progress: bool,
    description: str = "statistics",
) -> Iterator[Tensor]:
    """The input tensors of ``loader``, at most ``max_batches`` / ``max_samples``, empty ones
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
                inputs = inputs[: max(0, max_samples - seen)]
                if inputs.shape[0] == 0:
                    break
            if inputs.shape[0] == 0:
                continue
            seen += inputs.shape[0]
            yield inputs
            bar.update(1)
    finally:
        bar.close()
