"""The registry of matching functions: ``get(name)``, ``register(name)``, ``available()``.

A matching function is pure: ``fn(stats, num_models, **hparams) -> (merge, unmerge)``
where ``stats`` has ``mean``, ``covariance`` and ``correlation`` of the N models'
concatenated features (N*d), ``merge`` is (d', N*d) and ``unmerge`` is (N*d, d').
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Protocol

from torch import Tensor


class Statistics(Protocol):
    """What a matching function may read: moments of the concatenated features (N*d)."""

    @property
    def mean(self) -> Tensor: ...

    @property
    def covariance(self) -> Tensor: ...

    @property
    def correlation(self) -> Tensor: ...


MatchingFunction = Callable[..., tuple[Tensor, Tensor]]
_REGISTRY: dict[str, MatchingFunction] = {}


def register(name: str) -> Callable[[MatchingFunction], MatchingFunction]:
    """Decorator that registers a matching function under ``name``.

    Example:
        >>> @gm.matching_functions.register("mine")
        ... def mine(stats, num_models, **hparams):
        ...     return merge, unmerge
    """

    if not name or not isinstance(name, str):
        raise ValueError(f"a matching function needs a non-empty name, got {name!r}")

    def decorator(function: MatchingFunction) -> MatchingFunction:
        _REGISTRY[name] = function
        return function

    return decorator


def get(name: str) -> MatchingFunction:
    """The matching function registered as ``name`` (clear error with suggestions if unknown)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown matching function {name!r}; available: {', '.join(available())}.{hint}"
        )
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of the registered matching functions, sorted."""
    return sorted(_REGISTRY)
