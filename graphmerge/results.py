"""MergeResult: a merged model and how it was made (what renormalization reads of a merge)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from graphmerge.fold import Match
from graphmerge.graphs import ModelGraph


@dataclass
class MergeResult:
    """A merged model and how it was made.

    Attributes:
        model: the merged nn.Module (a new object; the inputs are untouched).
        matches: the Match of every mergeable space, merged or kept side by side.
        merged: names of the spaces merged by the method; the other mergeable
            spaces are kept unmerged (width N*d) by start_at / stop_at.
        method, output: as requested; seconds: wall time of matching, fold and
            normalization.
        details: what the method reports besides the matrices (weight matching:
            ``objective`` per sweep and ``sweeps``), and ``normalization``: the
            ``Renormalized`` report of REPAIR / RESCALE.
        graph: the models' graph (what ``gm.normalization.repair`` needs).
        weights: the models' weights (None: 1/N each); ``matches`` hold the method's
            own matrices, folded as ``gm.weighting.reweighted(merge, weights)``.
        normalize: the normalization applied to ``model`` (None, "reset", "repair",
            "rescale").
    """

    model: nn.Module
    matches: dict[str, Match]
    merged: list[str]
    method: str
    output: str
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    graph: ModelGraph | None = None
    weights: Tensor | None = None
    normalize: str | None = None
