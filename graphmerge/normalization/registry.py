"""The normalization registry: ``reset``, ``repair``, ``rescale`` (and yours) by name.

Every normalization has one signature: it takes a :class:`NormalizationRequest` (the
merged model, the source models, the data, and what the merge made) and returns a
:class:`Renormalized` report holding a new model. Names are checked here only.

Example:
    >>> @gm.normalization.register("center")
    ... def center(request):
    ...     model = ...  # a corrected copy of request.model
    ...     return gm.normalization.Renormalized(model, "center")
    >>> gm.merge([a, b], data.train, "permute", normalize="center")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from graphmerge.fold import Match
from graphmerge.graphs import ModelGraph
from graphmerge.normalization.points import RepairPoint, SkippedPoint


@dataclass
class PointReport:
    """One corrected point: its targets, what the model had before, and the correction."""

    point: RepairPoint
    target_mean: Tensor
    target_std: Tensor
    mean_before: Tensor
    std_before: Tensor
    scale: Tensor
    shift: Tensor
    dead_units: int


@dataclass
class Renormalized:
    """The corrected model (a new object) and what was done.

    Attributes:
        model: the corrected copy.
        mode: the normalization's name ("reset", "repair", "rescale", ...).
        points: a PointReport per corrected point, in topological order.
        skipped: places that could not be corrected, with the reason.
        passes: passes over the data (1 for the references + 1 per level).
    """

    model: nn.Module
    mode: str
    points: list[PointReport] = field(default_factory=list)
    skipped: list[SkippedPoint] = field(default_factory=list)
    passes: int = 0


@dataclass(frozen=True)
class NormalizationRequest:
    """What a normalization may read.

    Attributes:
        model: the model to correct (never modified: the result is a copy).
        references: the source models whose statistics are the targets.
        loader: the data (re-iterable, in a fixed order).
        graph: the models' graph; matches: the Match per space of the merge (None: every
            unit corresponds to the same unit of each reference).
        weights: the models' weights in the merge (None: 1/N each).
        progress: show progress bars.
        reference_cache: a ``ReferenceCache`` shared by several corrections of one merger.
    """

    model: nn.Module
    references: Sequence[nn.Module]
    loader: Iterable
    graph: ModelGraph | None = None
    matches: Mapping[str, Match] | None = None
    weights: Tensor | Sequence[float] | float | None = None
    progress: bool = True
    reference_cache: object | None = None


Normalization = Callable[[NormalizationRequest], Renormalized]
_REGISTRY: dict[str, Normalization] = {}


def register(name: str) -> Callable[[Normalization], Normalization]:
    """Decorator that registers ``fn(request) -> Renormalized`` as normalization ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a normalization needs a non-empty name, got {name!r}")

    def decorator(function: Normalization) -> Normalization:
        _REGISTRY[name] = function
        return function

    return decorator


def available() -> list[str]:
    """The registered names, in registration order (reset, repair, rescale first)."""
    return list(_REGISTRY)


def check_name(name: str | None, none: str = "None") -> str | None:
    """``name`` if it is a registered normalization or None, else a clear error; ``none``
    is how the caller spells "no normalization" (the CLI: "none")."""
    if name is not None and name not in _REGISTRY:
        raise ValueError(
            f"unknown normalization {name!r}: choose one of {', '.join(available())} (or {none})"
        )
    return name


def check_data(name: str | None, loader: object) -> None:
    """A clear error for a normalization asked for without data to normalize on."""
    if name is not None and loader is None:
        raise ValueError(f"normalize={name!r} needs data: pass loader=")


def normalize(name: str, request: NormalizationRequest) -> Renormalized:
    """Run normalization ``name`` on ``request``."""
    check_name(name)
    return _REGISTRY[name](request)
