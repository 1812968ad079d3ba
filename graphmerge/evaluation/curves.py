"""Interpolation curves between two aligned models and the loss barrier.

The curve evaluates the model at weights (1 - alpha, alpha) for alpha in [0, 1]
after aligning the two models with a matching function (``identity``: the weights as
they are); the barrier is the largest excess of the loss over the straight line
between the endpoint losses.

Example:
    >>> merger = gm.Merger([model_a, model_b], example_input=x)
    >>> merger.collect(data.train)
    >>> curve = gm.evaluation.interpolation_curve(merger, data.test, "permute", points=11)
    >>> curve.barrier, curve.losses
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphmerge.evaluation.metrics import evaluate
from graphmerge.merge import Merger

METRICS = ("loss", "accuracy")


@dataclass(frozen=True)
class CurvePoint:
    """One point of a curve: its ``index`` in ``Curve.alphas``, alpha and test metrics."""

    index: int
    alpha: float
    accuracy: float
    loss: float


@dataclass
class Curve:
    """Test accuracy and loss along an interpolation path (alphas ascending, 0 and 1 in)."""

    method: str
    normalize: str | None
    alphas: list[float]
    accuracies: list[float]
    losses: list[float]
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return self.method if self.normalize is None else f"{self.method} + {self.normalize}"

    @property
    def barrier(self) -> float:
        """The loss barrier: max over alpha of loss(alpha) - the endpoints' straight line."""
        return loss_barrier(self.alphas, self.losses)

    @property
    def accuracy_barrier(self) -> float:
        """The accuracy barrier: max over alpha of the endpoints' straight line - accuracy."""
        return accuracy_barrier(self.alphas, self.accuracies)

    def best(self, metric: str = "loss") -> CurvePoint:
        """The point of the path with the lowest loss (``metric="loss"``) or the highest
        accuracy (``"accuracy"``).

        Ties go to the other metric (the more accurate of equal losses, the lower loss of
        equal accuracies), then to the smaller alpha. A Curve keeps numbers, not models:
        rebuild the model at that alpha from the merger that drew the curve, with the
        curve's method and normalization (and the same hyper-parameters and loader).

        Example:
            >>> point = curve.best("accuracy")
            >>> point.alpha, point.accuracy, point.loss
            >>> model = merger.merge(curve.method, weights=point.alpha).model
        """
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        points = [
            CurvePoint(index, alpha, accuracy, loss)
            for index, (alpha, accuracy, loss) in enumerate(
                zip(self.alphas, self.accuracies, self.losses, strict=True)
            )
        ]
        if not points:
            raise ValueError("the curve has no points")
        if not all(math.isfinite(p.loss) and math.isfinite(p.accuracy) for p in points):
            raise FloatingPointError(f"the curve holds NaN or Inf values: {self.losses}")
        if metric == "loss":
            return min(points, key=lambda p: (p.loss, -p.accuracy, p.index))
        return min(points, key=lambda p: (-p.accuracy, p.loss, p.index))

    def rows(self) -> list[dict[str, Any]]:
        """One dict per point (method, normalize, alpha, accuracy, loss), for CSV tables."""
        return [
            {"method": self.method, "normalize": self.normalize or "none", "alpha": alpha,
             "accuracy": accuracy, "loss": loss}
            for alpha, accuracy, loss in zip(self.alphas, self.accuracies, self.losses, strict=True)
        ]  # fmt: skip


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """Largest excess of the loss over the straight line between the endpoint losses.

    max_alpha [loss(alpha) - ((1 - alpha) loss(0) + alpha loss(1))]; the first alpha must be
    0 and the last 1. It is 0 or positive (the endpoints lie on the line).

    Example:
        >>> round(loss_barrier([0, 0.5, 1], [0.1, 0.7, 0.2]), 2)
        0.55
    """
    return _excess(alphas, losses, sign=1.0)


def accuracy_barrier(alphas: Sequence[float], accuracies: Sequence[float]) -> float:
    """Largest shortfall of the accuracy below the straight line between the endpoints."""
    return _excess(alphas, accuracies, sign=-1.0)


def _excess(alphas: Sequence[float], values: Sequence[float], sign: float) -> float:
    alpha = torch.as_tensor(list(alphas), dtype=torch.float64)
    value = torch.as_tensor(list(values), dtype=torch.float64)
    if alpha.shape != value.shape or alpha.numel() < 2:
        raise ValueError(
            f"need one value per alpha and at least 2 points, got {alpha.numel()} alphas and "
            f"{value.numel()} values"
        )
    if alpha[0] != 0 or alpha[-1] != 1 or (alpha.diff() <= 0).any():
        raise ValueError(f"alphas must ascend from 0 to 1, got {alpha.tolist()}")
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"the curve holds NaN or Inf values: {value.tolist()}")
    line = (1 - alpha) * value[0] + alpha * value[-1]
    return max(0.0, float((sign * (value - line)).max()))


def alpha_grid(points: int) -> list[float]:
    """``points`` evenly spaced alphas from 0 to 1 (both included)."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"an interpolation curve needs points >= 2, got {points!r}")
    return [index / (points - 1) for index in range(points)]


def interpolation_curve(
    merger: Merger,
    test_loader: Iterable,
    method: str = "identity",
    points: int = 11,
    normalize: str | None = None,
    loader: Iterable | None = None,
    alphas: Sequence[float] | None = None,
    **hparams: object,
) -> Curve:
    """Evaluate the two models' interpolation path after aligning them with ``method``.

    Matching runs once (``merger.merge``); each alpha is one fold (``merger.reweight``)
    and, with ``normalize`` ("reset", "repair", "rescale"), one renormalization on
    ``loader`` (REPAIR toward the alpha-weighted endpoint statistics). ``alphas``
    overrides the ``points`` evenly spaced values.

    Example:
        >>> curve = interpolation_curve(merger, data.test, "permute", normalize="repair",
        ...                             loader=fixed_order_train_loader)
    """
    if len(merger.models) != 2:
        raise ValueError(
            f"an interpolation curve runs between 2 models, this merger holds {len(merger.models)}"
        )
    grid = alpha_grid(points) if alphas is None else [float(alpha) for alpha in alphas]
    if len(grid) < 2 or grid[0] != 0 or grid[-1] != 1:
        raise ValueError(f"alphas must start at 0 and end at 1, got {grid}")
    if any(later <= earlier for earlier, later in itertools.pairwise(grid)):
        raise ValueError(f"alphas must ascend (each larger than the one before), got {grid}")
    started = time.perf_counter()
    aligned = merger.merge(method, **hparams)
    accuracies, losses = [], []
    for alpha in grid:
        model = merger.reweight(aligned, alpha, normalize=normalize, loader=loader).model
        metrics = evaluate(model, test_loader)
        accuracies.append(metrics["accuracy"])
        losses.append(metrics["loss"])
    return Curve(method, normalize, grid, accuracies, losses, time.perf_counter() - started)
