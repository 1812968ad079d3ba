"""The registry of matching methods: ``register(name)``, ``entry(name)``, ``get(name)``,
``available()``.

A matching function is pure. ``register`` files it under one of three kinds of entry
(see ``entries``):

- ``"features"``: ``fn(stats, num_models, **hparams) -> (merge, unmerge)`` where
  ``stats`` has ``mean``, ``covariance`` and ``correlation`` of the N models'
  concatenated features (N*d), ``merge`` is (d', N*d) and ``unmerge`` (N*d, d').
- ``"scope"``: a features function that also receives ``position``, the index of
  the space among the mergeable spaces, and ``num_spaces``, their count (preserve-first
  merging).
- ``"weights"``: needs no features; ``fn(states, graph, spaces, **hparams)``
  returns a ``WeightMatching`` (a permutation per space and model).

Any other kind of method is an ``Entry`` subclass with its own ``solve``, registered
with ``register_entry``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from graphmerge.matching_functions.entries import ENTRY_KINDS, Entry, MatchingFunction

KINDS = tuple(ENTRY_KINDS)
BLOCK_PAIRINGS = ("matched", "aligned")


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str, kind: str = "features", paper: str = "", blocks: str = "matched"
) -> Callable[[MatchingFunction], MatchingFunction]:
    """Decorator that registers a matching function under ``name`` as a ``kind`` entry.

    ``blocks`` says how the blocks of structured spaces (heads, groups) are paired before
    the function runs on each pair: "matched" (a two-level assignment on the features) or
    "aligned" (block k with block k).

    Example:
        >>> @gm.matching_functions.register("mine", paper="My et al. 2026")
        ... def mine(stats, num_models, **hparams):
        ...     return merge, unmerge
    """
    _check_name(name)
    if kind not in ENTRY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if blocks not in BLOCK_PAIRINGS:
        raise ValueError(f"blocks must be one of {', '.join(BLOCK_PAIRINGS)}, got {blocks!r}")

    def decorator(function: MatchingFunction) -> MatchingFunction:
        register_entry(ENTRY_KINDS[kind](name, function, paper, blocks))
        return function

    return decorator


def register_entry(found: Entry) -> Entry:
    """Register an ``Entry`` (any subclass, with its own ``solve``) under its name.

    Example:
        >>> class Joint(gm.matching_functions.Entry):
        ...     needs_statistics = False
        ...     def solve(self, problem, hparams):
        ...         return gm.matching_functions.Solution({s.name: ... for s in problem.spaces})
        >>> gm.matching_functions.register_entry(Joint("joint", joint_function))
    """
    if not isinstance(found, Entry):
        raise TypeError(f"register_entry needs an Entry, got a {type(found).__name__}")
    _check_name(found.name)
    _REGISTRY[found.name] = found
    return found


def entry(name: str) -> Entry:
    """The registry entry of ``name`` (clear error with suggestions if unknown)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
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


def _check_name(name: object) -> None:
    if not name or not isinstance(name, str):
        raise ValueError(f"a matching function needs a non-empty name, got {name!r}")
