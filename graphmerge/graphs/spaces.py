"""Spaces: sets of channel axes that are always transformed together, found by union-find.

The tracer and the GraphBuilder walk a model's operations and describe every
tensor they see by its :class:`Channels` (which tensor axis carries channels, and
which union-find *elements* those channels belong to, one :class:`Segment` per
element in order: a segment is a channel run whose offset is its position). Layers then tell the
:class:`SpaceFinder` which parameter axes read or write those channels; joins
(residual adds, gating products) unite spaces. ``SpaceFinder.spaces`` turns the
result into the immutable :class:`Space` list of a ModelGraph.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Literal

from networkx.utils import UnionFind

from graphmerge.fold import ChannelRun, ParamAxis, Role

SpaceRole = Literal["hidden", "input", "output", "blocks"]

INPUT_REASON = "model input: every model reads the same input, never permuted"
OUTPUT_REASON = "model output: logits are averaged or concatenated, never permuted"


@dataclass(frozen=True)
class Segment:
    """A block of channels along a tensor axis: ``width`` channels of one space element.

    ``repeat`` > 1 means every channel occupies ``repeat`` consecutive positions
    (a C x H x W map flattened channel-major into a vector: repeat = H * W).
    """

    element: int
    width: int
    repeat: int = 1

    @property
    def size(self) -> int:
        return self.width * self.repeat


@dataclass(frozen=True)
class Channels:
    """The channel structure of a tensor: its channel axis and the blocks along it.

    ``axis`` is None where the position is not tracked (hand-built graphs, the model input).
    """

    axis: int | None
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(segment.size for segment in self.segments)

    def moved(self, axis: int | None) -> Channels:
        return replace(self, axis=axis)

    def sliced(self, start: int, stop: int) -> Channels | None:
        """The channels at positions [start, stop) of the axis, when they are whole segments
        (None where the slice cuts a segment: which of its channels it keeps would change
        with a permutation)."""
        kept, position = [], 0
        for segment in self.segments:
            end = position + segment.size
            if start <= position and end <= stop:
                kept.append(segment)
            elif position < stop and start < end:
                return None
            position = end
        return Channels(self.axis, tuple(kept)) if kept else None

    def sliced_all(self, cuts: list[int]) -> list[Segment]:
        """The segments between consecutive ``cuts`` (each piece one whole segment)."""
        bounds = [0, *cuts, self.size]
        return [self.sliced(a, b).segments[0] for a, b in pairwise(bounds)]

    def repeated(self, factor: int) -> Channels:
        return Channels(
            self.axis,
            tuple(replace(s, repeat=s.repeat * factor) for s in self.segments),
        )


@dataclass(frozen=True)
class Unknown:
    """A tensor whose channel structure the tracer cannot follow (output of an unknown op)."""

    reason: str


@dataclass(frozen=True)
class Several:
    """The outputs of an op or layer that returns several tensors (a tuple: attention's
    (output, weights), ``split``, ``chunk``), one structure per item."""

    values: tuple[Channels | Unknown | None, ...]


@dataclass(frozen=True)
class Heads:
    """A tensor whose channels (one space) are split over axes: ``heads`` blocks along
    ``head_axis``, each block's channels along ``inner_axis``; attention logits carry the
    head index only (``element`` and ``inner_axis`` None). A packed projection not yet taken
    apart has ``parts`` > 1 pieces (q, k, v) along ``parts_axis``. ``index`` is the block
    index once an attention has paired the heads."""

    element: int | None
    heads: int
    head_axis: int
    inner_axis: int | None
    parts: int = 1
    parts_axis: int | None = None
    index: int | None = None

    def moved(self, new_axis: dict[int, int]) -> Heads:
        """The same heads with each axis k at ``new_axis[k]``."""
        return replace(
            self,
            head_axis=new_axis[self.head_axis],
            inner_axis=None if self.inner_axis is None else new_axis[self.inner_axis],
            parts_axis=None if self.parts_axis is None else new_axis[self.parts_axis],
        )


Value = Channels | Unknown | Several | Heads | None  # None: no channels (shapes, scalars, ...)


@dataclass(frozen=True)
class Space:
    """A set of channel axes of a model that must be transformed together.

    Attributes:
        name: stable name (the first layer that writes it; "input" and "output").
        index: position in topological order among the model's spaces.
        width: number of channels d.
        role: "hidden", "input" (the model input) or "output" (the logits).
        param_axes: every (parameter, axis) block the space touches.
        producers: the layers whose outputs write the space (several for a residual stream).
        merge_point: graph node whose output features are read for statistics.
        merge_offset: where the space's channels start along that node's channel axis when
            the node carries several spaces side by side (a refined space), else None.
        frozen: True where the space must not be permuted or merged.
        reason: why it is frozen ("" when it is not).
        blocks: the name of the space's block index when it is structured (attention
            heads, convolution groups: ``width // count`` channels per block, blocks moved
            only as wholes by one permutation shared with every space of that index,
            channels moved freely within their block), "" otherwise.

    A block index is itself a Space of role "blocks" whose width is the number of blocks:
    it holds the parameter axes that only the block permutation moves (a table with one
    column per head) and is matched through the spaces it structures.
    """

    name: str
    index: int
    width: int
    role: SpaceRole
    param_axes: tuple[ParamAxis, ...]
    producers: tuple[str, ...]
    merge_point: str | None
    frozen: bool
    reason: str = ""
    blocks: str = ""
    merge_offset: int | None = None

    @property
    def mergeable(self) -> bool:
        return self.role == "hidden" and not self.frozen

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(axis.param for axis in self.param_axes))


@dataclass(frozen=True)
class Block(ChannelRun):
    """One part of a channel concatenation: the run of ``space``'s channels at ``offset``."""

    space: str
    offset: int
    width: int
    repeat: int = 1


@dataclass(frozen=True)
class Concatenation:
    """A tensor made of several spaces side by side (``torch.cat`` along channels).

    It is not matched itself: its merge/unmerge is block-diagonal in its parts'.
    """

    node: str
    blocks: tuple[Block, ...]

    @property
    def width(self) -> int:
        return sum(block.width for block in self.blocks)


@dataclass
class _Element:
    width: int
    origin: str
    frozen_reasons: list[str] = field(default_factory=list)


class SpaceFinder:
    """Union-find over channel blocks, plus the parameter axes that read and write them."""

    def __init__(self, aliases: dict[str, str] | None = None) -> None:
        self._aliases = aliases or {}  # tied tensors: every name maps to the first one
        self._sets = UnionFind()
        self._elements: list[_Element] = []
        self._param_axes: list[tuple[int, ParamAxis]] = []
        self._layout: dict[tuple[str, int], tuple[Segment, ...]] = {}
        self._producers: dict[int, list[str]] = defaultdict(list)
        self._frozen_axes: dict[tuple[str, int], list[str]] = defaultdict(list)
        self._block_counts: dict[int, int] = {}  # block index element -> number of blocks
        self._structures: dict[int, list[int]] = defaultdict(list)  # element -> block indices
        self._parts: dict[int, list[int]] = {}  # an element refined into parts, in order
        self.input_element = self.new("input", 0)
        self.output_element = self.new("output", 0)
        self.freeze(self.input_element, INPUT_REASON)
        self.freeze(self.output_element, OUTPUT_REASON)

    # -- elements -------------------------------------------------------------------------
    def new(self, origin: str, width: int, producer: bool = False) -> int:
        """A fresh element of ``width`` channels first seen at ``origin``."""
        element = len(self._elements)
        self._elements.append(_Element(width, origin))
        self._sets.union(element)  # registers the element with the union-find
        if producer:
            self._producers[element].append(origin)
        return element

    def new_channels(self, origin: str, width: int, axis: int | None) -> Channels:
        return Channels(axis, (Segment(self.new(origin, width, producer=True), width),))

    # -- refinement ------------------------------------------------------------------------
    def expand(self, value: Channels) -> Channels:
        """``value`` with every refined element replaced by its parts (see ``refine``)."""
        if not self._parts or not any(s.element in self._parts for s in value.segments):
            return value
        segments: list[Segment] = []
        for segment in value.segments:
            parts = self._parts.get(segment.element)
            if parts is None:
                segments.append(segment)
                continue
            inner = Channels(None, tuple(Segment(p, self._elements[p].width) for p in parts))
            segments += [replace(p, repeat=segment.repeat) for p in self.expand(inner).segments]
        return Channels(value.axis, tuple(segments))

    def refine(self, value: Channels, cuts: list[int]) -> Channels | None:
        """``value`` with its segments cut at positions ``cuts`` of its axis: an element cut
        inside becomes parts (each element of its space is cut alike, the parts united), so
        a slice or a sum at those positions moves whole parts. None where an element that
        would be cut is structured (blocks) or repeated."""
        value = self.expand(value)
        position = 0
        for segment in value.segments:
            inside = sorted({c - position for c in cuts if position < c < position + segment.size})
            if inside and (segment.repeat != 1 or not self._split(segment.element, inside)):
                return None
            position += segment.size
        return self.expand(value)

    def width(self, element: int) -> int:
        return self._elements[element].width

    def is_refined(self, element: int) -> bool:
        """Whether ``element`` was cut into parts (its channels now belong to theirs)."""
        return element in self._parts

    def _split(self, element: int, cuts: list[int]) -> bool:
        root = self.root(element)
        if root in (self.root(self.input_element), self.root(self.output_element)):
            return False
        members = [e for e in range(len(self._elements)) if self.root(e) == root]
        if any(e in self._block_counts or e in self._structures for e in members):
            return False
        bounds = [0, *cuts, self._elements[element].width]
        first: list[int] | None = None
        for member in members:
            origin = self._elements[member]
            parts = []
            for start, stop in pairwise(bounds):
                part = self.new(f"{origin.origin}[{start}:{stop}]", stop - start)
                self._elements[part].frozen_reasons = list(origin.frozen_reasons)
                producers = self._producers.get(member, ())
                self._producers[part] = [f"{p}[{start}:{stop}]" for p in producers]
                parts.append(part)
            self._parts[member] = parts
            if first is None:
                first = parts
            for mine, theirs in zip(parts, first, strict=True):
                self.union(mine, theirs)
        return True

    def origin(self, element: int) -> str:
        """Where ``element`` was first seen (the name its space gets if nothing names it)."""
        return self._elements[element].origin

    def block_index(self, origin: str, count: int) -> int:
        """A fresh block index of ``count`` blocks (the heads or groups of ``origin``)."""
        element = self.new(origin, count)
        self._block_counts[element] = count
        return element

    def structure(self, value: Channels, index: int) -> None:
        """The channels of ``value`` form the blocks of ``index``: whole blocks move together
        (by the index's permutation), channels move only within their block.

        A space structured by two indices of the same count makes them one (one permutation
        of the blocks); of different counts, or a value of several segments, is frozen.
        """
        count = self._block_counts[index]
        value = self.expand(value)
        if len(value.segments) != 1 or value.segments[0].repeat != 1:
            self.freeze_value(value, f"{self._elements[index].origin}: blocks across spaces")
            return
        segment = value.segments[0]
        if segment.width % count:
            self.freeze_value(
                value, f"{self._elements[index].origin}: {segment.width} channels in {count} blocks"
            )
            return
        self._structures[segment.element].append(index)

    def block_of(self, value: Channels) -> int:
        """The block index that last structured ``value``'s (first) channels."""
        return self._structures[value.segments[0].element][-1]

    def input_channels(self, width: int) -> Channels:
        return Channels(None, (Segment(self.input_element, width),))

    def is_input(self, value: Value) -> bool:
        """Whether ``value`` is the model input (its width is not checked: it is never moved)."""
        return isinstance(value, Channels) and all(
            self.same(s.element, self.input_element) for s in value.segments
        )

    def freeze(self, element: int, reason: str) -> None:
        if reason not in self._elements[element].frozen_reasons:
            self._elements[element].frozen_reasons.append(reason)

    def freeze_value(self, value: Value, reason: str) -> None:
        if isinstance(value, Heads):
            for element in (value.element, value.index):
                if element is not None:
                    self.freeze_value(Channels(None, (Segment(element, 1),)), reason)
            return
        if isinstance(value, Channels):
            for segment in self.expand(value).segments:
                self.freeze(segment.element, reason)
        elif isinstance(value, Several):
            for item in value.values:
                self.freeze_value(item, reason)

    def freeze_parameter_axis(self, param: str, axis: int, reason: str) -> None:
        """Whatever space axis ``axis`` of ``param`` belongs to (now or later) is frozen."""
        param = self._aliases.get(param, param)
        if reason not in self._frozen_axes[(param, axis)]:
            self._frozen_axes[(param, axis)].append(reason)

    def add_producer(self, value: Channels, origin: str) -> None:
        for segment in self.expand(value).segments:
            self._producers[segment.element].append(origin)

    def union(self, a: int, b: int) -> None:
        self._sets.union(a, b)

    def same(self, a: int, b: int) -> bool:
        return self._sets[a] == self._sets[b]

    # -- joins ----------------------------------------------------------------------------
    def join(self, values: list[Value], where: str) -> Value:
        """Values combined elementwise (add, mul, ...): their channels become one structure."""
        channels = [value for value in values if isinstance(value, Channels)]
        unknown = [value for value in values if isinstance(value, Unknown)]
        if any(isinstance(value, Several) for value in values):
            unknown.insert(0, Unknown(f"{where} combines several tensors at once"))
            for value in values:
                self.freeze_value(value, unknown[0].reason)
        if unknown:
            for value in channels:
                self.freeze_value(value, f"{where} combines it with {unknown[0].reason}")
            return unknown[0]
        if not channels:
            return None
        channels = self._common_layout(channels)
        first = channels[0]
        for other in channels[1:]:
            if _layout(first) != _layout(other):
                reason = f"{where} adds tensors whose channel blocks differ"
                for value in channels:
                    self.freeze_value(value, reason)
                return Unknown(reason)
            for mine, theirs in zip(first.segments, other.segments, strict=True):
                self.union(mine.element, theirs.element)
        axes = {value.axis for value in channels} - {None}
        return first.moved(axes.pop() if len(axes) == 1 else first.axis)

    def _common_layout(self, values: list[Channels]) -> list[Channels]:
        """The values cut at every segment boundary of any of them (same size, no repeats),
        so that their segments pair up; as they are otherwise."""
        values = [self.expand(value) for value in values]
        if len({value.size for value in values}) != 1 or any(
            s.repeat != 1 for value in values for s in value.segments
        ):
            return values
        cuts = sorted({b for value in values for b in _boundaries(value)})
        refined = [self.refine(value, cuts) for value in values]
        return values if any(value is None for value in refined) else refined

    def concatenate(self, values: list[Channels], axis: int | None) -> Channels:
        return Channels(axis, tuple(s for value in values for s in value.segments))

    # -- parameters -----------------------------------------------------------------------
    def touch(self, param: str, axis: int, role: Role, value: Channels, groups: int = 1) -> None:
        """Parameter ``param`` reads (role "in") or writes (role "out") ``value`` along ``axis``.

        Touching the same parameter axis twice (a layer called twice, a tied weight under
        either of its names) unites the spaces; the first touch gives the axis its role.
        ``groups`` > 1: the input axis of a grouped convolution (see ``ParamAxis``).
        """
        param = self._aliases.get(param, param)
        value = self.expand(value)
        key = (param, axis)
        previous = self._layout.get(key)
        if previous is not None:
            previous = self.expand(Channels(None, previous)).segments
            if _segments_layout(previous) != _segments_layout(value.segments):
                reason = f"{param} is used twice with different channel blocks"
                for segment in (*previous, *value.segments):
                    self.freeze(segment.element, reason)
            else:
                for mine, theirs in zip(previous, value.segments, strict=True):
                    self.union(mine.element, theirs.element)
            return
        self._layout[key] = value.segments
        offset = 0
        for segment in value.segments:
            self._param_axes.append(
                (
                    segment.element,
                    ParamAxis(param, axis, role, offset, segment.width, segment.repeat, groups),
                )
            )
            offset += segment.size

    def touch_unknown(
        self, param: str, axis: int, width: int, reason: str, groups: int = 1
    ) -> Channels:
        """A parameter axis reading channels the tracer could not follow: a frozen block."""
        element = self.new(f"{param.rsplit('.', 1)[0]}.input", width)
        self.freeze(element, reason)
        value = Channels(None, (Segment(element, width),))
        self.touch(param, axis, "in", value, groups)
        return value

    # -- results --------------------------------------------------------------------------
    def root(self, element: int) -> int:
        return self._sets[element]

    def spaces(
        self,
        merge_points: dict[int, tuple[str, int | None]],
        names: dict[int, str] | None = None,
    ) -> tuple[list[Space], dict[int, Space]]:
        """The spaces in topological order, and each element's space.

        ``merge_points`` maps elements to the graph node whose output is read and the
        offset of the element's channels along it;
        ``names`` optionally names spaces (by any of their elements).
        """
        groups: dict[int, list[int]] = defaultdict(list)
        for element in range(len(self._elements)):
            groups[self.root(element)].append(element)
        index_of = self._unite_blocks(groups)
        groups = defaultdict(list)  # uniting block indices joined some of their groups
        for element in range(len(self._elements)):
            groups[self.root(element)].append(element)
        axes: dict[int, list[ParamAxis]] = defaultdict(list)
        for element, axis in self._expanded_axes():
            axes[self.root(element)].append(axis)
        indices = {self.root(index) for index in index_of.values()}
        used = [
            root
            for root, members in groups.items()
            if axes[root]
            or root in indices
            or self.input_element in members
            or self.output_element in members
        ]
        self._freeze_structures(index_of, groups, axes)
        last = len(self._elements)
        used.sort(
            key=lambda root: (
                self.input_element not in groups[root],
                self.output_element in groups[root],
                min(set(groups[root]) - {self.output_element}, default=last),
            )
        )
        spaces: list[Space] = []
        by_element: dict[int, Space] = {}
        taken: set[str] = set()
        for root in used:
            members = sorted(groups[root])
            space = self._space(len(spaces), members, axes[root], merge_points, names, taken)
            spaces.append(space)
            for element in members:
                by_element[element] = space
        return _with_block_names(spaces, by_element, index_of, self.root), by_element

    def _expanded_axes(self) -> list[tuple[int, ParamAxis]]:
        """The recorded parameter runs, a run of a refined element split into its parts'."""
        found: list[tuple[int, ParamAxis]] = []
        pending = list(self._param_axes)
        while pending:
            element, axis = pending.pop(0)
            parts = self._parts.get(element)
            if parts is None:
                found.append((element, axis))
                continue
            offset = axis.offset
            for part in parts:
                width = self._elements[part].width
                pending.append((part, replace(axis, offset=offset, width=width)))
                offset += width * axis.repeat
        return found

    def _unite_blocks(self, groups: dict[int, list[int]]) -> dict[int, int]:
        """Each structured space's (root's) block index, after uniting the indices a space
        shares; a space with blocks of two sizes is frozen and keeps none."""
        index_of: dict[int, int] = {}
        for root, members in groups.items():
            found = [index for element in members for index in self._structures.get(element, ())]
            if not found:
                continue
            counts = sorted({self._block_counts[index] for index in found})
            if len(counts) > 1:
                reason = f"blocks of {counts} sizes (heads or groups) meet here"
                for element in (*members, *found):
                    self.freeze(element, reason)
                continue
            for index in found[1:]:
                self.union(found[0], index)
            index_of[root] = found[0]
        return index_of

    def _freeze_structures(
        self,
        index_of: dict[int, int],
        groups: dict[int, list[int]],
        axes: dict[int, list[ParamAxis]],
    ) -> None:
        """A frozen space freezes its block index, and a frozen index every space it
        structures (their blocks could no longer move together), until nothing changes."""

        def frozen(root: int) -> list[str]:
            reasons = [r for e in groups[root] for r in self._elements[e].frozen_reasons]
            return reasons + [
                r for a in axes[root] for r in self._frozen_axes.get((a.param, a.axis), ())
            ]

        changed = True
        while changed:
            changed = False
            for root, index in index_of.items():
                if not axes[root]:
                    continue
                index_root = self.root(index)
                mine, theirs = frozen(root), frozen(index_root)
                if mine and not theirs:
                    self.freeze(index_root, f"a space of its blocks is frozen ({mine[0]})")
                    changed = True
                elif theirs and not mine:
                    self.freeze(groups[root][0], f"its blocks are frozen ({theirs[0]})")
                    changed = True

    def _space(
        self,
        index: int,
        members: list[int],
        param_axes: list[ParamAxis],
        merge_points: dict[int, tuple[str, int | None]],
        names: dict[int, str] | None,
        taken: set[str],
    ) -> Space:
        role: SpaceRole = "hidden"
        if any(element in self._block_counts for element in members):
            role = "blocks"
        elif self.input_element in members:
            role = "input"
        elif self.output_element in members:
            role = "output"
        reasons = [r for e in members for r in self._elements[e].frozen_reasons]
        reasons += [r for a in param_axes for r in self._frozen_axes.get((a.param, a.axis), ())]
        reasons = list(dict.fromkeys(reasons))
        if role == "blocks":
            widths = {axis.width for axis in param_axes} | {
                self._block_counts[e] for e in members if e in self._block_counts
            }
            if len(widths) > 1:
                reasons.append(f"inconsistent block counts {sorted(widths)}")
        if role == "hidden":
            widths = {axis.width for axis in param_axes}
            if len(widths) > 1:
                reasons.append(f"inconsistent widths {sorted(widths)} across its layers")
        producers = tuple(p for e in members for p in self._producers.get(e, ()))
        name = _space_name(role, members, producers, names, self._elements)
        if name in taken:
            name = f"{name}#{index}"
        taken.add(name)
        width = max((axis.width for axis in param_axes), default=0)
        if role == "blocks":
            width = max(self._block_counts[e] for e in members if e in self._block_counts)
        merge_point, merge_offset = next(
            (merge_points[e] for e in members if e in merge_points), (None, None)
        )
        return Space(
            name=name,
            index=index,
            width=width,
            role=role,
            param_axes=tuple(param_axes),
            producers=producers,
            merge_point=merge_point,
            merge_offset=merge_offset,
            frozen=bool(reasons),
            reason="; ".join(reasons),
        )


def _with_block_names(
    spaces: list[Space],
    by_element: dict[int, Space],
    index_of: dict[int, int],
    root: Callable[[int], int],
) -> list[Space]:
    """``spaces`` with each structured space's ``blocks`` set to its index space's name
    (``by_element`` updated alike)."""
    blocks = {
        by_element[root].name: by_element[root_index].name
        for root, root_index in ((r, root(i)) for r, i in index_of.items())
        if root in by_element
    }
    named = {space.name: replace(space, blocks=blocks.get(space.name, "")) for space in spaces}
    for element, space in by_element.items():
        by_element[element] = named[space.name]
    return [named[space.name] for space in spaces]


def _space_name(
    role: SpaceRole,
    members: list[int],
    producers: tuple[str, ...],
    names: dict[int, str] | None,
    elements: list[_Element],
) -> str:
    if role == "blocks":
        return elements[members[0]].origin
    if role != "hidden":
        return role
    for element in members:
        if names and element in names:
            return names[element]
    return producers[0] if producers else elements[members[0]].origin


def _boundaries(value: Channels) -> list[int]:
    """The positions where the segments of ``value`` end (the last one excluded)."""
    ends, position = [], 0
    for segment in value.segments[:-1]:
        position += segment.size
        ends.append(position)
    return ends


def _segments_layout(segments: tuple[Segment, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((segment.width, segment.repeat) for segment in segments)


def _layout(value: Channels) -> tuple[tuple[int, int], ...]:
    return _segments_layout(value.segments)
