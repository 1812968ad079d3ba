"""Git Re-Basin's straight-through estimator (STE): permutations learned on labelled data.

Weight matching aligns the weights; the STE (Ainsworth et al. 2023, Algorithm 3) aligns
for the merged model's loss instead. It keeps continuous weights theta_i for each model
i > 0 in model 0's frame (started at W_0, as the published code does, or at model i
aligned by weight matching: ``init``). Each step
projects theta_i to the nearest permutation of model i (weight matching of model i onto
theta_i), forms the midpoint (W_0 + sum_i P_i(W_i)) / N whose forward pass uses the
projected weights and whose gradient flows to theta_i (``w_proj + theta - theta.detach()``),
and takes an Adam step on the midpoint's cross-entropy. The permutations of the projection
with the lowest midpoint loss are returned.

Example:
    >>> merged = gm.merge([model_a, model_b], data.train, method="ste", steps=50, lr=1e-2)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from graphmerge.batches import labelled_batches
from graphmerge.fold import AxisMap, Match, SpaceMaps, fold_state_dicts
from graphmerge.graphs import ModelGraph
from graphmerge.matching_functions.common import permutation_match
from graphmerge.matching_functions.entries import Entry, MatchingProblem, Solution
from graphmerge.matching_functions.registry import register_entry
from graphmerge.matching_functions.weight_matching import _Problem, weight_matching
from graphmerge.runtime import Inputs, ModelInputs, evaluating, logits_of, model_device, moved_to

PAPER = (
    "Ainsworth et al. 2023, Git Re-Basin: Merging Models modulo Permutation Symmetries, ICLR "
    "(straight-through estimator, Algorithm 3)"
)
INITS = ("reference", "aligned")
State = Mapping[str, Tensor]
Permutations = dict[str, Tensor]
NEEDS_LABELS = (
    "ste needs labelled data: pass a loader of (input, target) pairs or dicts with 'labels' "
    "(gm.merge([a, b], loader, method='ste'), or merger.merge('ste', loader=loader))"
)


@dataclass
class StraightThrough:
    """Permutations per space and model, and the midpoint loss of each step's projection.

    ``permutations[space][i][k]`` is the unit of model i that becomes merged unit k (model
    0: the identity). ``loss[t]`` is the midpoint loss on the data after t Adam steps;
    ``loss[0] == initial_loss`` is weight matching's; ``best_step`` indexes the lowest.
    """

    permutations: dict[str, list[Tensor]]
    loss: list[float] = field(default_factory=list)
    initial_loss: float = math.nan
    best_step: int = 0


def ste(
    states: Sequence[State],
    graph: ModelGraph,
    models: Sequence[nn.Module],
    loader: Iterable | None,
    spaces: Sequence[str] | None = None,
    steps: int = 50,
    lr: float = 1e-2,
    seed: int = 0,
    max_batches: int | None = None,
    max_sweeps: int = 100,
    init: str = "reference",
) -> StraightThrough:
    """Permutations of models 1.. onto model 0 that minimise the midpoint's loss (STE).

    min_theta CE((W_0 + sum_i proj_i(theta_i)) / N) with proj_i(theta) = argmax_P <theta,
    P(W_i)>, the gradient passed straight through the projection; Adam on theta.

    One step is one pass over ``loader`` (its first ``max_batches`` batches): the gradient
    of the midpoint's mean cross-entropy over those samples, so every step's loss is
    measured on the same data and the best projection is well defined. The midpoint runs in
    eval mode (BatchNorm uses the folded running statistics), through
    ``torch.func.functional_call`` on a copy of model 0: no model is modified. N > 2: each
    model is first aligned to model 0 by weight matching, then all theta_i are trained
    jointly on the N-model average. Spaces outside ``spaces`` keep their units as they are.

    Args:
        states: the models' tensors (``state_tensors``), model 0 the reference.
        graph: the models' graph; models: the models themselves.
        loader: re-iterable labelled batches ((input, target) pairs or dicts with labels).
        spaces: the spaces to permute (default: every mergeable space).
        steps: Adam steps (0: weight matching's permutations).
        lr: Adam's learning rate.
        seed: seeds weight matching's visiting order and the loader's shuffling.
        max_batches: the batches of ``loader`` one step reads (default: all).
        max_sweeps: the most coordinate-descent sweeps of each projection.
        init: where theta starts: "reference" (default, the published code: theta_i = W_0)
            or "aligned" (theta_i = model i aligned by weight matching). Both project first
            to weight matching's permutations; from "aligned" theta sits on that projection
            and needs far larger steps to leave it.
    """
    _check(states, models, loader, steps, lr, seed, max_batches)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    problem = _Problem(graph, spaces)  # checks the names, puts them in topological order
    names = list(problem.widths)
    start = [
        weight_matching([states[0], state], graph, names, seed=seed, max_sweeps=max_sweeps)
        for state in states[1:]
    ]
    trained = sorted(problem.param_axes)  # the tensors a projection reads (theta)
    midpoint = _Midpoint(graph, states, models[0], names)
    current = [{name: found.permutations[name][1] for name in names} for found in start]
    starts = [
        midpoint.projected(model, perms) if init == "aligned" else states[0]  # "reference"
        for model, perms in enumerate(current, start=1)
    ]
    learned = {name for name, _ in models[0].named_parameters()}  # buffers take no gradient
    thetas = [
        {
            key: state[key].detach().to(midpoint.device).clone().requires_grad_(key in learned)
            for key in trained
        }
        for state in starts
    ]
    others = [problem.tensors(state) for state in states[1:]]
    optimizer = torch.optim.Adam(
        [t for theta in thetas for t in theta.values() if t.requires_grad], lr=lr
    )
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    best, best_perms = math.inf, current
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # a shuffling loader draws the same batches each run
        for step in range(steps + 1):
            if step:
                targets = [
                    problem.tensors({k: t.detach() for k, t in theta.items()}) for theta in thetas
                ]
                current = [
                    problem.align(target, other, generator, max_sweeps, start=perms)[0]
                    for target, other, perms in zip(targets, others, current, strict=True)
                ]
            optimizer.zero_grad()
            loss = midpoint.loss(current, thetas, loader, max_batches, grad=step < steps)
            losses.append(loss)
            if step == 0 or loss < best - 1e-9 * abs(best):  # not a reshuffled sum's rounding
                best, best_perms = loss, current
            if step < steps:
                optimizer.step()
    permutations = {
        name: [torch.arange(problem.widths[name])] + [perms[name] for perms in best_perms]
        for name in names
    }
    return StraightThrough(permutations, losses, losses[0], losses.index(best))


class _Midpoint:
    """The midpoint model of N models under permutations, as tensors for functional_call."""

    def __init__(
        self, graph: ModelGraph, states: Sequence[State], reference: nn.Module, names: Sequence[str]
    ) -> None:
        self.graph, self.states, self.names = graph, states, list(names)
        self.module = copy.deepcopy(reference)  # run with the midpoint's tensors, never changed
        self.device = model_device(self.module)
        # The tensors functional_call takes: each shared (tied) tensor under its first name.
        self.keys = [key for key in states[0] if key not in graph.aliases]
        self.mapped = {name: graph.space(name) for name in self.names}

    def projected(self, model: int, permutations: Permutations) -> dict[str, Tensor]:
        """Model ``model``'s tensors with ``permutations`` applied (and the block indices'
        permutations they imply): P(W_model) in model 0's frame."""
        maps = {}
        for name, index in permutations.items():
            maps[name] = _permutation_maps(index)
            space = self.mapped[name]
            if space.blocks:
                blocks = self.graph.space(space.blocks).width
                within = space.width // blocks
                maps[space.blocks] = _permutation_maps(index[::within] // within)
        state = self.states[model]
        return fold_state_dicts([state], self.graph.param_axes, maps, self.graph.aliases)

    def tensors(self, projected: Sequence[State], thetas: Sequence[State]) -> dict[str, Tensor]:
        """(W_0 + sum_i P_i(W_i)) / N, each trained tensor of P_i(W_i) straight through
        theta_i (its value, theta_i's gradient)."""
        count = len(self.states)
        midpoint = {}
        for key in self.keys:
            value = self.states[0][key].detach()
            if not value.is_floating_point():
                midpoint[key] = value
                continue
            for state, theta in zip(projected, thetas, strict=True):
                value = value + state[key]
                if key in theta and theta[key].requires_grad:
                    value = value + (theta[key] - theta[key].detach())
            midpoint[key] = value / count
        return midpoint

    def loss(
        self,
        permutations: Sequence[Permutations],
        thetas: Sequence[State],
        loader: Iterable,
        max_batches: int | None,
        grad: bool,
    ) -> float:
        """The midpoint's mean cross-entropy over the batches; its gradient in theta if ``grad``."""
        projected = [
            {k: v.to(self.device) for k, v in self.projected(model, perms).items()}
            for model, perms in enumerate(permutations, start=1)
        ]
        total, count = 0.0, 0
        with evaluating(self.module), torch.set_grad_enabled(grad):
            for index, (inputs, targets) in enumerate(_labelled(loader)):
                if max_batches is not None and index >= max_batches:
                    break
                tensors = self.tensors(projected, thetas)
                outputs = logits_of(self._call(tensors, moved_to(inputs, self.device)))
                if int(targets.max()) >= outputs.shape[-1]:
                    raise ValueError(
                        f"ste trains on the midpoint's loss, but the models have "
                        f"{outputs.shape[-1]} outputs and the loader has label "
                        f"{int(targets.max())}: models of different label sets have no "
                        "common midpoint; merge them with a features method and "
                        "output='concat'"
                    )
                loss = F.cross_entropy(outputs, targets.to(self.device), reduction="sum")
                if grad:
                    loss.backward()
                total += float(loss.detach())
                count += targets.numel()
        if count == 0:
            raise ValueError(f"the loader yielded no samples: {NEEDS_LABELS}")
        if grad:
            for theta in thetas:
                for tensor in theta.values():
                    if tensor.grad is not None:
                        tensor.grad /= count
        return total / count

    def _call(self, tensors: dict[str, Tensor], inputs: Inputs) -> object:
        if isinstance(inputs, ModelInputs):
            return functional_call(self.module, tensors, inputs.args, dict(inputs.kwargs))
        return functional_call(self.module, tensors, (inputs,))


def _permutation_maps(index: Tensor) -> SpaceMaps:
    axis_map = AxisMap.permutation(index)
    return SpaceMaps(write=[axis_map], read=[axis_map])


def _labelled(loader: Iterable) -> Iterable:
    """The (inputs, targets) of ``loader``, with an error saying the STE needs labels."""
    try:
        yield from labelled_batches(loader)
    except ValueError as error:
        if "targets" not in str(error) and "labels" not in str(error):
            raise
        raise ValueError(f"{NEEDS_LABELS} ({error})") from error


def _check(
    states: Sequence[State],
    models: Sequence[nn.Module],
    loader: Iterable | None,
    steps: int,
    lr: float,
    seed: int,
    max_batches: int | None,
) -> None:
    if len(states) < 2 or len(models) != len(states):
        raise ValueError("ste needs at least 2 models and their state dicts (one per model)")
    if loader is None:
        raise ValueError(NEEDS_LABELS)
    if iter(loader) is loader:
        raise ValueError(
            "ste passes over the data once per step: give a DataLoader or a list of batches, "
            "not a one-shot iterator"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a whole number >= 1 or None, got {max_batches!r}")


@dataclass(frozen=True)
class TrainedEntry(Entry):
    """``fn(states, graph, models, loader, spaces, **hparams)`` returns a permutation per
    space and model (``.permutations``, ``.loss``, ``.initial_loss``, ``.best_step``),
    learned on the caller's labelled ``loader``; no feature statistics."""

    kind: ClassVar[str] = "trained"
    needs_statistics: ClassVar[bool] = False
    needs_loader: ClassVar[bool] = True
    provided: ClassVar[frozenset[str]] = frozenset(
        {"states", "graph", "models", "loader", "spaces"}
    )

    def solve(self, problem: MatchingProblem, hparams: Mapping[str, object]) -> Solution:
        names = [space.name for space in problem.spaces]
        if not names:
            return Solution({})
        found = self.function(
            problem.states, problem.graph, problem.models, problem.loader, spaces=names, **hparams
        )
        matches = {name: Match(*permutation_match(found.permutations[name])) for name in names}
        details = {
            "loss": found.loss,
            "initial_loss": found.initial_loss,
            "best_step": found.best_step,
        }
        return Solution(matches, details)


register_entry(TrainedEntry("ste", ste, PAPER))
