"""Normalization after merging: RESET-BN, REPAIR and RESCALE.

Merged networks lose activation variance ("variance collapse"); these functions
repair the statistics of a merged (or pruned) model on data and return a new
model. ``reset_bn`` recomputes BatchNorm running statistics; ``repair`` gives every
merged unit the mean and std of the source units it combines; ``rescale`` the std
only; ``match_statistics`` does the same toward any reference models of the same
widths (after pruning); ``renormalize`` is the engine, with a per-point report. The
merge engine finds them by name in one registry (``register``, ``available``): each
takes a ``NormalizationRequest`` and returns a ``Renormalized`` report.

Example:
    >>> merger = gm.Merger([a, b], example_input=x); merger.collect(data.train)
    >>> result = merger.merge("permute")
    >>> repaired = gm.normalization.repair(result.model, [a, b], result, data.train)
    >>> reset = gm.normalization.reset_bn(result.model, data.train)
"""

from graphmerge.normalization.points import FoldTarget, RepairPoint, SkippedPoint, repair_points
from graphmerge.normalization.registry import (
    Normalization,
    NormalizationRequest,
    PointReport,
    Renormalized,
    available,
    check_data,
    check_name,
    normalize,
    register,
)
from graphmerge.normalization.reset import reset_bn

# isort: split
# After reset: the registry lists reset, repair, rescale in that order.
from graphmerge.normalization.repair import (
    ReferenceCache,
    match_statistics,
    merge_matrices,
    renormalize,
    repair,
    rescale,
)

__all__ = [
    "FoldTarget",
    "Normalization",
    "NormalizationRequest",
    "PointReport",
    "ReferenceCache",
    "Renormalized",
    "RepairPoint",
    "SkippedPoint",
    "available",
    "check_data",
    "check_name",
    "match_statistics",
    "merge_matrices",
    "normalize",
    "register",
    "renormalize",
    "repair",
    "repair_points",
    "rescale",
    "reset_bn",
]
