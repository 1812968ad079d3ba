"""Reports of a ModelGraph: the summary table, Graphviz DOT text and a PNG picture."""

from __future__ import annotations

from typing import Protocol

import networkx as nx
from torch import nn

from graphmerge._atomic import atomic_write
from graphmerge.graphs.nodes import GraphNode
from graphmerge.graphs.spaces import Concatenation, Space


class ModelGraph(Protocol):
    """What the reports read of a ModelGraph (which calls them: this module is below it)."""

    model: nn.Module
    graph: nx.DiGraph
    spaces: list[Space]
    concatenations: list[Concatenation]
    source: str

    @property
    def mergeable_spaces(self) -> list[Space]: ...

    @property
    def frozen_spaces(self) -> list[Space]: ...

    @property
    def coverage(self) -> float: ...

    def space(self, key: int | str) -> Space: ...

    def node(self, key: str) -> GraphNode: ...


KIND_COLOURS = {
    "input": "#9ecae1",
    "output": "#9ecae1",
    "module": "#d9d9d9",
    "function": "#fdd0a2",
    "merge": "#74c476",
    "unmerge": "#c7e9c0",
}


def summary(graph: ModelGraph) -> str:
    """Spaces (index, name, width, parameter axes, status), frozen reasons and coverage."""
    rows = [("#", "space", "width", "axes", "status")]
    for space in graph.spaces:
        if space.role == "blocks":
            status = "blocks" + (" (frozen)" if space.frozen else "")
        elif space.role != "hidden":
            status = space.role
        elif space.frozen:
            status = "FROZEN"
        else:
            status = "mergeable"
        if space.blocks and space.role == "hidden":
            status += f", in blocks of {space.blocks}"
        if len(space.producers) > 1:
            status += f" (stream of {len(space.producers)} layers)"
        rows.append(
            (str(space.index), space.name, str(space.width), str(len(space.param_axes)), status)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    hidden = [space for space in graph.spaces if space.role == "hidden"]
    channels = sum(space.width for space in hidden)
    mergeable = sum(space.width for space in graph.mergeable_spaces)
    lines.append("")
    lines.append(
        f"{type(graph.model).__name__} ({graph.source}): {graph.graph.number_of_nodes()} nodes, "
        f"{len(hidden)} hidden spaces, {len(graph.mergeable_spaces)} mergeable; coverage "
        f"{graph.coverage:.1%} ({mergeable} of {channels} hidden channels)"
    )
    if graph.concatenations:
        lines.append(f"{len(graph.concatenations)} channel concatenations (block-diagonal merges)")
    for space in graph.frozen_spaces:
        lines.append(f"frozen {space.name}: {space.reason}")
    return "\n".join(lines)


def _label(graph: ModelGraph, node: str) -> str:
    found = graph.node(node)
    kind = found.kind.value
    label = found.target if kind == "module" else found.name
    if kind in ("merge", "unmerge"):
        space = graph.space(found.target)
        label = f"{kind.upper()}\n{space.name} ({space.width})"
    return label


def to_dot(graph: ModelGraph) -> str:
    """Graphviz DOT text of the graph: boxes coloured by kind, merge nodes in green."""
    ids = {node: f"n{i}" for i, node in enumerate(graph.graph.nodes)}
    lines = [
        "digraph model {",
        "  rankdir=TB;",
        '  node [shape=box, style=filled, fontname="Helvetica"];',
    ]
    for node in graph.graph.nodes:
        label = _label(graph, node).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        colour = KIND_COLOURS[graph.node(node).kind.value]
        lines.append(f'  {ids[node]} [label="{label}", fillcolor="{colour}"];')
    for source, target in graph.graph.edges:
        lines.append(f"  {ids[source]} -> {ids[target]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(graph: ModelGraph, path: str, title: str | None = None) -> str:
    """A top-to-bottom PNG of the graph (one row per topological generation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generations = list(nx.topological_generations(graph.graph))
    positions: dict[str, tuple[float, float]] = {}
    for depth, nodes in enumerate(generations):
        for column, node in enumerate(sorted(nodes)):
            positions[node] = (column - (len(nodes) - 1) / 2, -depth)
    widest = max(len(nodes) for nodes in generations)
    figure, axes = plt.subplots(figsize=(max(6.0, 2.6 * widest), max(4.0, 0.55 * len(generations))))
    nx.draw_networkx_edges(
        graph.graph,
        positions,
        ax=axes,
        arrows=True,
        arrowsize=8,
        width=0.6,
        edge_color="#636363",
        node_size=1200,
    )
    for node, (x, y) in positions.items():
        kind = graph.node(node).kind.value
        axes.text(
            x,
            y,
            _label(graph, node).replace("\n", " | "),
            ha="center",
            va="center",
            fontsize=6,
            bbox={
                "boxstyle": "round,pad=0.25",
                "fc": KIND_COLOURS[kind],
                "ec": "#525252",
                "lw": 0.5,
            },
        )
    axes.set_title(
        title
        or f"{type(graph.model).__name__}: {len(graph.spaces)} spaces, "
        f"coverage {graph.coverage:.0%}"
    )
    axes.axis("off")
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
    return str(path)
