"""PLeaS (Nasery et al., CVPR 2025): partial merging under a width budget, then least squares.

Step 1 matches the units with an inner permutation method (``permute`` or
``weight_matching``) and, within a budget, keeps the worst-matched groups of units
unmerged (the N units side by side) while the rest are averaged: a space of width d
merges to any width in [d, N*d]. Step 2 (``graphmerge.least_squares``) refits every
merged Linear / conv layer, in topological order, so that on the merged model's own
inputs its outputs match the merge of the source models' outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from graphmerge.fold import Match, SpaceMaps
from graphmerge.graphs import ModelGraph, Space
from graphmerge.least_squares import fit_layers
from graphmerge.matching_functions.common import unit_similarity
from graphmerge.matching_functions.entries import Entry, MatchingProblem, Solution
from graphmerge.matching_functions.registry import entry, register_entry

PAPER = "Nasery et al. 2025, PLeaS: Merging Models with Permutations and Least Squares, CVPR"
INNER_METHODS = ("permute", "weight_matching")


@dataclass(frozen=True)
class GlobalBudget:
    """One budget for the whole model, allocated across spaces by matching quality.

    Give exactly one of ``width`` (total merged width over the merged spaces / their total
    width d, in [1, N]) or ``parameters`` (the merged model's parameter count / one source
    model's). The matched groups of units (one unit of each model) of every space are
    ranked by their correlation (mean over models i > 0 with model 0); the least correlated
    groups are kept unmerged first, wherever they are, until the budget is spent.

    Example:
        >>> gm.merge([a, b], loader, "pleas", budget=GlobalBudget(parameters=1.5))
    """

    width: float | None = None
    parameters: float | None = None

    def __post_init__(self) -> None:
        given = [value for value in (self.width, self.parameters) if value is not None]
        if len(given) != 1:
            raise ValueError("GlobalBudget takes exactly one of width= or parameters=")
        if isinstance(given[0], bool) or not isinstance(given[0], int | float) or given[0] < 1:
            raise ValueError(
                f"GlobalBudget needs a ratio >= 1 (1 is the full merge), got {given[0]!r}"
            )


Budget = float | Mapping[str, float] | GlobalBudget


def pleas(
    problem: MatchingProblem,
    budget: Budget = 1.0,
    inner: str = "permute",
    steps: int = 50,
    ridge: float = 1e-4,
    lr: float = 1e-3,
    max_samples: int | None = 2048,
    **inner_hparams: object,
) -> Solution:
    """Partial merging of ``inner``'s permutation matches within ``budget`` (PLeaS step 1).

    Group k (unit k of model 0 with its partners) is averaged, or kept as N units: a space
    with u groups unmerged has width d + (N - 1) u. ``budget`` is a ratio r in [1, N]
    for every space (u = round((r - 1) d / (N - 1))), a dict of such ratios by space name
    (others 1.0), or a ``GlobalBudget``. Structured spaces (heads, groups) are merged whole.

    Args:
        budget: the width budget (1.0 merges every space fully, N keeps every space whole).
        inner: "permute" or "weight_matching", the matching the groups come from.
        steps: 0 skips the least-squares step (step 2); otherwise the gradient steps per
            layer for layers without a closed form (grouped convolutions, Conv3d).
        ridge: the ridge of the closed-form fit, relative to the inputs' mean energy.
        lr: Adam's learning rate for the gradient-fitted layers.
        max_samples: samples each layer's fit reads (None: the whole loader).
        **inner_hparams: passed on to ``inner``.
    """
    if inner not in INNER_METHODS:
        raise ValueError(
            f"pleas partial-merges permutation matches: inner must be one of "
            f"{', '.join(INNER_METHODS)}, got {inner!r}"
        )
    wrapped = entry(inner)
    wrapped.check_hyperparameters(inner_hparams)
    found = wrapped.solve(problem, inner_hparams)
    groups = {
        space.name: _groups(found.matches[space.name], problem.num_models, space)
        for space in problem.spaces
        if not space.blocks
    }
    similarity = {
        name: _group_similarity(problem.statistics[name], partners)
        for name, partners in groups.items()
    }
    unmerged = _allocate(budget, problem, similarity)
    matches = dict(found.matches)
    for name, partners in groups.items():
        matches[name] = _partial_match(partners, similarity[name], unmerged[name])
    widths = {name: match.merged_width for name, match in matches.items()}
    return Solution(matches, {**found.details, "inner": inner, "merged_widths": widths})


@dataclass(frozen=True)
class PleasEntry(Entry):
    """PLeaS: a partial permutation merge (``pleas``), then the least-squares refit of the
    merged layers on data (``refit``)."""

    kind: ClassVar[str] = "pleas"
    needs_loader: ClassVar[bool] = True
    provided: ClassVar[frozenset[str]] = frozenset({"problem"})

    def solve(self, problem: MatchingProblem, hparams: Mapping[str, object]) -> Solution:
        _check_settings(problem, self.settings(hparams))
        return self.function(problem, **hparams)

    def settings(self, hparams: Mapping[str, object]) -> dict[str, object]:
        """``hparams`` over the function's defaults."""
        return {**self.hyperparameters, **hparams}

    def refit(
        self,
        model: nn.Module,
        problem: MatchingProblem,
        maps: Mapping[str, SpaceMaps],
        weights: Tensor | None,
        hparams: Mapping[str, object],
        progress: bool = True,
    ) -> tuple[nn.Module, dict[str, object]]:
        settings = self.settings(hparams)
        if settings["steps"] == 0:
            return model, {}
        fitted, report = fit_layers(
            model, problem.models, problem.graph, maps, problem.loader, weights=weights,
            ridge=settings["ridge"], steps=settings["steps"], lr=settings["lr"],
            max_samples=settings["max_samples"], progress=progress,
        )  # fmt: skip
        return fitted, {"least_squares": report}


def _check_settings(problem: MatchingProblem, settings: Mapping[str, object]) -> None:
    steps = settings["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"pleas needs steps >= 0 (0 skips the least squares), got {steps!r}")
    for name in ("ridge", "lr"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"pleas needs {name} > 0, got {value!r}")
    if steps and problem.loader is None:
        raise ValueError(
            "pleas fits the merged layers on data: pass the loader (gm.merge(models, loader, "
            "'pleas') or Merger.merge('pleas', loader=loader)), or steps=0 for the partial "
            "merge alone"
        )
    if steps and iter(problem.loader) is problem.loader:
        raise ValueError(
            "pleas reads the data again after the statistics: give a DataLoader or a list "
            "of batches, not a one-shot iterator"
        )


def _groups(match: Match, count: int, space: Space) -> Tensor:
    """(d, N) unit indices: row k holds the unit of each model averaged into merged unit k."""
    width = space.width
    merge = match.merge
    blocks = merge.reshape(merge.shape[0], count, width)
    single = (blocks != 0).sum(dim=2) == 1
    if merge.shape[0] != width or not bool(single.all()):
        raise ValueError(
            f"pleas needs a permutation match of space {space.name!r} (each merged unit one "
            "unit of every model); its inner method returned another kind"
        )
    return blocks.abs().argmax(dim=2)


def _group_similarity(stats: object, partners: Tensor) -> Tensor:
    """Mean correlation of each group's unit of model i > 0 with its unit of model 0."""
    count, width = partners.shape[1], partners.shape[0]
    similarity = unit_similarity(stats)
    first = partners[:, 0]
    found = [similarity[first, model * width + partners[:, model]] for model in range(1, count)]
    return torch.stack(found).mean(dim=0)


def _partial_match(partners: Tensor, similarity: Tensor, unmerged: int) -> Match:
    """Groups averaged, except the ``unmerged`` least similar: their N units kept apart."""
    width, count = partners.shape
    apart = set(similarity.argsort()[:unmerged].tolist())
    rows: list[list[tuple[int, float]]] = []
    for group in range(width):
        units = [model * width + int(partners[group, model]) for model in range(count)]
        if group in apart:
            rows += [[(unit, 1.0)] for unit in units]
        else:
            rows.append([(unit, 1.0 / count) for unit in units])
    merge = torch.zeros(len(rows), count * width, dtype=torch.float64)
    unmerge = torch.zeros(count * width, len(rows), dtype=torch.float64)
    for row, entries in enumerate(rows):
        for unit, value in entries:
            merge[row, unit] = value
            unmerge[unit, row] = 1.0
    return Match(merge, unmerge)


def _allocate(
    budget: Budget, problem: MatchingProblem, similarity: Mapping[str, Tensor]
) -> dict[str, int]:
    """How many groups of each space stay unmerged under ``budget``."""
    count = problem.num_models
    if isinstance(budget, GlobalBudget):
        return _allocate_globally(budget, problem, similarity)
    if isinstance(budget, Mapping):
        unknown = sorted(set(budget) - set(similarity))
        if unknown:
            raise ValueError(
                f"budget names {', '.join(unknown)}, which pleas does not merge here; its "
                f"spaces: {', '.join(similarity)}"
            )
        ratios = {name: budget.get(name, 1.0) for name in similarity}
    else:
        ratios = dict.fromkeys(similarity, budget)
    unmerged = {}
    for name, ratio in ratios.items():
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 1 <= ratio <= count:
            raise ValueError(
                f"budget {ratio!r} for space {name!r} is outside [1, {count}]: 1 merges the "
                f"space fully, {count} keeps its {count} models' units side by side"
            )
        width = similarity[name].shape[0]
        unmerged[name] = min(width, round((ratio - 1) * width / (count - 1)))
    return unmerged


def _allocate_globally(
    budget: GlobalBudget, problem: MatchingProblem, similarity: Mapping[str, Tensor]
) -> dict[str, int]:
    """Unmerge the least similar groups of all spaces until the global budget is spent."""
    count = problem.num_models
    ranked = sorted(
        (float(value), name, index)
        for name, values in similarity.items()
        for index, value in enumerate(values.tolist())
    )
    total = len(ranked)

    def allocation(taken: int) -> dict[str, int]:
        unmerged = dict.fromkeys(similarity, 0)
        for _, name, _ in ranked[:taken]:
            unmerged[name] += 1
        return unmerged

    if budget.width is not None:
        if budget.width > count:
            raise ValueError(f"GlobalBudget(width={budget.width}) is above N = {count}")
        return allocation(min(total, round((budget.width - 1) * total / (count - 1))))
    reference = _parameter_count(problem.graph, problem.models[0], {})
    low, high = 0, total  # the largest number of groups whose merged model fits the budget
    while low < high:
        middle = (low + high + 1) // 2
        widths = _widths(problem, allocation(middle))
        if (
            _parameter_count(problem.graph, problem.models[0], widths)
            <= budget.parameters * reference
        ):
            low = middle
        else:
            high = middle - 1
    return allocation(low)


def _widths(problem: MatchingProblem, unmerged: Mapping[str, int]) -> dict[str, int]:
    """The merged width of every mergeable space: merged ones by ``unmerged``, the rest N*d."""
    count = problem.num_models
    inside = {space.name for space in problem.spaces}
    widths = {}
    for space in problem.graph.mergeable_spaces:
        if space.name in inside:
            widths[space.name] = space.width + (count - 1) * unmerged.get(space.name, 0)
        else:
            widths[space.name] = count * space.width
    return widths


def _parameter_count(graph: ModelGraph, model: nn.Module, widths: Mapping[str, int]) -> int:
    """The parameters of the merged model whose spaces have ``widths`` (others unchanged)."""
    total = 0
    for name, parameter in model.named_parameters():
        sizes = list(parameter.shape)
        for space, run in graph.param_axes.get(graph.aliases.get(name, name), ()):
            if space in widths:
                grown = widths[space] / graph.space(space).width
                sizes[run.axis] += round((grown - 1) * run.size)
        total += int(torch.tensor(sizes, dtype=torch.float64).prod())
    return total


register_entry(PleasEntry("pleas", pleas, PAPER))
