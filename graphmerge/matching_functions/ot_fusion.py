"""OT fusion: align every model to model 0 by an optimal transport plan between their units.

Singh & Jaggi 2020 (activation-based alignment): the ground cost of a pair of units is
the distance of their activation vectors over the samples, the marginals are uniform,
and the plan T (exact, ``ot.emd``, or entropic, ``ot.sinkhorn``) is the soft
correspondence. POT (``pip install pot``) is imported only when the function runs.
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
    permutation_match,
    unit_similarity,
)
from graphmerge.matching_functions.registry import register

PAPER = "Singh & Jaggi 2020, Model Fusion via Optimal Transport, NeurIPS"
SOLVERS = ("emd", "sinkhorn")
METRICS = ("sqeuclidean", "euclidean", "correlation")

# d * T within this of a 0/1 matrix (entrywise) is a permutation up to float rounding.
PERMUTATION_ATOL = 1e-9
# Sinkhorn stops when the marginals are this close, or after this many iterations; epsilon
# scaling then runs at most SCALING_STEPS rounds of a tenth as many (about 20 to reach reg).
SINKHORN_STOP = 1e-8
SINKHORN_ITERATIONS = 1_000
SCALING_STEPS = 60
# Relative marginal error below which stabilised Sinkhorn's plan is kept as it is.
CONVERGED = 1e-6


@register("ot_fusion", paper=PAPER)
def ot_fusion(
    stats: Statistics,
    num_models: int,
    solver: str = "emd",
    reg: float = 0.01,
    metric: str = "sqeuclidean",
) -> tuple[Tensor, Tensor]:
    """Align every model to model 0 by an optimal transport plan between their units.

    T_i = argmin_T <C_i, T> (+ reg H(T) for sinkhorn), T 1 = T^T 1 = 1/d, C_i[a, b] the
    cost of model 0's unit a and model i's unit b; M_i = d T_i / N, U_i = d T_i^T
    (model 0: M_0 = I / N, U_0 = I). A permutation plan gives exactly ``permute``'s
    0/1 match.

    Args:
        solver: "emd" (exact network simplex, a permutation for uniform marginals) or
            "sinkhorn" (entropic, log-stabilised, soft: tends to the exact plan as reg -> 0).
        reg: > 0, the entropic regularisation of sinkhorn, relative to the cost's scale:
            the cost is divided by its mean before solving, so reg does not depend on
            the features' units (ignored by emd).
        metric: the ground cost from the statistics (S = covariance + mean mean^T, the
            second moments): "sqeuclidean" E[(x_a - y_b)^2] = S_aa + S_bb - 2 S_ab,
            "euclidean" its square root (the paper's), or "correlation"
            1 - corr(x_a, y_b) (scale free, as ``permute`` matches).

    Why U_i = d T_i^T: it is the paper's alignment of the next layer's inputs
    (W T diag(1/beta) with beta = 1/d), and d T_i is doubly stochastic, so each model
    reads every unit as a convex combination of merged units (means and constant units
    are kept) and U_i = (N M_i)^T, exactly as for a permutation; a soft plan has no
    inverse that also keeps the read map a convex combination.

    Example:
        >>> merged = gm.merge([a, b], loader, method="ot_fusion", solver="sinkhorn", reg=0.01)
    """
    width = feature_width(stats, num_models)
    plans = transport_plans(stats, num_models, solver=solver, reg=reg, metric=metric)
    scaled = [plan * width for plan in plans]
    partners = [torch.arange(width)] + [_partners(plan) for plan in scaled]
    if all(partner is not None for partner in partners):
        return permutation_match(partners)
    eye = torch.eye(width, dtype=torch.float64)
    merge = torch.cat([eye, *scaled], dim=1) / num_models
    unmerge = torch.cat([eye, *(plan.T for plan in scaled)], dim=0)
    return merge, unmerge


def transport_plans(
    stats: Statistics,
    num_models: int,
    solver: str = "emd",
    reg: float = 0.01,
    metric: str = "sqeuclidean",
) -> list[Tensor]:
    """The transport plans T_i (d x d, rows model 0's units, float64) of models i = 1..N-1.

    Each has marginals 1/d (sinkhorn's plan, stopped at a marginal error of 1e-8 or after
    at most 1,000 + 6,000 iterations, is rounded onto them); the arguments are those of
    ``ot_fusion``.

    Example:
        >>> plan = transport_plans(stats, 2, solver="sinkhorn", reg=0.01)[0]
    """
    width = feature_width(stats, num_models)
    if solver not in SOLVERS:
        raise ValueError(f"ot_fusion solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if metric not in METRICS:
        raise ValueError(f"ot_fusion metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if solver == "sinkhorn" and not (
        isinstance(reg, (int, float))
        and not isinstance(reg, bool)
        and math.isfinite(reg)
        and reg > 0
    ):
        raise ValueError(
            f"ot_fusion with solver='sinkhorn' needs a finite reg > 0, got {reg!r} "
            "(reg is relative to the mean cost: try 0.01)"
        )
    mean = stats.mean.detach().cpu().double()
    covariance = stats.covariance.detach().cpu().double()
    if not (torch.isfinite(mean).all() and torch.isfinite(covariance).all()):
        raise ValueError(
            "ot_fusion got NaN or Inf feature statistics: a model produced non-finite "
            "features on the data; check the models and the loader"
        )
    ot = _pot()
    costs = _costs(stats, mean, covariance, width, num_models, metric)
    marginal = torch.full((width,), 1.0 / width, dtype=torch.float64).numpy()
    plans = []
    for cost in costs:
        scale = float(cost.mean())
        cost = cost / scale if scale > torch.finfo(torch.float64).tiny else cost
        if solver == "emd":
            plan = ot.emd(marginal, marginal, cost.numpy(), numItermax=max(100_000, 50 * width**2))
        else:
            plan = _sinkhorn(ot, marginal, cost.numpy(), reg)
        plan = torch.as_tensor(plan, dtype=torch.float64)
        if not bool(torch.isfinite(plan).all()) or bool((plan.sum(dim=1) <= 0).any()):
            raise FloatingPointError(
                f"ot_fusion's {solver} plan is not finite (reg={reg!r}); use solver='emd'"
            )
        plans.append(_rounded(plan, 1.0 / width))
    return plans


def _sinkhorn(ot, marginal: np.ndarray, cost: np.ndarray, reg: float) -> np.ndarray:
    """The entropic plan: POT's absorption-stabilised Sinkhorn, or, where its kernel
    exp(-C / reg) underflows or it has not converged (small reg), POT's epsilon scaling
    (the same iterations warm-started from reg 1e4 down to reg)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # underflow and non-convergence are handled here
        plan = ot.sinkhorn(
            marginal,
            marginal,
            cost,
            reg,
            method="sinkhorn_stabilized",
            numItermax=SINKHORN_ITERATIONS,
            stopThr=SINKHORN_STOP,
            warn=False,
        )
        if _converged(plan, marginal):
            return plan
        return ot.bregman.sinkhorn_epsilon_scaling(
            marginal,
            marginal,
            cost,
            reg,
            numItermax=SCALING_STEPS,
            numInnerItermax=SINKHORN_ITERATIONS // 10,
            stopThr=SINKHORN_STOP**2,  # it compares the squared marginal error
            warn=False,
        )


def _converged(plan: np.ndarray, marginal: np.ndarray) -> bool:
    """Finite, and every row and column within CONVERGED of its mass."""
    if not (np.isfinite(plan).all() and (plan.sum(axis=1) > 0).all()):
        return False
    error = max(
        np.abs(plan.sum(axis=0) - marginal).max(), np.abs(plan.sum(axis=1) - marginal).max()
    )
    return bool(error <= CONVERGED * marginal.max())


def _rounded(plan: Tensor, marginal: float) -> Tensor:
    """The nearby plan with both marginals exactly ``marginal`` (Altschuler, Weed & Rigollet
    2017, Algorithm 2): scale down rows, then columns, that carry too much mass, then add
    the missing mass as a rank-one term. Sinkhorn stopped early moves by at most its
    marginal error; an exact plan is returned as it is."""
    rows = (marginal / plan.sum(dim=1)).clamp(max=1.0)
    plan = plan * rows[:, None]
    columns = (marginal / plan.sum(dim=0).clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1)
    plan = plan * columns[None, :]
    missing_rows = (marginal - plan.sum(dim=1)).clamp_min(0)
    missing_columns = (marginal - plan.sum(dim=0)).clamp_min(0)
    total = float(missing_rows.sum())
    if total > 0:
        plan = plan + torch.outer(missing_rows, missing_columns) / total
    return plan


def _costs(
    stats: Statistics,
    mean: Tensor,
    covariance: Tensor,
    width: int,
    num_models: int,
    metric: str,
) -> list[Tensor]:
    """C_i (d x d) between model 0's units (rows) and model i's units (columns)."""
    first = slice(0, width)
    blocks = [slice(i * width, (i + 1) * width) for i in range(1, num_models)]
    if metric == "correlation":
        similarity = unit_similarity(stats)
        return [(1.0 - similarity[first, block]).clamp_min(0) for block in blocks]
    moments = covariance + torch.outer(mean, mean)  # E[x x^T]
    power = moments.diagonal()
    costs = []
    for block in blocks:
        cost = power[first, None] + power[None, block] - 2 * moments[first, block]
        cost = cost.clamp_min(0)
        costs.append(cost.sqrt() if metric == "euclidean" else cost)
    return costs


def _partners(scaled_plan: Tensor) -> Tensor | None:
    """partner[k] when d * T is a permutation matrix (row k's 1 in column partner[k])."""
    partner = scaled_plan.argmax(dim=1)
    permutation = torch.zeros_like(scaled_plan)
    permutation[torch.arange(len(partner)), partner] = 1.0
    if len(set(partner.tolist())) != len(partner):
        return None
    if not bool(((scaled_plan - permutation).abs() <= PERMUTATION_ATOL).all()):
        return None
    return partner


def _pot():
    """The POT module, with a clear error when it is not installed."""
    try:
        import ot
    except ImportError as error:
        raise ImportError(
            "ot_fusion needs the POT optimal transport library: pip install pot"
        ) from error
    return ot
