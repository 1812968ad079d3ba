"""Weight matching (Git Re-Basin): permutations that align the weights themselves.

The permutation groups are the graph's mergeable spaces; every (parameter, axis)
run of a space contributes to its cost, biases and BN buffers included (as
outer products), so no hand-written permutation spec is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from graphmerge.fold import AxisMap, ParamAxis, SpaceMaps, block_diagonal, fold_tensors
from graphmerge.graphs import ModelGraph
from graphmerge.matching_functions.common import assignment
from graphmerge.matching_functions.registry import register
from graphmerge.matching_functions.structured import two_level_assignment

PAPER = (
    "Ainsworth et al. 2023, Git Re-Basin: Merging Models modulo Permutation Symmetries, ICLR "
    "(weight matching; MergeMany for N > 2)"
)
STARTS = ("sequential", "identity")
State = Mapping[str, Tensor]
Permutations = dict[str, Tensor]


@dataclass
class WeightMatching:
    """Permutations per space and model, and the objective after each sweep or round.

    ``permutations[space][i][k]`` is the unit of model i that becomes merged unit k.
    ``objective`` is sum over parameters of <W_0, P(W_1)> after each sweep (N = 2),
    or sum over models of <mean of the others, P(W_i)> after each round (N > 2).
    """

    permutations: dict[str, list[Tensor]]
    objective: list[float] = field(default_factory=list)
    sweeps: int = 0


@register("weight_matching", kind="weights", paper=PAPER)
def weight_matching(
    states: Sequence[State],
    graph: ModelGraph,
    spaces: Sequence[str] | None = None,
    seed: int = 0,
    max_sweeps: int = 100,
    start: str = "sequential",
) -> WeightMatching:
    """Permute models 1.. onto model 0 by coordinate descent on sum_params <W_0, P(W_i)>.

    For a space p, cost[j, k] = sum over its runs of W_0[j] . P_{-p}(W_i)[k] (every other
    space's permutation applied); solve the assignment, keep it if the objective grows.
    Spaces are visited in a seeded random order until a sweep changes nothing. N > 2:
    ``merge_many``.

    Args:
        spaces: names of the spaces to permute (default: every mergeable space).
        seed: the seed of the visiting order.
        max_sweeps: the most sweeps over all spaces (or rounds of MergeMany).
        start: where the descent starts. "sequential" (default) solves the spaces once
            in topological order, each from the parameters whose other axes are fixed or
            already solved: a permuted copy is recovered exactly at this step, where the
            descent from "identity" (the published algorithm) can stop in a local optimum
            (e.g. an MLP whose first layer has 2 units). MergeMany (N > 2) starts every
            model at the identity.
    """
    _check(states, max_sweeps, seed)
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if len(states) > 2:
        return merge_many(states, graph, spaces, seed=seed, max_rounds=max_sweeps)
    problem = _Problem(graph, spaces)
    tensors = [problem.tensors(state) for state in states]
    generator = torch.Generator().manual_seed(seed)
    first = problem.sequential(*tensors) if start == "sequential" else None
    permutations, objective, sweeps = problem.align(
        tensors[0], tensors[1], generator, max_sweeps, start=first
    )
    return WeightMatching(problem.per_model([problem.identity(), permutations]), objective, sweeps)


def merge_many(
    states: Sequence[State],
    graph: ModelGraph,
    spaces: Sequence[str] | None = None,
    seed: int = 0,
    max_rounds: int = 100,
) -> WeightMatching:
    """MergeMany: align each model in turn to the mean of the others until none changes.

    Rounds visit the models in a seeded random order; each alignment is a weight
    matching of model i onto mean_{j != i} P_j(W_j), started from its current
    permutations.
    """
    problem = _Problem(graph, spaces)
    _check(states, max_rounds, seed)
    tensors = [problem.tensors(state) for state in states]
    generator = torch.Generator().manual_seed(seed)
    permutations = [problem.identity() for _ in states]
    permuted = list(tensors)  # each model with its current permutations applied
    others = len(states) - 1
    objective: list[float] = []
    for round_ in range(1, max_rounds + 1):
        changed = False
        for model in torch.randperm(len(states), generator=generator).tolist():
            target = {
                name: sum(p[name] for j, p in enumerate(permuted) if j != model) / others
                for name in tensors[model]
            }
            found, _, _ = problem.align(
                target, tensors[model], generator, max_rounds, start=permutations[model]
            )
            if any(not torch.equal(found[s], permutations[model][s]) for s in found):
                changed = True
                permutations[model] = found
                permuted[model] = problem.permuted(tensors[model], found)
        summed = {name: sum(p[name] for p in permuted) for name in tensors[0]}
        objective.append(
            sum(float(((summed[n] - p[n]) * p[n]).sum()) for p in permuted for n in summed) / others
        )
        if not changed:
            return WeightMatching(problem.per_model(permutations), objective, round_)
    return WeightMatching(problem.per_model(permutations), objective, max_rounds)


def _check(states: Sequence[State], max_sweeps: int, seed: int) -> None:
    if len(states) < 2:
        raise ValueError("weight matching needs the state dicts of at least 2 models")
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise ValueError(f"max_sweeps must be a positive integer, got {max_sweeps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")


class _Problem:
    """The permutation groups of a graph and the parameter runs each one touches."""

    def __init__(self, graph: ModelGraph, spaces: Sequence[str] | None) -> None:
        mergeable = {space.name: space for space in graph.mergeable_spaces}
        names = list(mergeable) if spaces is None else list(spaces)
        unknown = [name for name in names if name not in mergeable]
        names = [name for name in mergeable if name in names]  # topological order
        if unknown:
            raise ValueError(
                f"weight matching cannot permute {unknown}: not mergeable spaces of this graph"
            )
        self.widths = {name: mergeable[name].width for name in names}
        # A grouped convolution's weight is matched as the block-diagonal weight it acts as.
        self.grouped = {
            run.param: run for name in names for run in mergeable[name].param_axes if run.groups > 1
        }
        self.runs: dict[str, list[ParamAxis]] = {
            name: [replace(run, groups=1) for run in mergeable[name].param_axes] for name in names
        }
        params = {run.param for runs in self.runs.values() for run in runs}
        self.param_axes = {
            param: [(space, replace(run, groups=1)) for space, run in graph.param_axes[param]]
            for param in params
        }
        # Structured spaces are solved together with the others of their block index.
        self.blocks: dict[str, list[str]] = {}
        for name in names:
            if mergeable[name].blocks:
                self.blocks.setdefault(mergeable[name].blocks, []).append(name)
        self.block_counts = {index: graph.space(index).width for index in self.blocks}
        self.coordinates: list[str | tuple[str, ...]] = []  # topological order
        for name in names:
            index = mergeable[name].blocks
            if not index:
                self.coordinates.append(name)
            elif self.blocks[index][0] == name:
                self.coordinates.append(tuple(self.blocks[index]))
        # The permuted spaces each parameter touches (the others are fixed).
        self.spaces_of = {
            param: {name for name, _ in axes if name in self.widths}
            for param, axes in self.param_axes.items()
        }

    def identity(self) -> Permutations:
        return {name: torch.arange(width) for name, width in self.widths.items()}

    def tensors(self, state: State) -> dict[str, Tensor]:
        missing = sorted(set(self.param_axes) - set(state))
        if missing:
            raise ValueError(f"the state dict lacks parameters of the graph: {missing[:3]}")
        tensors = {param: state[param].detach().cpu().double() for param in self.param_axes}
        for param, run in self.grouped.items():
            tensors[param] = block_diagonal(tensors[param], run)
        return tensors

    def permuted(
        self, tensors: Mapping[str, Tensor], permutations: Permutations, skip: str | None = None
    ) -> dict[str, Tensor]:
        """``tensors`` with every space's permutation applied (but ``skip``'s)."""
        maps = {}
        for name, index in permutations.items():
            if name != skip:
                axis_map = AxisMap.permutation(index)
                maps[name] = SpaceMaps(write=[axis_map], read=[axis_map])
        return {
            param: fold_tensors([tensor], self.param_axes[param], maps)
            for param, tensor in tensors.items()
        }

    def cost(
        self,
        target: Mapping[str, Tensor],
        other: Mapping[str, Tensor],
        space: str,
        runs: Sequence[ParamAxis] | None = None,
    ) -> Tensor:
        """cost[j, k] = sum over the space's runs (or just ``runs``) of target row j . other
        row k."""
        width = self.widths[space]
        total = torch.zeros(width, width, dtype=torch.float64)
        for run in self.runs[space] if runs is None else runs:
            total += run.rows(target[run.param], run.axis) @ run.rows(other[run.param], run.axis).T
        return total

    def sequential(self, target: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> Permutations:
        """Each space solved once, in topological order, from the runs of the parameters
        whose other axes are fixed or already solved (a permuted copy: exactly)."""
        permutations = self.identity()
        solved: set[str] = set()
        for coordinate in self.coordinates:
            spaces = (coordinate,) if isinstance(coordinate, str) else coordinate
            ready = solved | set(spaces)
            runs = {
                space: [b for b in self.runs[space] if self.spaces_of[b.param] <= ready]
                for space in spaces
            }
            if any(runs.values()):
                permutations |= self.solve(target, other, permutations, spaces, runs)
            solved |= set(spaces)
        return permutations

    def solve(
        self,
        target: Mapping[str, Tensor],
        other: Mapping[str, Tensor],
        permutations: Permutations,
        spaces: Sequence[str],
        runs: Mapping[str, Sequence[ParamAxis]],
    ) -> Permutations:
        """The best permutations of ``spaces`` (one space, or the spaces of a block index
        by a two-level assignment) from ``runs``, the other spaces' permutations fixed."""
        costs = []
        for space in spaces:
            touching = {run.param: other[run.param] for run in runs[space]}
            moved = self.permuted(touching, permutations, skip=space)
            costs.append(self.cost(target, moved, space, runs[space]))
        if len(spaces) == 1 and not self.space_blocks(spaces[0]):
            return {spaces[0]: assignment(costs[0])}
        _, composed = two_level_assignment(costs, self.block_counts[self.space_blocks(spaces[0])])
        return dict(zip(spaces, composed, strict=True))

    def space_blocks(self, space: str) -> str:
        """The block index of ``space`` ("" when it has none)."""
        return next((index for index, names in self.blocks.items() if space in names), "")

    def align(
        self,
        target: Mapping[str, Tensor],
        other: Mapping[str, Tensor],
        generator: torch.Generator,
        max_sweeps: int,
        start: Permutations | None = None,
    ) -> tuple[Permutations, list[float], int]:
        """Coordinate descent of ``other``'s permutations onto ``target``."""
        permutations = dict(start) if start is not None else self.identity()
        coordinates = self.coordinates
        objective = []
        for sweep in range(1, max_sweeps + 1):
            improved = False
            for position in torch.randperm(len(coordinates), generator=generator).tolist():
                coordinate = coordinates[position]
                if isinstance(coordinate, str):
                    space = coordinate
                    touching = {run.param: other[run.param] for run in self.runs[space]}
                    moved = self.permuted(touching, permutations, skip=space)
                    cost = self.cost(target, moved, space)
                    found = assignment(cost)
                    units = torch.arange(cost.shape[0])
                    new, old = cost[units, found].sum(), cost[units, permutations[space]].sum()
                    if new > old + 1e-12 * max(1.0, abs(float(old))):
                        permutations[space] = found
                        improved = True
                    continue
                runs = {space: self.runs[space] for space in coordinate}
                found = permutations | self.solve(target, other, permutations, coordinate, runs)
                touched = {run.param: other[run.param] for group in runs.values() for run in group}
                old, new = (
                    sum(float((target[p] * t).sum()) for p, t in self.permuted(touched, ps).items())
                    for ps in (permutations, found)
                )
                if new > old + 1e-12 * max(1.0, abs(old)):
                    permutations = found
                    improved = True
            permuted = self.permuted(other, permutations)
            objective.append(sum(float((target[p] * permuted[p]).sum()) for p in permuted))
            if not improved:
                return permutations, objective, sweep
        return permutations, objective, max_sweeps

    def per_model(self, permutations: Sequence[Permutations]) -> dict[str, list[Tensor]]:
        return {name: [perm[name] for perm in permutations] for name in self.widths}
