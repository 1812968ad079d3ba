"""Where statistics can be corrected: repair points and the layers that absorb a correction.

A correction y -> a * y + c per channel is exact only where it can be folded into
parameters. From every layer that writes a space (Linear, Conv: layer rules with
correction "start") the chain of single-consumer, channel-wise affine steps after it is
followed (rules with "pass": Identity, Dropout; the transparent ops permute/transpose;
and a norm with affine parameters, "absorb", which then takes the correction): its end
is a **layer point**, corrected through the last affine layer of the chain (the norm's
weight and bias, else the layer's weight and bias).

A residual sum (block output) whose every input is such a chain end with no other
consumer is a **sum point**: its correction folds into all inputs (scale) and one
bias (shift), and its inputs are then not corrected separately (the sum's
correction would rescale them anyway). A sum with an input that cannot absorb a
correction (an identity shortcut) is skipped, with the reason; its inputs are
corrected as layer points.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import networkx as nx
from torch import nn

from graphmerge.graphs import ModelGraph, NodeKind
from graphmerge.graphs.layers import DEFAULT_RULE, rule_for
from graphmerge.graphs.operations import METADATA_NAMES, SUMS, TRANSPARENT_NAMES


@dataclass(frozen=True)
class FoldTarget:
    """A layer whose output channels absorb y -> a * y + c: weight (and bias) scaled by a,
    c added to the bias. ``module`` is the path of the layer holding the parameters."""

    module: str
    axis: int
    has_bias: bool


@dataclass(frozen=True)
class RepairPoint:
    """A graph node whose output channels are corrected, and the layers that absorb it.

    Attributes:
        node: the graph node (its output is measured and corrected).
        space: the space of its channels.
        kind: "layer" (end of a layer's affine chain) or "sum" (a residual block output).
        folds: the layers the correction is folded into (several for a sum).
        level: passes over the data happen level by level: a point's value depends
            only on points of lower levels.
    """

    node: str
    space: str
    kind: Literal["layer", "sum"]
    folds: tuple[FoldTarget, ...]
    level: int = 0


@dataclass(frozen=True)
class SkippedPoint:
    """A place that was not corrected, and why."""

    node: str
    space: str
    reason: str


def repair_points(
    graph: ModelGraph, spaces: Collection[str]
) -> tuple[list[RepairPoint], list[SkippedPoint]]:
    """The repair points of ``spaces`` (names) in ``graph``, in topological order, with levels.

    Example:
        >>> points, skipped = repair_points(graph, [s.name for s in graph.mergeable_spaces])
        >>> [(p.node, p.kind, [f.module for f in p.folds]) for p in points][:2]
        [('conv1', 'layer', ['conv1']), ...]
    """
    finder = _PointFinder(graph, set(spaces))
    return finder.find()


class _PointFinder:
    def __init__(self, graph: ModelGraph, spaces: set[str]) -> None:
        self.graph = graph
        self.nodes = {node.name: node for node in graph.nodes()}
        self.spaces = spaces
        self.model = graph.model
        self.consumers: dict[str, list[str]] = defaultdict(list)
        self.calls: dict[str, int] = defaultdict(int)
        for key, node in self.nodes.items():
            if node.kind in (NodeKind.MERGE, NodeKind.UNMERGE):
                continue
            if node.kind is NodeKind.MODULE:
                self.calls[node.target] += 1
            if node.kind is NodeKind.FUNCTION and node.target in METADATA_NAMES:
                continue  # x.size(0), x.shape read a tensor's metadata, not its values
            for source in node.inputs:
                self.consumers[source].append(key)
        self.skipped: list[SkippedPoint] = []
        self.chain_folds: dict[str, FoldTarget] = {}

    def space_of(self, key: str) -> str | None:
        names = self.nodes[key].spaces
        return names[0] if len(names) == 1 and names[0] in self.spaces else None

    def module(self, key: str) -> nn.Module | None:
        node = self.nodes[key]
        if node.kind is not NodeKind.MODULE:
            return None
        return self.model.get_submodule(node.target)

    def find(self) -> tuple[list[RepairPoint], list[SkippedPoint]]:
        order = list(nx.topological_sort(self.graph.graph))
        for key in order:
            if self.space_of(key) and _correction(self.module(key)) == "start":
                self._follow_chain(key)
        foldable: dict[str, tuple[FoldTarget, ...]] = {
            key: (fold,) for key, fold in self.chain_folds.items()
        }
        sums = []
        for key in order:
            data = self.nodes[key]
            if data.kind is NodeKind.FUNCTION and data.target in SUMS:
                space = self.space_of(key)
                if space is None:
                    continue
                folds, reason = self._sum_folds(key, foldable)
                if folds is None:
                    self.skipped.append(SkippedPoint(key, space, reason))
                else:
                    foldable[key] = folds
                    sums.append(key)
        absorbed = {source for key in sums for source in self.nodes[key].inputs}
        points = []
        for key in order:
            if key not in foldable or key in absorbed:
                continue
            folds = foldable[key]
            space = self.space_of(key)
            if not any(fold.has_bias for fold in folds):
                layers = ", ".join(fold.module for fold in folds)
                self.skipped.append(
                    SkippedPoint(key, space, f"no bias to absorb the mean shift ({layers})")
                )
                continue
            kind = "sum" if key in sums else "layer"
            points.append(RepairPoint(key, space, kind, folds))
        return self._levelled(points), self.skipped

    def _follow_chain(self, producer: str) -> None:
        """From a layer writing a space, follow single-consumer affine steps; record the end."""
        space = self.space_of(producer)
        target = self.nodes[producer].target
        if self.calls[target] > 1:
            reason = f"layer {target} is called {self.calls[target]} times"
            self.skipped.append(SkippedPoint(producer, space, reason))
            return
        fold: FoldTarget | None = self._fold_target(producer)
        current, reason = producer, ""
        while len(self.consumers[current]) == 1:
            successor = self.consumers[current][0]
            data = self.nodes[successor]
            module = self.module(successor)
            transparent_function = (
                data.kind is NodeKind.FUNCTION and data.target in TRANSPARENT_NAMES
            )
            correction = _correction(module)
            if transparent_function or correction == "pass":
                current = successor
            elif correction == "absorb" and self.calls[data.target] == 1:
                fold = self._fold_target(successor)
                reason = "" if fold else f"{data.target} has no affine parameters"
                current = successor
            else:
                break
        if fold is None:
            self.skipped.append(SkippedPoint(current, space, reason or f"{target} cannot fold"))
        else:
            self.chain_folds[current] = fold

    def _fold_target(self, key: str) -> FoldTarget | None:
        module, path = self.module(key), self.nodes[key].target
        module, path = (rule_for(module) or DEFAULT_RULE).parameter_holder(module, path)
        if getattr(module, "weight", None) is None:
            return None
        axis = 0
        for _, block in self.graph.param_axes.get(f"{path}.weight", ()):
            if block.role == "out":
                axis = block.axis
        return FoldTarget(path, axis, getattr(module, "bias", None) is not None)

    def _sum_folds(
        self, key: str, foldable: dict[str, tuple[FoldTarget, ...]]
    ) -> tuple[tuple[FoldTarget, ...] | None, str]:
        inputs = self.nodes[key].inputs
        if len(inputs) < 2:
            return None, "not a join of two branches"
        folds: list[FoldTarget] = []
        for source in inputs:
            if source not in foldable:
                reason = f"input {source} cannot absorb a correction (e.g. an identity shortcut)"
                return None, reason
            if len(self.consumers[source]) != 1:
                return None, f"input {source} is also read elsewhere"
            folds.extend(foldable[source])
        return tuple(folds), ""

    def _levelled(self, points: list[RepairPoint]) -> list[RepairPoint]:
        """Level of a point: 1 + the highest level among the points it depends on."""
        levels: dict[str, int] = {}
        keys = {point.node for point in points}
        result = []
        for point in points:  # topological order: every ancestor point has its level
            above = nx.ancestors(self.graph.graph, point.node) & keys
            levels[point.node] = 1 + max((levels[k] for k in above), default=-1)
            result.append(
                RepairPoint(point.node, point.space, point.kind, point.folds, levels[point.node])
            )
        return result


def _correction(module: nn.Module | None) -> str:
    """How the layer meets a correction (its rule's ``correction``; "stop" for functions)."""
    if module is None:
        return "stop"
    return (rule_for(module) or DEFAULT_RULE).correction_of(module)
