"""Matching functions: how the units of N models correspond, registered by name.

Features functions take statistics and return (merge, unmerge); weight matching
takes state dicts and returns permutations; ``pleas`` and ``ste`` also read the data.
``available()`` lists the names and ``entry(name)`` their kind, paper and
hyper-parameters; the engine asks an entry to ``solve`` a ``MatchingProblem`` (see
``entries``).

Example:
    >>> import graphmerge as gm
    >>> gm.matching_functions.available()
    ['cca', 'identity', 'ot_fusion', 'permute', 'pleas', 'preserve_first', 'ste',
     'weight_matching', 'zip']
    >>> merge, unmerge = gm.matching_functions.get("zip")(stats, num_models=2, alpha=0.5)
"""

from graphmerge.matching_functions.basic import identity, permute
from graphmerge.matching_functions.cca import cca
from graphmerge.matching_functions.common import Statistics, membership_match, permutation_match
from graphmerge.matching_functions.entries import (
    Entry,
    FeatureEntry,
    MatchingFunction,
    MatchingProblem,
    ScopeEntry,
    Solution,
    WeightEntry,
)
from graphmerge.matching_functions.ot_fusion import ot_fusion
from graphmerge.matching_functions.pleas import GlobalBudget, PleasEntry, pleas
from graphmerge.matching_functions.preserve_first import preserve_first
from graphmerge.matching_functions.registry import (
    available,
    entry,
    get,
    register,
    register_entry,
)
from graphmerge.matching_functions.ste import ste
from graphmerge.matching_functions.weight_matching import (
    WeightMatching,
    merge_many,
    weight_matching,
)
from graphmerge.matching_functions.zipit import greedy_clusters, zipit

__all__ = [
    "Entry",
    "FeatureEntry",
    "GlobalBudget",
    "MatchingFunction",
    "MatchingProblem",
    "PleasEntry",
    "ScopeEntry",
    "Solution",
    "Statistics",
    "WeightEntry",
    "WeightMatching",
    "available",
    "cca",
    "entry",
    "get",
    "greedy_clusters",
    "identity",
    "membership_match",
    "merge_many",
    "ot_fusion",
    "permutation_match",
    "permute",
    "pleas",
    "preserve_first",
    "register",
    "register_entry",
    "ste",
    "weight_matching",
    "zipit",
]
