"""Evaluation: accuracy and loss (joint and per task), the ensemble baseline,
interpolation curves and loss barriers (barriers along training: ``gm.connectivity``).

Example:
    >>> import graphmerge as gm
    >>> gm.evaluation.evaluate(merged, data.test)  # {'accuracy', 'loss', 'num_samples'}
    >>> gm.evaluation.evaluate(gm.evaluation.Ensemble([a, b]), data.test)
    >>> curve = gm.evaluation.interpolation_curve(merger, data.test, "permute")
    >>> curve.barrier, curve.best("loss").alpha
"""

from graphmerge.evaluation.curves import (
    Curve,
    CurvePoint,
    accuracy_barrier,
    alpha_grid,
    interpolation_curve,
    loss_barrier,
)
from graphmerge.evaluation.ensemble import Ensemble
from graphmerge.evaluation.metrics import check_labels, check_logits, evaluate

__all__ = [
    "Curve",
    "CurvePoint",
    "Ensemble",
    "accuracy_barrier",
    "alpha_grid",
    "check_labels",
    "check_logits",
    "evaluate",
    "interpolation_curve",
    "loss_barrier",
]
