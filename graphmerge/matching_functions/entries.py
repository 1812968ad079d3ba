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

from graphmerge.fold import Match
from graphmerge.graphs import ModelGraph, Space
from graphmerge.matching_functions.common import Statistics, permutation_match

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

    kind: ClassVar[str] = "custom"  # what listings show
    needs_statistics: ClassVar[bool] = True  # the engine collects statistics before solving
    # Parameters the engine fills in: not hyper-parameters a user passes.
    provided: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def solve(self, problem: MatchingProblem, hparams: Mapping[str, object]) -> Solution:
        """A Match for every space of ``problem``."""

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
        for space in problem.spaces:
            context = self.context(problem, space)
            try:
                found = self.function(
                    problem.statistics[space.name], problem.num_models, **context, **hparams
                )
            except ValueError as error:
                raise ValueError(f"{self.name} on space {space.name!r}: {error}") from error
            matches[space.name] = Match(*found)
        return Solution(matches)

    def context(self, problem: MatchingProblem, space: Space) -> dict[str, object]:
        """What the engine passes besides the statistics and the hyper-parameters."""
        return {}


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
