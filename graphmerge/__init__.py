"""graphmerge: merge separately trained neural networks into one, without retraining.

Models become networkx computation graphs whose *spaces* (sets of channel axes
that must move together) are matched across models by pluggable matching
functions and folded into one model; a normalization package repairs the
statistics afterwards.

Example:
    >>> import graphmerge as gm
    >>> model = gm.models.build("resnet20", width_multiplier=1, num_classes=10, seed=0)
    >>> data = gm.data.digits(layout="image")
    >>> result = gm.training.train(model, data.train, data.test, epochs=1, progress=False)
"""

from graphmerge import (
    data,
    distributed,
    evaluation,
    graphs,
    matching_functions,
    models,
    normalization,
    statistics,
    training,
)
from graphmerge.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from graphmerge.merge import Match, Merger, MergeResult, interpolate, merge
from graphmerge.runtime import ModelInputs

# isort: split
# The harness, plots and demo build on merge (imported after it).
from graphmerge import comparison, connectivity, demo, diagnostics, plots
from graphmerge.diagnostics import diagnose

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "Match",
    "MergeResult",
    "Merger",
    "ModelInputs",
    "__version__",
    "comparison",
    "connectivity",
    "data",
    "demo",
    "diagnose",
    "diagnostics",
    "distributed",
    "evaluation",
    "graphs",
    "interpolate",
    "load_checkpoint",
    "matching_functions",
    "merge",
    "models",
    "normalization",
    "plots",
    "save_checkpoint",
    "statistics",
    "training",
]
