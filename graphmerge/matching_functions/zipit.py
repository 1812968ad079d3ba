"""ZipIt!: greedy clustering of the units of all models, within and across models.

The published implementation re-copies the whole similarity matrix at each of
its (N-1)*d steps (cubic time). This one keeps the matrix in place, masks fused
units with -inf and keeps each row's maximum, so a step costs O(N*d) plus the
rows whose maximum was one of the two fused units.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from graphmerge.matching_functions.common import (
    Statistics,
    feature_width,
    membership_match,
    unit_similarity,
)
from graphmerge.matching_functions.registry import register

PAPER = "Stoica et al. 2024, ZipIt! Merging Models from Different Tasks without Training, ICLR"


@register("zip", paper=PAPER)
def zipit(
    stats: Statistics,
    num_models: int,
    merged_width: int | None = None,
    reduction: float | None = None,
    alpha: float = 0.3,
    beta: float = 0.125,
) -> tuple[Tensor, Tensor]:
    """Fuse the most correlated pair of units (any models) until ``merged_width`` remain.

    Greedy on the correlation C of all N*d units (constant units compared by their values,
    see ``unit_similarity``): fuse argmax C[u, v]; the fused
    cluster's similarity is alpha * min of the two (alpha = 0: never again with units
    of its models); a model's within-model fusions are capped at int(beta * F / N),
    F = N*d - d'. U = cluster membership, M = (U / column sums)^T.

    Args:
        merged_width: d', the width of the merged space, in [d, N*d] (default d).
        reduction: ZipIt!'s r instead of ``merged_width``: d' = int((1 - r) * N * d).
        alpha: in [0, 1], the damping of a fused cluster's similarities (default 0.3).
        beta: >= 0, the within-model fusion budget as a share of F / N (default 0.125).
    """
    width = feature_width(stats, num_models)
    target = _target_width(width, num_models, merged_width, reduction)
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(
            f"zip needs 0 <= alpha <= 1, got {alpha!r}; alpha=0 forbids a fused cluster "
            "from fusing again with units of its models"
        )
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"zip needs a finite beta >= 0, got {beta!r}")
    correlation = unit_similarity(stats).numpy()
    labels = greedy_clusters(correlation, num_models, target, float(alpha), float(beta))
    return membership_match(torch.as_tensor(labels), target)


def _target_width(
    width: int, num_models: int, merged_width: int | None, reduction: float | None
) -> int:
    total = num_models * width
    if merged_width is not None and reduction is not None:
        raise ValueError("give zip either merged_width or reduction, not both")
    if reduction is not None:
        if not (isinstance(reduction, (int, float)) and 0.0 <= reduction < 1.0):
            raise ValueError(f"zip needs 0 <= reduction < 1, got {reduction!r}")
        merged_width = int(total * (1.0 - reduction) + 1e-4)
    if merged_width is None:
        return width
    if isinstance(merged_width, bool) or not isinstance(merged_width, int):
        raise ValueError(f"merged_width must be an integer, got {merged_width!r}")
    if not width <= merged_width <= total:
        raise ValueError(
            f"merged_width={merged_width} is outside [{width}, {total}]: zip merges "
            f"{num_models} models of width {width} into d' units with d <= d' <= N*d"
        )
    return merged_width


def greedy_clusters(
    similarity: np.ndarray, num_models: int, merged_width: int, alpha: float, beta: float
) -> np.ndarray:
    """Cluster label (0..d'-1, ordered by smallest member) of each of the N*d units.

    Same clusters as the published greedy algorithm: the pair taken at each step
    is the first maximum in row-major order of the remaining clusters, a cluster
    is represented by its smallest unit and a fusion is within-model when the two
    representatives come from one model. Where the published code would go on with
    blocked pairs (its argmax of -inf: any pair), here the within-model budgets are
    lifted with a warning once they block every pair left (with N >= 3 models the
    defaults get there: clusters gather on model 0's representatives), and the fusion
    goes on by the same rule.
    """
    total = similarity.shape[0]
    width = total // num_models
    fusions = total - merged_width
    sims = _unblocked(similarity)
    origin = np.arange(total) // width
    members = np.zeros((total, num_models), dtype=bool)  # models present in each cluster
    members[np.arange(total), origin] = True
    alive = np.ones(total, dtype=bool)
    parent = np.arange(total)
    budget_size = int(beta * fusions / num_models + 1e-9)
    budget = np.full(num_models, budget_size)
    budgets_apply, history = True, []
    row_best = sims.argmax(axis=1)
    row_max = sims[np.arange(total), row_best]
    for step in range(fusions):
        first = int(row_max.argmax())
        if row_max[first] == -np.inf and budgets_apply and budget.min() <= 0:
            warnings.warn(
                f"zip: the within-model budgets ({budget_size} fusions per model, beta={beta}) "
                f"block every pair left after {step} of {fusions} fusions of {num_models} "
                "models; the other fusions ignore them (a larger beta keeps them)",
                RuntimeWarning,
                stacklevel=4,
            )
            budgets_apply = False
            sims = _replayed(similarity, history, origin, num_models, alpha)
            _refresh(sims, np.flatnonzero(alive), row_max, row_best)
            first = int(row_max.argmax())
        if row_max[first] == -np.inf:
            raise ValueError(
                f"zip found no admissible pair after {step} of {fusions} fusions: with "
                "alpha=0 a cluster never fuses again with units of its models; use alpha > 0 "
                "or a larger merged_width"
            )
        second = int(row_best[first])
        keep, drop = min(first, second), max(first, second)
        history.append((keep, drop))
        fused = _fuse(sims, members, keep, drop, alpha)
        alive[drop] = False
        parent[drop] = keep
        row_max[drop] = -np.inf
        stale = (row_best == keep) | (row_best == drop)
        stale[keep], stale[drop] = True, False
        raised = ~stale & (fused > -np.inf)
        raised &= (fused > row_max) | ((fused == row_max) & (keep < row_best))
        row_max[raised] = fused[raised]
        row_best[raised] = keep
        if budgets_apply and origin[keep] == origin[drop]:
            model = origin[keep]
            budget[model] -= 1
            if budget[model] <= 0:
                block = np.flatnonzero(alive & (origin == model))
                sims[np.ix_(block, block)] = -np.inf
                stale[block] = True
        _refresh(sims, np.flatnonzero(stale), row_max, row_best)
    while True:  # pointer jumping: every unit to its cluster's representative
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    return np.cumsum(alive)[parent] - 1


def _unblocked(similarity: np.ndarray) -> np.ndarray:
    sims = np.array(similarity, dtype=np.float64, copy=True)
    np.fill_diagonal(sims, -np.inf)
    return sims


def _fuse(sims: np.ndarray, members: np.ndarray, keep: int, drop: int, alpha: float) -> np.ndarray:
    """Cluster ``drop`` into ``keep`` in place: its row is the damped minimum of the two."""
    fused = np.minimum(sims[keep], sims[drop])
    if alpha > 0:
        fused *= alpha
    else:
        members[keep] |= members[drop]
        fused[(members & members[keep]).any(axis=1)] = -np.inf
    fused[keep] = fused[drop] = -np.inf
    sims[drop, :] = -np.inf
    sims[:, drop] = -np.inf
    sims[keep, :] = fused
    sims[:, keep] = fused
    return fused


def _replayed(
    similarity: np.ndarray,
    history: list[tuple[int, int]],
    origin: np.ndarray,
    num_models: int,
    alpha: float,
) -> np.ndarray:
    """The similarities of the clusters of ``history`` as if no budget had blocked a pair."""
    sims = _unblocked(similarity)
    members = np.zeros((len(origin), num_models), dtype=bool)
    members[np.arange(len(origin)), origin] = True
    for keep, drop in history:
        _fuse(sims, members, keep, drop, alpha)
    return sims


def _refresh(sims: np.ndarray, rows: np.ndarray, row_max: np.ndarray, row_best: np.ndarray) -> None:
    if rows.size:
        best = sims[rows].argmax(axis=1)
        row_best[rows] = best
        row_max[rows] = sims[rows, best]
