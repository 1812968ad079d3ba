"""ModelGraph: a model's computation graph (networkx) with its spaces, and its self-check."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import torch
from torch import Tensor, fx, nn

from graphmerge.fold import (
    AxisMap,
    SpaceMaps,
    composed_permutation,
    fold_state_dicts,
    loaded_copy,
    state_tensors,
    tensor_aliases,
)
from graphmerge.graphs import drawing
from graphmerge.graphs.nodes import GraphNode, NodeKind
from graphmerge.graphs.spaces import (
    Block,
    Channels,
    Concatenation,
    ParamAxis,
    Segment,
    Space,
    SpaceFinder,
    Value,
)
from graphmerge.runtime import ModelInputs, call_model, evaluating, example_inputs

# Where a space's features are read, from most to least preferred: pre-activation
# values (a residual sum, a norm output, a layer output) keep the sign information a
# ReLU discards, so units that never fire on the data are still told apart.
_MERGE_POINT_RANK = {"add": 3, "norm": 2, "producer": 1, "activation": 0}


@dataclass
class _Candidate:
    rank: int
    numel: int
    order: int
    node: str
    offset: int | None = None  # a part's start along the node's channel axis (None: whole)


class GraphRecorder:
    """Collects nodes and channel structures while a model is walked, then builds the graph."""

    def __init__(self, finder: SpaceFinder) -> None:
        self.finder = finder
        self.graph = nx.DiGraph()
        self._values: dict[str, Value] = {}
        self._candidates: dict[int, list[_Candidate]] = defaultdict(list)
        self._concatenations: list[tuple[str, Channels]] = []
        self._declared_merge_points: dict[int, str] = {}
        self._names: dict[int, str] = {}

    def add_node(
        self,
        key: str,
        kind: NodeKind,
        target: str,
        inputs: list[str],
        shape: tuple[int, ...] | None = None,
        value: Value = None,
        category: str = "",
    ) -> None:
        node = GraphNode(key, kind, target, tuple(inputs), shape)
        self.graph.add_node(key, **node.attributes())
        for source in inputs:
            self.graph.add_edge(source, key)
        self._values[key] = value
        if (
            category in _MERGE_POINT_RANK
            and isinstance(value, Channels)
            and len(value.segments) == 1
            and value.segments[0].repeat == 1
        ):
            numel = math.prod(shape[1:]) if shape else 0
            self._candidates[value.segments[0].element].append(
                _Candidate(_MERGE_POINT_RANK[category], numel, len(self.graph), key)
            )

    def concatenation(self, key: str, value: Channels) -> None:
        self._concatenations.append((key, value))

    def declare(self, key: str, value: Channels, name: str | None) -> None:
        """Mark ``key`` as the merge point of the space of ``value`` (and name it)."""
        element = value.segments[0].element
        self._declared_merge_points[element] = key
        if name:
            self._names[element] = name

    def finish(
        self, model: nn.Module, source: str, module: fx.GraphModule | None = None
    ) -> ModelGraph:
        finder = self.finder
        best: dict[int, tuple[tuple, _Candidate]] = {}
        for element, candidates in self._candidates.items():
            for part, candidate in _parts_of(finder, element, candidates):
                root = finder.root(part)
                # Whole nodes first: a refined element's node carries its parts side by side.
                key = (candidate.rank, candidate.offset is None, candidate.numel, candidate.order)
                if root not in best or key > best[root][0]:
                    best[root] = (key, candidate)
        merge_points = {root: (c.node, c.offset) for root, (_, c) in best.items()}
        for element, key in self._declared_merge_points.items():
            merge_points[finder.root(element)] = (key, None)
        spaces, by_element = finder.spaces(merge_points, self._names)
        for key, value in self._values.items():
            if isinstance(value, Channels):
                value = finder.expand(value)
                names = tuple(
                    dict.fromkeys(
                        by_element[s.element].name
                        for s in value.segments
                        if s.element in by_element
                    )
                )
                self.graph.nodes[key]["spaces"] = names
                self.graph.nodes[key]["channel_axis"] = value.axis
        concatenations = [
            Concatenation(
                key,
                tuple(_blocks(finder.expand(value), by_element)),
            )
            for key, value in self._concatenations
        ]
        _insert_merge_nodes(self.graph, spaces)
        return ModelGraph(model, self.graph, spaces, concatenations, source=source, module=module)


def _parts_of(
    finder: SpaceFinder, element: int, candidates: list[_Candidate]
) -> Iterable[tuple[int, _Candidate]]:
    """The candidates of ``element``, or of each of its parts (at their offsets) where it was
    refined: a node that carries a refined element carries its parts side by side."""
    if not finder.is_refined(element):
        yield from ((element, candidate) for candidate in candidates)
        return
    whole = finder.expand(Channels(None, (Segment(element, finder.width(element)),)))
    offset = 0
    for segment in whole.segments:
        for candidate in candidates:
            yield segment.element, replace(candidate, offset=(candidate.offset or 0) + offset)
        offset += segment.size


def _blocks(value: Channels, by_element: dict[int, Space]) -> Iterable[Block]:
    offset = 0
    for segment in value.segments:
        yield Block(by_element[segment.element].name, offset, segment.width, segment.repeat)
        offset += segment.size


def _insert_merge_nodes(graph: nx.DiGraph, spaces: list[Space]) -> None:
    """Put MERGE -> UNMERGE after each mergeable space's merge point (identity on values)."""
    for space in spaces:
        if not space.mergeable or space.merge_point is None:
            continue
        merge, unmerge = f"merge[{space.name}]", f"unmerge[{space.name}]"
        successors = list(graph.successors(space.merge_point))
        read = GraphNode(merge, NodeKind.MERGE, space.name, (space.merge_point,))
        graph.add_node(merge, **read.attributes())
        back = GraphNode(unmerge, NodeKind.UNMERGE, space.name, (merge,))
        graph.add_node(unmerge, **back.attributes())
        graph.add_edge(space.merge_point, merge)
        graph.add_edge(merge, unmerge)
        for successor in successors:
            graph.remove_edge(space.merge_point, successor)
            graph.add_edge(unmerge, successor)


class ModelGraph:
    """A model's computation graph and its spaces.

    Attributes:
        model: the model the graph describes (never modified by graphmerge).
        graph: networkx.DiGraph; node attributes are the fields of :class:`GraphNode`
            (``kind``, ``name``, ``target``, ``inputs``, ``shape``, ``spaces``,
            ``channel_axis``); ``node(key)`` reads them typed.
        spaces: the model's spaces in topological order (see :class:`Space`).
        concatenations: tensors made of several spaces side by side (``torch.cat``).
        source: "traced" (torch.fx) or "built" (GraphBuilder).
        module: the torch.fx GraphModule of a traced graph (None for built graphs).

    Example:
        >>> graph = gm.graphs.trace(model, example_input)
        >>> print(graph.summary())
        >>> graph.check_symmetries(example_input)   # ~1e-7: the graph is exact
    """

    def __init__(
        self,
        model: nn.Module,
        graph: nx.DiGraph,
        spaces: list[Space],
        concatenations: list[Concatenation],
        source: str,
        module: fx.GraphModule | None = None,
    ) -> None:
        self.model = model
        self.graph = graph
        self.spaces = spaces
        self.concatenations = concatenations
        self.source = source
        self.module = module
        # The tracer of a traced graph ("fx" or "export"), None for a built one.
        self.tracer: str | None = None
        self.aliases = tensor_aliases(model)
        self.param_axes: dict[str, list[tuple[str, ParamAxis]]] = defaultdict(list)
        for space in spaces:
            for block in space.param_axes:
                self.param_axes[block.param].append((space.name, block))
        self._check_params()

    def _check_params(self) -> None:
        known = set(state_tensors(self.model))
        missing = sorted(set(self.param_axes) - known - set(self.aliases.values()))
        if missing:
            raise ValueError(
                f"the graph names parameters the model does not have: {', '.join(missing[:5])}. "
                "Module paths in a hand-built graph must match model.named_modules()."
            )

    # -- access ------------------------------------------------------------------------------
    def space(self, key: int | str) -> Space:
        """A space by index (topological order) or by name."""
        if isinstance(key, int):
            if not -len(self.spaces) <= key < len(self.spaces):
                raise IndexError(
                    f"space index {key} out of range: the graph has {len(self.spaces)} spaces"
                )
            return self.spaces[key]
        for space in self.spaces:
            if space.name == key:
                return space
        names = ", ".join(space.name for space in self.spaces[:8])
        raise KeyError(f"no space named {key!r}; spaces: {names}, ...")

    def node(self, key: str) -> GraphNode:
        """The graph node ``key``, typed."""
        return GraphNode.of(self.graph.nodes[key])

    def nodes(self) -> list[GraphNode]:
        """Every graph node, typed, in insertion order."""
        return [GraphNode.of(data) for _, data in self.graph.nodes(data=True)]

    @property
    def num_inputs(self) -> int:
        """How many input tensors the model takes (traced: those the example input fed)."""
        inputs = [node for node in self.nodes() if node.kind is NodeKind.INPUT]
        fed = [node for node in inputs if node.shape is not None]
        return len(fed) if self.source == "traced" else len(inputs)

    @property
    def mergeable_spaces(self) -> list[Space]:
        return [space for space in self.spaces if space.mergeable]

    @property
    def frozen_spaces(self) -> list[Space]:
        return [space for space in self.spaces if space.role == "hidden" and space.frozen]

    @property
    def coverage(self) -> float:
        """Fraction of hidden channels (summed widths of hidden spaces) that are mergeable."""
        hidden = sum(space.width for space in self.spaces if space.role == "hidden")
        mergeable = sum(space.width for space in self.mergeable_spaces)
        return mergeable / hidden if hidden else 1.0

    # -- symmetries --------------------------------------------------------------------------
    @property
    def block_spaces(self) -> list[Space]:
        """The block indices (heads, groups) whose spaces are mergeable."""
        return [space for space in self.spaces if space.role == "blocks" and not space.frozen]

    def structured(self, index: str) -> list[Space]:
        """The mergeable spaces whose blocks are those of block index ``index``."""
        return [space for space in self.mergeable_spaces if space.blocks == index]

    def random_permutations(self, seed: int = 0) -> dict[str, Tensor]:
        """A random permutation of every mergeable space and block index (seeded).

        A structured space gets its index's block permutation composed with a random
        permutation within each block (``composed_permutation``).
        """
        generator = torch.Generator().manual_seed(seed)
        found = {s.name: torch.randperm(s.width, generator=generator) for s in self.block_spaces}
        for space in self.mergeable_spaces:
            if space.blocks:
                blocks = found[space.blocks]
                width = space.width // len(blocks)
                within = [torch.randperm(width, generator=generator) for _ in blocks]
                found[space.name] = composed_permutation(blocks, within)
            else:
                found[space.name] = torch.randperm(space.width, generator=generator)
        return found

    def permute(self, permutations: dict[str, Tensor], model: nn.Module | None = None) -> nn.Module:
        """A copy of ``model`` (default: the graph's model) with channels of each space permuted.

        ``permutations[name][k]`` is the old channel that becomes channel k. The
        function of the model is unchanged when the graph is correct.
        """
        model = self.model if model is None else model
        maps = {}
        for name, index in permutations.items():
            space = self.space(name)
            if not space.mergeable and space not in self.block_spaces:
                raise ValueError(f"space {name!r} is not mergeable ({space.role}, {space.reason})")
            if sorted(index.tolist()) != list(range(space.width)):
                raise ValueError(f"permutation of {name!r} must reorder 0..{space.width - 1}")
            axis_map = AxisMap.permutation(index)
            maps[name] = SpaceMaps(write=[axis_map], read=[axis_map])
        folded = fold_state_dicts([state_tensors(model)], self.param_axes, maps, self.aliases)
        return loaded_copy(model, folded)

    def check_symmetries(
        self,
        example_input: Tensor | tuple[Tensor, ...] | dict | ModelInputs,
        trials: int = 3,
        seed: int = 0,
        relative: bool = False,
    ) -> float:
        """Max abs change of the model's outputs when every mergeable space is permuted at random.

        Permutations go through the same fold the merge engine uses. Near 0
        (float rounding) proves the graph: every space holds exactly the axes that
        must move together. ``relative=True`` divides by the largest output magnitude.
        The model runs in eval mode. A parameter at a value no permutation changes
        (BatchNorm statistics at 0 and 1, a layer scale at 1e-6, a zero class token)
        hides a missing permutation: check a copy made by ``randomize_statistics``.

        Example:
            >>> graph.check_symmetries(torch.randn(8, 3, 32, 32), trials=3, seed=0)
            2.1e-07
        """
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise ValueError(f"trials must be a positive integer, got {trials!r}")
        inputs = example_inputs(example_input)
        reference = _outputs(self.model, inputs)
        worst = 0.0
        for trial in range(trials):
            permuted = self.permute(self.random_permutations(seed + trial))
            changed = _outputs(permuted, inputs)
            for before, after in zip(reference, changed, strict=True):
                worst = max(worst, (before - after).abs().max().item())
        if not relative:
            return worst
        scale = max((t.abs().max().item() for t in reference if t.numel()), default=0.0)
        return worst / scale if scale > 0 else worst

    # -- reporting ---------------------------------------------------------------------------
    def summary(self) -> str:
        """A table of the spaces (index, name, width, status) and the coverage."""
        return drawing.summary(self)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"ModelGraph({type(self.model).__name__}, {self.source}, "
            f"{self.graph.number_of_nodes()} nodes, {len(self.spaces)} spaces, "
            f"coverage {self.coverage:.0%})"
        )

    def to_dot(self) -> str:
        """The graph in Graphviz DOT (``dot -Tsvg``), coloured by node kind."""
        return drawing.to_dot(self)

    def draw(self, path: str, title: str | None = None) -> str:
        """Draw the graph to a PNG at ``path`` (written atomically); returns the path."""
        return drawing.draw(self, path, title)

    def same_spaces(self, other: ModelGraph) -> bool:
        """Whether both graphs group the same parameter axes into the same spaces."""
        return _partition(self) == _partition(other)


def _partition(graph: ModelGraph) -> set[frozenset[tuple[str, int, str, int]]]:
    return {
        frozenset((a.param, a.axis, a.role, a.offset) for a in space.param_axes)
        for space in graph.spaces
        if space.param_axes
    }


def _outputs(model: nn.Module, inputs: ModelInputs) -> list[Tensor]:
    with evaluating(model), torch.no_grad():
        result = call_model(model, inputs)
    return [t.detach().double() for t in _tensors(result)]


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
