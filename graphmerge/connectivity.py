"""Linear mode connectivity during training: the barrier between two runs as they train.

Two models train side by side, each a ``graphmerge.training.TrainingRun`` (so exactly as
``graphmerge.training.train`` trains it alone: same optimizer, schedule, data order and
seed, with its own random stream), and at chosen fractions of training the interpolation
path between their current weights is evaluated: as they are (``align=None``, the
``identity`` method) and after aligning model 1 to model 0 (``"permute"`` on feature
statistics, ``"weight_matching"`` on weights).

Progress is counted in optimizer steps (one step = one batch of the training loader):
progress p is reached after ``round(p * epochs * len(train_loader))`` steps, so a
checkpoint may fall inside an epoch; ``every=1 / epochs`` gives the epoch boundaries.

Example:
    >>> data = gm.data.digits()
    >>> models = [gm.models.build("mlp", hidden=(64, 64), seed=s) for s in (0, 1)]
    >>> result = gm.connectivity.train_with_barriers(
    ...     models, data.train, data.test, epochs=5, every=0.2, align=(None, "permute"))
    >>> [(row["progress"], row["align"], round(row["barrier_loss"], 3)) for row in result.rows]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from graphmerge import matching_functions
from graphmerge.batches import batch_inputs, check_loader
from graphmerge.evaluation import Curve, evaluate, interpolation_curve
from graphmerge.graphs import trace
from graphmerge.merge import Merger, check_models
from graphmerge.runtime import moved_to
from graphmerge.training import RandomStream, TrainingRun


@dataclass
class ConnectivityResult:
    """Barriers along training and the two trained models (new objects).

    ``rows`` holds one dict per (progress point, alignment), in training order:
    ``progress`` (fraction of the steps done), ``step``, ``epoch`` (steps / steps per
    epoch, fractional inside an epoch), ``align`` (the method's name, ``identity`` for
    unaligned), ``barrier_loss``, ``barrier_accuracy``, the endpoints' test
    ``loss_0``/``loss_1``/``accuracy_0``/``accuracy_1``, and the midpoint's
    ``loss_mid``/``accuracy_mid`` (alpha 0.5, when the grid holds it). ``curves[i]`` is
    the interpolation Curve behind ``rows[i]``; ``histories[m]`` model m's per-epoch
    training loss and accuracy, as ``TrainResult.history``.
    """

    rows: list[dict[str, Any]]
    curves: list[Curve]
    models: list[nn.Module]
    histories: list[list[dict[str, float]]] = field(default_factory=list)

    @property
    def alignments(self) -> list[str]:
        """The alignment methods, in the order they were given."""
        return list(dict.fromkeys(row["align"] for row in self.rows))

    def series(self, align: str | None = None) -> list[dict[str, Any]]:
        """The rows of one alignment (``None`` or ``"identity"``: unaligned), by progress."""
        name = _method(align)
        chosen = [row for row in self.rows if row["align"] == name]
        if not chosen:
            raise ValueError(f"no rows for align={align!r}; the result holds {self.alignments}")
        return chosen


def train_with_barriers(
    models: nn.Module | Sequence[nn.Module],
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    every: float = 0.1,
    at: Sequence[float] | None = None,
    align: str | Sequence[str | None] | None = None,
    loader: Iterable | None = None,
    max_samples: int | None = None,
    points: int = 11,
    seeds: Sequence[int] = (0, 1),
    epochs: int = 10,
    optimizer: str = "sgd",
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ConnectivityResult:
    """Train two models side by side and record their loss barrier every ``every`` of training.

    ``models``: the two initial models (e.g. built from seeds 0 and 1), or one model that
    both runs start from (the instability analysis of Frankle et al. 2020: the runs then
    differ only by data order). Copies are trained; the caller's models are never
    modified. Run m is a ``gm.training.TrainingRun(models[m], train_loader,
    seed=seeds[m], ...)`` with the same hyper-parameters and defaults as
    ``gm.training.train``: its final weights equal that call's bit for bit.

    At progress 0, ``every``, 2 ``every``, ..., 1 (or the fractions ``at``; 0 and 1 are
    always included) the interpolation path between the two current models is evaluated
    on ``test_loader`` at ``points`` alphas for each method in ``align`` (``None`` for the
    weights as they are, ``"permute"``, ``"weight_matching"``, or any registered matching
    function); methods that need feature statistics collect them on ``loader`` (default
    ``train_loader``, at most ``max_samples`` samples). Deterministic for given seeds.

    Example:
        >>> result = train_with_barriers([a, b], data.train, data.test, epochs=5,
        ...                              every=0.25, align=[None, "permute"])
        >>> result.series("permute")[-1]["barrier_loss"]
        >>> gm.plots.plot_barriers(result.rows, "barriers.png")
    """
    initial = _initial_models(models)
    check_loader(train_loader)
    check_loader(test_loader)
    methods = _methods(align)
    seeds = _seeds(seeds)
    recipe = {"epochs": epochs, "optimizer": optimizer, "lr": lr, "momentum": momentum,
              "weight_decay": weight_decay, "schedule": schedule, "warmup_epochs": warmup_epochs,
              "label_smoothing": label_smoothing, "device": device, "progress": False}  # fmt: skip
    runs = [TrainingRun(model, train_loader, seed=seed, **recipe)
            for model, seed in zip(initial, seeds, strict=True)]  # fmt: skip
    steps_per_epoch = runs[0].steps_per_epoch
    fractions = _progress_points(every, at)
    steps = _checkpoint_steps(fractions, runs[0].total_steps)
    needs_statistics = any(matching_functions.entry(m).needs_statistics for m in methods)
    statistics_loader = train_loader if loader is None else loader
    if needs_statistics:
        check_loader(statistics_loader)
    device = torch.device(device)
    rows: list[dict[str, Any]] = []
    curves: list[Curve] = []
    evaluation = RandomStream(seeds[0], device)
    graph = None
    bar = tqdm(list(zip(fractions, steps, strict=True)), desc="barriers", unit="point",
               disable=not progress)  # fmt: skip
    for fraction, step in bar:
        for run in runs:
            run.advance(step)
        with evaluation.active():
            snapshots = [copy.deepcopy(run.model).eval() for run in runs]
            if graph is None:
                example = moved_to(batch_inputs(next(iter(test_loader))), device)
                graph = trace(snapshots[0], example)
            merger = Merger(snapshots, graph=graph, progress=False)
            if needs_statistics:
                merger.collect(statistics_loader, max_samples=max_samples, progress=False)
            ends = [evaluate(model, test_loader) for model in snapshots]
            for method in methods:
                curve = interpolation_curve(merger, test_loader, method, points=points)
                curves.append(curve)
                rows.append(_row(fraction, step, steps_per_epoch, curve, ends))
        bar.set_postfix(barrier=f"{rows[-1]['barrier_loss']:.3f}")
    trained = [run.finish() for run in runs]
    return ConnectivityResult(rows, curves, trained, [run.history for run in runs])


def _row(
    fraction: float, step: int, steps_per_epoch: int, curve: Curve, ends: list[dict[str, Any]]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "progress": fraction, "step": step, "epoch": step / steps_per_epoch,
        "align": curve.method, "barrier_loss": curve.barrier,
        "barrier_accuracy": curve.accuracy_barrier,
        "loss_0": ends[0]["loss"], "loss_1": ends[1]["loss"],
        "accuracy_0": ends[0]["accuracy"], "accuracy_1": ends[1]["accuracy"],
    }  # fmt: skip
    if 0.5 in curve.alphas:
        middle = curve.alphas.index(0.5)
        row["loss_mid"], row["accuracy_mid"] = curve.losses[middle], curve.accuracies[middle]
    return row


def _initial_models(models: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        models = [models, models]
    if not isinstance(models, Sequence) or len(models) != 2:
        count = len(models) if isinstance(models, Sequence) else type(models).__name__
        raise ValueError(
            f"train_with_barriers trains 2 models: pass two initial models (or one that both "
            f"runs start from), got {count}"
        )
    check_models(list(models))
    return list(models)


def _method(align: str | None) -> str:
    return "identity" if align is None else align


def _methods(align: str | Sequence[str | None] | None) -> list[str]:
    chosen = [align] if align is None or isinstance(align, str) else list(align)
    if not chosen:
        raise ValueError("align is empty: give None, a method name, or a list of them")
    methods = [_method(item) for item in chosen]
    for method in methods:
        if not isinstance(method, str):
            raise TypeError(f"align holds {method!r}: give None or method names")
        matching_functions.entry(method)  # a clear error for an unknown name
    if len(set(methods)) != len(methods):
        raise ValueError(f"align names a method twice: {chosen}")
    return methods


def _seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if len(seeds) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be two whole numbers (one per run), got {seeds!r}")
    return seeds


def _progress_points(every: float, at: Sequence[float] | None) -> list[float]:
    """The fractions of training to measure at: 0, every, 2 every, ..., 1 (or ``at``)."""
    if at is not None:
        chosen = sorted({float(f) for f in at} | {0.0, 1.0})
        if chosen[0] < 0 or chosen[-1] > 1:
            raise ValueError(f"at must hold fractions of training in [0, 1], got {list(at)}")
        return chosen
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 < every <= 1:
        raise ValueError(f"every must be a fraction of training in (0, 1], got {every!r}")
    count = round(1 / every)
    if math.isclose(count * every, 1.0, rel_tol=1e-9):
        return [index / count for index in range(count + 1)]
    fractions = [0.0]
    while fractions[-1] + every < 1 - 1e-9:
        fractions.append(round(fractions[-1] + every, 12))
    return [*fractions, 1.0]


def _checkpoint_steps(fractions: list[float], total: int) -> list[int]:
    steps = [round(fraction * total) for fraction in fractions]
    if len(set(steps)) != len(steps):
        raise ValueError(
            f"two progress points fall on the same step: training has {total} steps "
            f"(epochs x batches per epoch), so measure at most every {1 / total:.3g} of it "
            "(a larger every=, or more epochs)"
        )
    return steps


__all__ = ["ConnectivityResult", "train_with_barriers"]
