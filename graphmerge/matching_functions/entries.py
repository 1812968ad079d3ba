"""The matching protocol: what the engine hands a matching method, and what it gets back.

The engine builds one :class:`MatchingProblem` (the spaces to merge, the graph, and the
statistics, weights and data a method may read) and asks the registry entry to
``solve`` it: a :class:`Solution` holds a ``Match`` per space and what the method
reports. Each kind of method is an :class:`Entry` subclass: ``FeatureEntry`` (one
space at a time from feature statistics), ``ScopeEntry`` (also told where the space
sits), ``WeightEntry`` (all spaces jointly from the weights, no data). A new kind (a
joint solver, one that trains on data) is a new subclass, registered with
``register_entry``; the engine, the comparison harness and the CLI need no edit.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from graphmerge.fold import Match, SpaceMaps
from graphmerge.graphs import ModelGraph, Space
from graphmerge.matching_functions import structured
from graphmerge.matching_functions.common import Statistics, permutation_match, unit_similarity

MatchingFunction = Callable[..., object]


@dataclass(frozen=True)
class MatchingProblem:
    """The spaces to merge and everything a matching method may read.

    Attributes:
        graph: the models' graph.
        spaces: the spaces to match, in topological order.
        num_models: N.
        positions: each space's index among the graph's mergeable spaces.
        num_spaces: how many mergeable spaces the graph has.
        statistics: feature statistics by space name (None when not collected).
        states: the models' tensors by state-dict name (``state_tensors``), one per model.
        models: the models themselves (never modified).
        loader: the data, when the caller gave it (a method that trains on data).
    """

    graph: ModelGraph
    spaces: Sequence[Space]
    num_models: int
    positions: Mapping[str, int]
    num_spaces: int
    statistics: Mapping[str, Statistics] | None
    states: Sequence[Mapping[str, Tensor]]
    models: Sequence[nn.Module] = ()
    loader: Iterable | None = None


@dataclass
class Solution:
    """A Match per matched space, and what the method reports besides (e.g. an objective)."""

    matches: dict[str, Match]
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry(ABC):
    """A registered matching method: its function, its paper, and how it is solved
    (``solve``, which each kind of method defines)."""

    name: str
    function: MatchingFunction
    paper: str = ""
    # How blocks of structured spaces (heads, groups) are paired: "matched" by a two-level
    # assignment on the features, or "aligned" (block k with block k: plain averaging).
    blocks: str = "matched"

    kind: ClassVar[str] = "custom"  # what listings show
    needs_statistics: ClassVar[bool] = True  # the engine collects statistics before solving
    needs_loader: ClassVar[bool] = False  # the method itself reads the data (loader=)
    # Parameters the engine fills in: not hyper-parameters a user passes.
    provided: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def solve(self, problem: MatchingProblem, hparams: Mapping[str, object]) -> Solution:
        """A Match for every space of ``problem``."""

    def refit(
        self,
        model: nn.Module,
        problem: MatchingProblem,
        maps: Mapping[str, SpaceMaps],
        weights: Tensor | None,
        hparams: Mapping[str, object],
        progress: bool = True,
    ) -> tuple[nn.Module, dict[str, object]]:
        """The folded ``model`` after the method's own step on it (PLeaS's least squares),
        and what that step reports; most methods have none and return ``model`` as it is.
        ``maps`` are the fold's maps per space, ``weights`` the models' (None: 1/N)."""
        return model, {}

    @property
    def refits(self) -> bool:
        """Whether the method changes the folded model itself (defines ``refit``)."""
        return type(self).refit is not Entry.refit

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        return (inspect.getdoc(self.function) or "").split("\n")[0]

    @property
    def hyperparameters(self) -> dict[str, object]:
        """Keyword arguments with their defaults (``inspect.Parameter.empty`` if required)."""
        return {
            name: parameter.default
            for name, parameter in inspect.signature(self.function).parameters.items()
            if name not in self.provided
            and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
        }

    def check_hyperparameters(self, hparams: Mapping[str, object]) -> None:
        """A clear error naming the accepted hyper-parameters if one in ``hparams`` is not."""
        parameters = inspect.signature(self.function).parameters.values()
        if any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters):
            return
        unknown = sorted(set(hparams) - set(self.hyperparameters))
        if unknown:
            accepted = ", ".join(self.hyperparameters) or "none"
            raise ValueError(
                f"matching function {self.name!r} has no hyper-parameter {', '.join(unknown)}; "
                f"it accepts: {accepted}"
            )


@dataclass(frozen=True)
class FeatureEntry(Entry):
    """``fn(stats, num_models, **hparams) -> (merge, unmerge)``, one space at a time."""

    kind: ClassVar[str] = "features"
    provided: ClassVar[frozenset[str]] = frozenset({"stats", "num_models"})

    def solve(self, problem: MatchingProblem, hparams: Mapping[str, object]) -> Solution:
        matches = {}
        structured: dict[str, list[Space]] = {}
        for space in problem.spaces:
            if space.blocks:
                structured.setdefault(space.blocks, []).append(space)
                continue
            context = self.context(problem, space)
            matches[space.name] = self._match(problem, space, context, hparams)
        for index, spaces in structured.items():
            matches |= self._solve_blocks(problem, index, spaces, hparams)
        return Solution(matches)

    def _match(
        self,
        problem: MatchingProblem,
        space: Space,
        context: Mapping[str, object],
        hparams: Mapping[str, object],
        stats: Statistics | None = None,
    ) -> Match:
        stats = problem.statistics[space.name] if stats is None else stats
        try:
            found = self.function(stats, problem.num_models, **context, **hparams)
        except ValueError as error:
            raise ValueError(f"{self.name} on space {space.name!r}: {error}") from error
        return Match(*found)

    def _solve_blocks(
        self,
        problem: MatchingProblem,
        index: str,
        spaces: Sequence[Space],
        hparams: Mapping[str, object],
    ) -> dict[str, Match]:
        """The spaces of one block index: blocks paired (``blocks``), then the function on
        each merged block's units alone; every space gets the context of the first."""
        blocks = problem.graph.space(index).width

        def similarity(space: Space, model: int) -> Tensor:
            found = unit_similarity(problem.statistics[space.name])
            return found[: space.width, model * space.width : (model + 1) * space.width]

        partners = structured.block_partners(
            similarity, spaces, blocks, problem.num_models, self.aligned_blocks(hparams)
        )
        context = self.context(problem, spaces[0])
        return {
            space.name: structured.solve_blocks(
                lambda stats, space=space: self._match(problem, space, context, hparams, stats),
                problem.statistics[space.name],
                space,
                partners,
            )
            for space in spaces
        }

    def context(self, problem: MatchingProblem, space: Space) -> dict[str, object]:
        """What the engine passes besides the statistics and the hyper-parameters."""
        return {}

    def aligned_blocks(self, hparams: Mapping[str, object]) -> bool:
        """Whether blocks of structured spaces stay in place (block k with block k)."""
        return self.blocks == "aligned"


@dataclass(frozen=True)
class ScopeEntry(FeatureEntry):
    """A features function that is also told ``position`` (the space's index among the
    mergeable spaces) and ``num_spaces`` (their count): preserve-first merging."""

    kind: ClassVar[str] = "scope"
    provided: ClassVar[frozenset[str]] = frozenset(
        {"stats", "num_models", "position", "num_spaces"}
    )

    def context(self, problem: MatchingProblem, space: Space) -> dict[str, object]:
        return {"position": problem.positions[space.name], "num_spaces": problem.num_spaces}


@dataclass(frozen=True)
class WeightEntry(Entry):
    """``fn(states, graph, spaces, **hparams)`` returns a permutation per space and model
    (``.permutations``, plus ``.objective`` and ``.sweeps``): all spaces jointly, no data."""

    kind: ClassVar[str] = "weights"
    needs_statistics: ClassVar[bool] = False
    provided: ClassVar[frozenset[str]] = frozenset({"states", "graph", "spaces"})

    def solve(self, problem: MatchingProblem, hparams: Mapping[str, object]) -> Solution:
        names = [space.name for space in problem.spaces]
        if not names:
            return Solution({})
        found = self.function(problem.states, problem.graph, spaces=names, **hparams)
        matches = {name: Match(*permutation_match(found.permutations[name])) for name in names}
        return Solution(matches, {"objective": found.objective, "sweeps": found.sweeps})


ENTRY_KINDS: dict[str, type[Entry]] = {
    entry.kind: entry for entry in (FeatureEntry, ScopeEntry, WeightEntry)
}
