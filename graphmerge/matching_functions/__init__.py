"""Matching functions: statistics in, (merge, unmerge) out, registered by name.

Example:
    >>> import graphmerge as gm
    >>> gm.matching_functions.available()
    ['identity', 'permute']
    >>> merge, unmerge = gm.matching_functions.get("permute")(stats, num_models=2)
"""

from graphmerge.matching_functions.basic import identity, permute
from graphmerge.matching_functions.registry import (
    MatchingFunction,
    Statistics,
    available,
    get,
    register,
)

__all__ = [
    "MatchingFunction",
    "Statistics",
    "available",
    "get",
    "identity",
    "permute",
    "register",
]
