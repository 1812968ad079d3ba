"""The feature reader: a model's features (channels x samples) at points of its graph.

A traced graph is cut down to the nodes the points need (a torch.fx GraphModule that
returns only their values); a hand-built graph is read with forward hooks on the
layers it names.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from graphmerge.graphs import ModelGraph, NodeKind, Space
from graphmerge.graphs.operations import PRODUCT, SUM
from graphmerge.runtime import run_model


@dataclass(frozen=True)
class ReadPoint:
    """Where features are read: graph ``node`` with ``width`` channels, stored as ``name``;
    ``covariance`` also accumulates the covariance between channels (width x width);
    ``offset``: read only channels [offset, offset + width) of the node's channel axis (a
    node carrying several spaces side by side); None reads the whole axis."""

    name: str
    node: str
    width: int
    covariance: bool = False
    offset: int | None = None


def merge_points(spaces: Sequence[Space]) -> list[ReadPoint]:
    """The merge point of each space, named after the space (a clear error for a space whose
    features no single node carries)."""
    for space in spaces:
        if space.merge_point is None:
            raise ValueError(
                f"space {space.name!r} has no merge point (no node of the graph carries its "
                "features alone), so its statistics cannot be read: merge it with "
                "method='weight_matching', or mark a node with GraphBuilder.add_merge"
            )
    return [
        ReadPoint(space.name, space.merge_point, space.width, offset=space.merge_offset)
        for space in spaces
    ]


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
            axis = graph.node(point.node).channel_axis
            if point.offset is not None:
                with fx_graph.inserting_after(value):
                    value = fx_graph.call_function(
                        torch.narrow, (value, axis, point.offset, point.width)
                    )
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
        nodes = {node.name: node for node in graph.nodes()}
        needed: dict[str, tuple[nn.Module, int]] = {}

        def require(node: str, width: int) -> None:
            data = nodes[node]
            if data.kind is NodeKind.MODULE:
                needed[node] = (model.get_submodule(data.target), width)
            elif data.kind is NodeKind.FUNCTION and data.target in COMBINERS:
                for source in data.inputs:
                    require(source, width)
            elif data.kind is not NodeKind.INPUT:
                raise ValueError(
                    f"cannot read features at {node!r} ({data.target}): in a hand-built "
                    "graph, merge points must be layer outputs, sums or products of them"
                )

        for point in points:
            require(point.node, point.width)

        def value(node: str, inputs: Tensor, captured: dict[str, Tensor]) -> Tensor:
            data = nodes[node]
            if data.kind is NodeKind.MODULE:
                return captured[node]
            if data.kind is NodeKind.INPUT:
                return channel_rows(inputs, _channel_axis(inputs, inputs.shape[1]))
            parts = [value(source, inputs, captured) for source in data.inputs]
            return COMBINERS[data.target](parts)

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
    SUM: lambda parts: functools.reduce(operator.add, parts),
    PRODUCT: lambda parts: functools.reduce(operator.mul, parts),
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
