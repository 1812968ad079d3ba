"""Feature statistics at every merge point of N models, streamed in float64.

For each mergeable space, the features of the N models at the space's merge
point are concatenated (N*d columns; conv maps give one row per batch element and
position) and summed: count, sum and sum of outer products. Memory does not grow
with the number of samples, and statistics from several processes combine by
adding those three (an ``all_reduce``). Each batch is centred before its outer
product is taken in the features' own precision, then added in float64, so float32
models lose no accuracy to cancellation.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from graphmerge import distributed
from graphmerge.evaluation import check_loader, evaluating, model_device, on_device, run_model
from graphmerge.graphs import ModelGraph, NodeKind, Space
from graphmerge.models.layers import check_positive_int

STD_EPS = 1e-8


@dataclass
class SpaceStatistics:
    """Streaming moments of the concatenated features (N*d) of one space.

    ``count`` samples, ``total`` = sum of features, ``outer`` = sum of outer products.
    """

    count: int
    total: Tensor
    outer: Tensor

    @classmethod
    def empty(cls, width: int, device: torch.device | str = "cpu") -> SpaceStatistics:
        zeros = torch.zeros(width, dtype=torch.float64, device=device)
        return cls(0, zeros, torch.zeros(width, width, dtype=torch.float64, device=device))

    def update(self, features: Tensor) -> None:
        """Add rows of ``features`` (samples x N*d)."""
        self.update_blocks([features.T.contiguous()])

    def update_blocks(self, blocks: Sequence[Tensor]) -> None:
        """Add samples given channel-major, one (d_i x samples) block per model.

        The blocks are centred in place (pass tensors you own). Outer products are
        taken in the features' precision on centred values, block by block (the
        lower triangle mirrored), and accumulated in float64.
        """
        samples = blocks[0].shape[1]
        # sum x x^T = sum c c^T + shift r^T + r shift^T + n shift shift^T, with c = x - shift
        # and r = sum c (not exactly 0 in floating point): exact for any shift.
        shifts = [block.mean(dim=1) for block in blocks]
        for block, shift in zip(blocks, shifts, strict=True):
            block -= shift[:, None]
        starts = [0]
        for block in blocks:
            starts.append(starts[-1] + block.shape[0])
        for i, left in enumerate(blocks):
            rows = slice(starts[i], starts[i + 1])
            for j in range(i + 1):
                product = (left @ blocks[j].T).double()
                columns = slice(starts[j], starts[j + 1])
                self.outer[rows, columns] += product
                if i != j:
                    self.outer[columns, rows] += product.T
        shift = torch.cat(shifts).double()
        residual = torch.cat([block.sum(dim=1) for block in blocks]).double()
        half = residual + samples / 2 * shift  # shift r^T + r shift^T + n shift shift^T
        self.outer.addr_(shift, half).addr_(half, shift)
        self.total += residual + samples * shift
        self.count += samples

    @property
    def finite(self) -> bool:
        """False once a NaN or Inf feature has been added (it reaches the sums)."""
        return bool(
            torch.isfinite(self.total).all() and torch.isfinite(self.outer.diagonal()).all()
        )

    def __add__(self, other: SpaceStatistics) -> SpaceStatistics:
        return SpaceStatistics(
            self.count + other.count, self.total + other.total, self.outer + other.outer
        )

    @property
    def mean(self) -> Tensor:
        return self.total / self.count

    @property
    def covariance(self) -> Tensor:
        mean = self.mean
        return self.outer / self.count - torch.outer(mean, mean)

    @property
    def std(self) -> Tensor:
        """Standard deviations, clamped at 1e-8 so dead units give no NaN."""
        return self.covariance.diagonal().clamp_min(0).sqrt().clamp_min(STD_EPS)

    @property
    def correlation(self) -> Tensor:
        std = self.std
        return self.covariance / torch.outer(std, std)

    def to(self, device: torch.device | str) -> SpaceStatistics:
        return SpaceStatistics(self.count, self.total.to(device), self.outer.to(device))

    def all_reduce(self) -> None:
        """Sum count, total and outer over the processes of torch.distributed, in place."""
        distributed.all_reduce_sum([self.total, self.outer])
        self.count = distributed.total(self.count)


@dataclass
class ChannelMoments:
    """Streaming per-channel mean and variance (float64; Chan et al.'s parallel update).

    ``count`` samples per channel, ``mean`` and ``m2`` (sum of squared deviations);
    with ``comoment`` (created by ``empty(..., covariance=True)``) also the sum of
    products of deviations between channels, for the full covariance.
    """

    count: int
    mean: Tensor
    m2: Tensor
    comoment: Tensor | None = None

    @classmethod
    def empty(
        cls, width: int, device: torch.device | str = "cpu", covariance: bool = False
    ) -> ChannelMoments:
        zeros = torch.zeros(width, dtype=torch.float64, device=device)
        comoment = torch.zeros(width, width, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone(), comoment if covariance else None)

    def update(self, rows: Tensor) -> None:
        """Add samples given channel-major (channels x samples)."""
        samples = rows.shape[1]
        if samples == 0:
            return
        rows = rows.double()
        variance, mean = torch.var_mean(rows, dim=1, correction=0)
        total = self.count + samples
        delta = mean - self.mean
        weight = self.count * samples / total
        if self.comoment is not None:
            centred = rows - mean[:, None]
            self.comoment = self.comoment + centred @ centred.T + torch.outer(delta, delta) * weight
        self.mean = self.mean + delta * (samples / total)
        self.m2 = self.m2 + variance * samples + delta.square() * weight
        self.count = total

    def all_reduce(self) -> None:
        """Combine the moments of the processes of torch.distributed, in place.

        With n_r, mean_r, m2_r per rank: mean = sum n_r mean_r / n and
        m2 = sum m2_r + n_r (mean_r - mean)^2 (the comoment with outer products).
        """
        if not distributed.active():
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.mean.device)
        weighted = self.mean * self.count
        distributed.all_reduce_sum([count, weighted])
        mean = weighted / count.clamp_min(1)
        delta = self.mean - mean
        self.m2 = self.m2 + delta.square() * self.count
        sums = [self.m2]
        if self.comoment is not None:
            self.comoment = self.comoment + torch.outer(delta, delta) * self.count
            sums.append(self.comoment)
        distributed.all_reduce_sum(sums)
        self.mean = mean
        self.count = int(count.item())

    @property
    def covariance(self) -> Tensor:
        """The population covariance between channels (needs ``covariance=True``)."""
        if self.comoment is None:
            raise ValueError("these moments were collected without covariance=True")
        return self.comoment / self.count

    @property
    def variance(self) -> Tensor:
        return self.m2 / self.count

    @property
    def std(self) -> Tensor:
        """Population standard deviation per channel (not clamped: 0 for a constant unit)."""
        return self.variance.clamp_min(0).sqrt()

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all())


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


@dataclass(frozen=True)
class ReadPoint:
    """Where features are read: graph ``node`` with ``width`` channels, stored as ``name``;
    ``covariance`` also accumulates the covariance between channels (width x width)."""

    name: str
    node: str
    width: int
    covariance: bool = False


def merge_points(spaces: Sequence[Space]) -> list[ReadPoint]:
    """The merge point of each space, named after the space."""
    return [ReadPoint(space.name, space.merge_point, space.width) for space in spaces]


def _reader_root(model: nn.Module, traced: fx.GraphModule, fx_graph: fx.Graph) -> dict:
    """What the reader's nodes refer to: ``model``'s layers and tensors (the graph may be
    another model's), and constants of ``forward`` (``torch.tensor(...)``), which torch.fx
    keeps on the traced module only."""
    root: dict[str, object] = {}
    for node in fx_graph.nodes:
        if node.op == "call_module":
            root[node.target] = model.get_submodule(node.target)
        elif node.op == "get_attr":
            owner = model if _has_attribute(model, node.target) else traced
            root[node.target] = operator.attrgetter(node.target)(owner)
    return root


def _has_attribute(module: nn.Module, path: str) -> bool:
    owner: object = module
    for part in path.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True


class FeatureReader:
    """Runs a model and returns the features (channels x samples) at ``points`` of its graph.

    ``points`` are ReadPoints or spaces (read at their merge points). The graph may
    be another model's of the same architecture (a merged model's widths differ;
    the points then carry the merged widths). With ``reuse`` the features of a traced
    graph are written into the same tensors at every call (valid until the next call;
    fresh tensors of many MiB cost page faults at every batch).
    """

    def __init__(
        self,
        model: nn.Module,
        graph: ModelGraph,
        points: Sequence[ReadPoint | Space],
        reuse: bool = False,
    ) -> None:
        self.model = model
        self.points = [p if isinstance(p, ReadPoint) else merge_points([p])[0] for p in points]
        if graph.module is not None:
            rows = _RowBuffers().rows if reuse else channel_rows
            self._run = self._fx_reader(model, graph, self.points, rows)
        else:
            self._run = self._hook_reader(model, graph, self.points)

    def __call__(self, inputs: Tensor) -> dict[str, Tensor]:
        """Features of every point, channel-major: (width x samples), freshly allocated."""
        values = run_model(self._run, inputs, self.model)
        for point in self.points:
            if values[point.name].shape[0] != point.width:
                raise ValueError(
                    f"features at {point.name!r} have {values[point.name].shape[0]} "
                    f"channels, expected {point.width}"
                )
        return values

    @staticmethod
    def _fx_reader(model: nn.Module, graph: ModelGraph, points: Sequence[ReadPoint], rows):
        """A copy of the traced graph that returns only the points' values (dead code cut)."""
        fx_graph = fx.Graph()
        mapping: dict[fx.Node, fx.Node] = {}
        for node in graph.module.graph.nodes:
            if node.op != "output":
                mapping[node] = fx_graph.node_copy(node, lambda n: mapping[n])
        by_name = {node.name: node for node in graph.module.graph.nodes}
        values = {}
        for point in points:
            # Copy right away (a later in-place ReLU would overwrite it), channel-major.
            value = mapping[by_name[point.node]]
            axis = graph.graph.nodes[point.node]["channel_axis"]
            with fx_graph.inserting_after(value):
                values[point.name] = fx_graph.call_function(rows, (value, axis, point.name))
        fx_graph.output(values)
        reader = fx.GraphModule(_reader_root(model, graph.module, fx_graph), fx_graph)
        reader.graph.eliminate_dead_code()
        reader.recompile()
        return reader

    @staticmethod
    def _hook_reader(model: nn.Module, graph: ModelGraph, points: Sequence[ReadPoint]):
        """Forward hooks on the layers a hand-built graph names; sums and products recomputed."""
        nodes = graph.graph.nodes
        needed: dict[str, tuple[nn.Module, int]] = {}

        def require(node: str, width: int) -> None:
            data = nodes[node]
            if data["kind"] is NodeKind.MODULE:
                needed[node] = (model.get_submodule(data["target"]), width)
            elif data["kind"] is NodeKind.FUNCTION and data["target"] in COMBINERS:
                for source in data["inputs"]:
                    require(source, width)
            elif data["kind"] is not NodeKind.INPUT:
                raise ValueError(
                    f"cannot read features at {node!r} ({data['target']}): in a hand-built "
                    "graph, merge points must be layer outputs, sums or products of them"
                )

        for point in points:
            require(point.node, point.width)

        def value(node: str, inputs: Tensor, captured: dict[str, Tensor]) -> Tensor:
            data = nodes[node]
            if data["kind"] is NodeKind.MODULE:
                return captured[node]
            if data["kind"] is NodeKind.INPUT:
                return channel_rows(inputs, _channel_axis(inputs, inputs.shape[1]))
            parts = [value(source, inputs, captured) for source in data["inputs"]]
            return COMBINERS[data["target"]](parts)

        def run(inputs: Tensor) -> dict[str, Tensor]:
            captured: dict[str, Tensor] = {}
            handles = [
                module.register_forward_hook(_capture(captured, node, width))
                for node, (module, width) in needed.items()
            ]
            try:
                model(inputs)
            finally:
                for handle in handles:
                    handle.remove()
            return {p.name: value(p.node, inputs, captured) for p in points}

        return run


COMBINERS = {
    "add": lambda parts: functools.reduce(operator.add, parts),
    "mul": lambda parts: functools.reduce(operator.mul, parts),
}


def channel_rows(value: Tensor, axis: int, name: str = "") -> Tensor:
    """``value`` as a fresh (channels x samples) tensor: channels from ``axis``, the rest flat.
    (``name``, the point's, is unused: the signature of ``_RowBuffers.rows``.)"""
    rows = value.movedim(axis, 0).reshape(value.shape[axis], -1)
    return rows.clone() if rows.data_ptr() == value.data_ptr() else rows


# glibc serves allocations above 32 MiB (its largest mmap threshold) with fresh pages
# that the kernel maps and zero-fills on every batch; below it, fresh tensors are cheaper.
REUSE_BYTES = 32 * 2**20


class _RowBuffers:
    """One reusable (channels x samples) tensor per large point, rewritten at every batch."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def rows(self, value: Tensor, axis: int, name: str) -> Tensor:
        """``channel_rows`` of ``value``, written into the point's own buffer if it is large."""
        if value.numel() * value.element_size() < REUSE_BYTES:
            return channel_rows(value, axis)
        channels = value.shape[axis]
        shape = (channels, *(size for index, size in enumerate(value.shape) if index != axis))
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != value.dtype:
            buffer = torch.empty(shape, dtype=value.dtype, device=value.device)
            self.buffers[name] = buffer
        buffer.copy_(value.movedim(axis, 0))
        return buffer.view(channels, -1)


def _channel_axis(value: Tensor, width: int) -> int:
    """Hand-built graphs do not track axes: channels are on axis 1, else the last axis."""
    return 1 if value.dim() > 1 and value.shape[1] == width else value.dim() - 1


def _capture(store: dict[str, Tensor], name: str, width: int):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        # channel_rows copies now: a later in-place op must not change the features
        store[name] = channel_rows(output, _channel_axis(output, width))

    return hook


def collect_statistics(
    models: Sequence[nn.Module],
    graph: ModelGraph,
    loader: Iterable,
    spaces: Sequence[Space] | None = None,
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
    seen = 0
    with torch.no_grad(), _all_evaluating(models):
        for inputs in input_batches(loader, max_batches, max_samples, progress):
            inputs = inputs.to(device)
            features = [reader(inputs) for reader in readers]
            for space in spaces:
                stats[space.name].update_blocks([f[space.name] for f in features])
            seen += inputs.shape[0]
    # Reduced before any check, so that every process raises the same error (a process
    # raising alone would leave the others waiting in the collective).
    for found in stats.values():
        found.all_reduce()
    if distributed.total(seen) == 0:
        raise ValueError("the loader yielded no samples: statistics need data")
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
    seen = 0
    with torch.no_grad(), _all_evaluating(models):
        batches = input_batches(loader, max_batches, max_samples, progress, description)
        for inputs in batches:
            inputs = inputs.to(device)
            for reader, found in zip(readers, moments, strict=True):
                for name, rows in reader(inputs).items():
                    found[name].update(rows)
            seen += inputs.shape[0]
    for found in moments:
        for moment in found.values():
            moment.all_reduce()
    if distributed.total(seen) == 0:
        raise ValueError("the loader yielded no samples: statistics need data")
    for index, found in enumerate(moments):
        for name, moment in found.items():
            if not moment.finite:
                raise FloatingPointError(
                    f"non-finite features (NaN or Inf) at {name!r} of model {index}: check the "
                    "model's weights and the data"
                )
    return moments


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


@contextlib.contextmanager
def _all_evaluating(models: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode for several models at once, each restored afterwards."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(evaluating(model))
        yield
