"""Normalization after merging: RESET-BN, REPAIR and RESCALE.

Merged networks lose activation variance; these functions repair the
statistics of a merged (or pruned) model on data and return a new model
(see the "Normalization after merging" issue).
"""

from graphmerge.normalization.reset import reset_bn

__all__ = ["reset_bn"]
