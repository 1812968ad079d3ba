"""The ensemble baseline: every model runs, their logits are averaged or concatenated.

It is the upper reference of merging (the same as merging nothing: ``stop_at=0``)
at N times the cost.

Example:
    >>> ensemble = gm.evaluation.Ensemble([model_a, model_b])
    >>> gm.evaluation.evaluate(ensemble, data.test)
    >>> joint = gm.evaluation.Ensemble([model_0_4, model_5_9], output="concat")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from graphmerge.evaluation.metrics import check_tensor_output
from graphmerge.runtime import logits_of

OUTPUTS = ("average", "concat")


class Ensemble(nn.Module):
    """Runs every model on the same input; ``output="average"`` averages their logits
    (weighted by ``weights`` if given), ``"concat"`` concatenates them (joint logits over
    the models' label sets, model 0's first)."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        output: str = "average",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(models, nn.Module) or len(models) < 1:
            raise ValueError("an ensemble needs a list of at least one nn.Module")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if weights is not None and (output != "average" or len(weights) != len(models)):
            raise ValueError("weights need output='average' and one weight per model")
        self.members = nn.ModuleList(models)
        self.output = output
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        outputs = [logits_of(member(*args, **kwargs)) for member in self.members]
        for output in outputs:
            check_tensor_output(output)
        if self.output == "concat":
            return torch.cat(outputs, dim=1)
        weights = self.weights or [1.0 / len(outputs)] * len(outputs)
        return sum(w * out for w, out in zip(weights, outputs, strict=True))
