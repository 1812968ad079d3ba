"""Passes over data: merge statistics, REPAIR moments, and the loop they (and RESET) share.

Every pass reads its batches with ``DataPass``: the input tensors on the models'
device, at most ``max_batches`` / ``max_samples``, with a progress bar, counted so
that an empty loader is a clear error on every process alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from graphmerge import distributed
from graphmerge.batches import input_batches
from graphmerge.graphs import ModelGraph, Space
from graphmerge.runtime import evaluating, model_device, moved_to, on_device, sample_count
from graphmerge.statistics.accumulators import ChannelMoments, SpaceStatistics
from graphmerge.statistics.reader import FeatureReader, ReadPoint


class DataPass:
    """One pass over ``loader``: its input tensors on ``device``, counted in ``samples``.

    Batches come from ``batches.input_batches`` (at most ``max_batches`` / ``max_samples``,
    empty ones skipped, a tqdm bar on rank 0); batches of fewer than ``smallest`` samples
    are left out (a BatchNorm1d in train mode cannot normalize one sample). Iterate it
    inside ``torch.no_grad()`` and the models' modes.

    Example:
        >>> data = DataPass(loader, device, max_samples=512)
        >>> for inputs in data: ...
        >>> data.check_samples("statistics need data")
    """

    def __init__(
        self,
        loader: Iterable,
        device: torch.device,
        *,
        max_batches: int | None = None,
        max_samples: int | None = None,
        progress: bool = False,
        description: str = "statistics",
        smallest: int = 1,
    ) -> None:
        self.loader, self.device, self.smallest = loader, device, smallest
        self.limits = (max_batches, max_samples, progress, description)
        self.samples = 0

    def __iter__(self) -> Iterator[Tensor]:
        for inputs in input_batches(self.loader, *self.limits):
            if sample_count(inputs) < self.smallest:
                continue
            self.samples += sample_count(inputs)
            yield moved_to(inputs, self.device)

    def check_samples(self, need: str) -> None:
        """A clear error, on every process alike, when no process saw a sample."""
        if distributed.total(self.samples) == 0:
            raise ValueError(f"the loader yielded no samples: {need}")


def collect_statistics(
    models: Sequence[nn.Module],
    graph: ModelGraph,
    loader: Iterable,
    spaces: Sequence[Space] | None = None,
    *,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, SpaceStatistics]:
    """Feature statistics of every space in ``spaces`` (default: the mergeable ones).

    One pass over ``loader`` (tensors or (input, target) pairs); every model runs
    in eval mode without gradients and its modes are restored. The models run, and the
    statistics are kept, on ``device`` (default: the models' own; models elsewhere are
    copied there, yours stay where they are). Under torch.distributed each process
    passes over its own shard and all get the sums of all (see ``gm.distributed``);
    ``max_samples`` then counts all processes' samples.

    Example:
        >>> stats = collect_statistics([model_a, model_b], graph, loader, max_samples=512)
        >>> stats["layer1.0.conv1"].correlation.shape      # (2 * 16, 2 * 16)
    """
    spaces = list(graph.mergeable_spaces if spaces is None else spaces)
    models = on_device(models, device)
    readers = [FeatureReader(model, graph, spaces, reuse=True) for model in models]
    device = model_device(models[0])
    stats = {s.name: SpaceStatistics.empty(len(models) * s.width, device) for s in spaces}
    data = DataPass(
        loader, device, max_batches=max_batches, max_samples=max_samples, progress=progress
    )
    with torch.no_grad(), _all_evaluating(models):
        for inputs in data:
            features = [reader(inputs) for reader in readers]
            for space in spaces:
                stats[space.name].update_blocks([f[space.name] for f in features])
    # Reduced before any check, so that every process raises the same error (a process
    # raising alone would leave the others waiting in the collective).
    for found in stats.values():
        found.all_reduce()
    data.check_samples("statistics need data")
    for space in spaces:
        if not stats[space.name].finite:
            raise FloatingPointError(
                f"non-finite features (NaN or Inf) in space {space.name!r}: check the "
                "models' weights and the data"
            )
    return stats


def collect_moments(
    models: Sequence[nn.Module],
    graph: ModelGraph,
    loader: Iterable,
    points: Sequence[ReadPoint],
    *,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    description: str = "moments",
    device: torch.device | str | None = None,
) -> list[dict[str, ChannelMoments]]:
    """Per-channel mean and variance at ``points`` of each model: one pass over ``loader``.

    The models share the architecture of ``graph`` (and the points' widths). They
    run in eval mode without gradients; their modes are restored. ``device`` and
    torch.distributed as in ``collect_statistics``.

    Example:
        >>> points = [ReadPoint("fc1", "layers_fc1", 64)]
        >>> moments = collect_moments([model], graph, loader, points)[0]
        >>> moments["fc1"].mean, moments["fc1"].std
    """
    models = on_device(models, device)
    readers = [FeatureReader(model, graph, points, reuse=True) for model in models]
    device = model_device(models[0])
    moments = [
        {p.name: ChannelMoments.empty(p.width, device, p.covariance) for p in points}
        for _ in models
    ]
    data = DataPass(
        loader, device, max_batches=max_batches, max_samples=max_samples, progress=progress,
        description=description,
    )  # fmt: skip
    with torch.no_grad(), _all_evaluating(models):
        for inputs in data:
            for reader, found in zip(readers, moments, strict=True):
                for name, rows in reader(inputs).items():
                    found[name].update(rows)
    for found in moments:
        for moment in found.values():
            moment.all_reduce()
    data.check_samples("statistics need data")
    for index, found in enumerate(moments):
        for name, moment in found.items():
            if not moment.finite:
                raise FloatingPointError(
                    f"non-finite features (NaN or Inf) at {name!r} of model {index}: check the "
                    "model's weights and the data"
                )
    return moments


@contextlib.contextmanager
def _all_evaluating(models: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode for several models at once, each restored afterwards."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(evaluating(model))
        yield
