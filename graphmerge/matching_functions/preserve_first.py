"""Preserve-first merging (PFM): a merge scope as a named matching function."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from graphmerge.matching_functions.common import Statistics, feature_width
from graphmerge.matching_functions.entries import FeatureEntry, ScopeEntry
from graphmerge.matching_functions.registry import entry, register_entry

PAPER = (
    "preserve-first merging (PFM): the first k spaces unmerged, the counterpart of ZipIt!'s "
    "partial zipping (Stoica et al. 2024)"
)


def preserve_first(
    stats: Statistics,
    num_models: int,
    position: int,
    k: int = 1,
    inner: str = "zip",
    num_spaces: int | None = None,
    **inner_hparams: object,
) -> tuple[Tensor, Tensor]:
    """Keep the first k mergeable spaces side by side; merge the rest with ``inner``.

    Space at ``position`` < k: M = U = I (N*d, width N*d); else ``inner``'s matching.
    Identical to ``merge(method=inner, start_at=k)``.

    Args:
        k: >= 0, how many spaces (in topological order) stay unmerged (default 1); at most
            ``num_spaces`` (the merge engine passes the graph's count of mergeable spaces).
        inner: a features matching function, e.g. "zip", "permute", "cca", "identity".
        **inner_hparams: passed on to ``inner``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"preserve_first needs an integer k >= 0, got {k!r}")
    if num_spaces is not None and k > num_spaces:
        raise ValueError(
            f"preserve_first k={k} is out of range: the graph has {num_spaces} mergeable "
            f"spaces, so k must be in 0..{num_spaces} (k={num_spaces} merges nothing: the "
            "ensemble)"
        )
    wrapped = entry(inner)
    if not isinstance(wrapped, FeatureEntry) or isinstance(wrapped, ScopeEntry):
        raise ValueError(
            f"preserve_first wraps a features matching function, not {inner!r} ({wrapped.kind}); "
            f"use merge(method={inner!r}, start_at={k}) instead"
        )
    wrapped.check_hyperparameters(inner_hparams)
    if position < k:
        eye = torch.eye(num_models * feature_width(stats, num_models), dtype=torch.float64)
        return eye, eye
    return wrapped.function(stats, num_models, **inner_hparams)


class PreserveFirstEntry(ScopeEntry):
    """preserve_first as a scope entry: the blocks of structured spaces are paired as its
    ``inner`` method pairs them."""

    def aligned_blocks(self, hparams: Mapping[str, object]) -> bool:
        inner = hparams.get("inner", self.hyperparameters["inner"])
        return entry(inner).aligned_blocks({}) if isinstance(inner, str) else False


register_entry(PreserveFirstEntry("preserve_first", preserve_first, PAPER))
