"""The registry of matching functions: ``get(name)``, ``register(name)``, ``available()``.

A matching function is pure. Three kinds exist:

- ``"features"``: ``fn(stats, num_models, **hparams) -> (merge, unmerge)`` where
  ``stats`` has ``mean``, ``covariance`` and ``correlation`` of the N models'
  concatenated features (N*d), ``merge`` is (d', N*d) and ``unmerge`` (N*d, d').
- ``"scope"``: a features function that also receives ``position``, the index of
  the space among the mergeable spaces, and ``num_spaces``, their count (preserve-first
  merging).
- ``"weights"``: needs no features; ``fn(states, graph, spaces, **hparams)``
  returns a ``WeightMatching`` (a permutation per space and model).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from torch import Tensor


class Statistics(Protocol):
    """What a matching function may read: moments of the concatenated features (N*d)."""

    @property
    def mean(self) -> Tensor: ...

    @property
    def covariance(self) -> Tensor: ...

    @property
    def correlation(self) -> Tensor: ...


MatchingFunction = Callable[..., object]
Kind = Literal["features", "scope", "weights"]
KINDS = ("features", "scope", "weights")


@dataclass(frozen=True)
class Entry:
    """A registered matching function with what a listing shows about it."""

    name: str
    function: MatchingFunction
    kind: Kind
    paper: str

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        return (inspect.getdoc(self.function) or "").split("\n")[0]

    @property
    def hyperparameters(self) -> dict[str, object]:
        """Keyword arguments with their defaults (``inspect.Parameter.empty`` if required)."""
        skipped = {"stats", "num_models", "states", "graph", "spaces", "position", "num_spaces"}
        return {
            name: parameter.default
            for name, parameter in inspect.signature(self.function).parameters.items()
            if name not in skipped
            and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
        }

    def check_hyperparameters(self, hparams: Mapping[str, object]) -> None:
        """A clear error naming the accepted hyper-parameters if one in ``hparams`` is not."""
        parameters = inspect.signature(self.function).parameters.values()
        if any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters):
            return
        unknown = sorted(set(hparams) - set(self.hyperparameters))
        if unknown:
            accepted = ", ".join(self.hyperparameters) or "none"
            raise ValueError(
                f"matching function {self.name!r} has no hyper-parameter {', '.join(unknown)}; "
                f"it accepts: {accepted}"
            )


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str, kind: Kind = "features", paper: str = ""
) -> Callable[[MatchingFunction], MatchingFunction]:
    """Decorator that registers a matching function under ``name``.

    Example:
        >>> @gm.matching_functions.register("mine", paper="My et al. 2026")
        ... def mine(stats, num_models, **hparams):
        ...     return merge, unmerge
    """

    if not name or not isinstance(name, str):
        raise ValueError(f"a matching function needs a non-empty name, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def decorator(function: MatchingFunction) -> MatchingFunction:
        _REGISTRY[name] = Entry(name, function, kind, paper)
        return function

    return decorator


def entry(name: str) -> Entry:
    """The registry entry of ``name`` (clear error with suggestions if unknown)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown matching function {name!r}; available: {', '.join(available())}.{hint}"
        )
    return _REGISTRY[name]


def get(name: str) -> MatchingFunction:
    """The matching function registered as ``name`` (clear error with suggestions if unknown)."""
    return entry(name).function


def available() -> list[str]:
    """Names of the registered matching functions, sorted."""
    return sorted(_REGISTRY)
