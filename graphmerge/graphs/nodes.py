"""Graph nodes: what each node of a model graph is, typed."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


class NodeKind(str, enum.Enum):
    """What a graph node is."""

    INPUT = "input"
    OUTPUT = "output"
    MODULE = "module"
    FUNCTION = "function"
    MERGE = "merge"
    UNMERGE = "unmerge"


@dataclass(frozen=True)
class GraphNode:
    """One node of a model graph, typed. networkx keeps the same fields as the node's
    attribute dict (``graph.graph.nodes[key]["kind"]``); ``ModelGraph.node(key)`` reads them.

    Attributes:
        name: the node's key.
        kind: what the node is (a layer call, a function, a merge point, ...).
        target: the layer's module path (MODULE), the op's name (FUNCTION: "add", "cat",
            ...) or the space's name (MERGE, UNMERGE).
        inputs: the nodes it reads, in order.
        shape: the output's shape on the example input (traced graphs; else None).
        spaces: the spaces of its output's channels, in order.
        channel_axis: the tensor axis of those channels (None where not tracked).
    """

    name: str
    kind: NodeKind
    target: str
    inputs: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None
    spaces: tuple[str, ...] = ()
    channel_axis: int | None = None

    @classmethod
    def of(cls, attributes: Mapping[str, Any]) -> GraphNode:
        return cls(**{f.name: attributes[f.name] for f in fields(cls) if f.name in attributes})

    def attributes(self) -> dict[str, Any]:
        """The fields as networkx stores them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
