"""Build a model from a template and a state dict whose tensors may have new widths.

The merged model is a deep copy of the first input model; every parameter and
buffer is replaced by its folded tensor, and the layers whose widths changed get
their shape attributes (in/out channels, features, num_features, normalized_shape,
groups of depthwise convolutions) updated by their layer rule (``LayerRule.resize``)
so that they stay ordinary, savable, re-mergeable modules.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from graphmerge.fold import loaded_copy
from graphmerge.graphs.layers import DEFAULT_RULE, rule_for
from graphmerge.models import SPEC_ATTRIBUTE


def resized_copy(template: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy of ``template`` holding ``state`` (same keys, possibly new shapes).

    Buffers registered with ``persistent=False`` are taken from ``state`` where it has
    them (a merge folds them like any tensor) and kept from ``template`` where it does not
    (a checkpoint's state_dict). When a width changed, the copy no longer matches the
    architecture arguments that ``graphmerge.models.build`` recorded, so that record is
    dropped (a checkpoint of it would not rebuild).
    """
    model = loaded_copy(template, state)
    resized = False
    for (path, module), (_, before) in zip(
        model.named_modules(), template.named_modules(), strict=True
    ):
        if _shapes(module) != _shapes(before):
            (rule_for(module) or DEFAULT_RULE).resize(module, path)
            resized = True
    if resized and hasattr(model, SPEC_ATTRIBUTE):
        delattr(model, SPEC_ATTRIBUTE)
    return model


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in _tensors(module)}


def _tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    found = [(n, p) for n, p in module._parameters.items() if p is not None]
    return found + [(n, b) for n, b in module._buffers.items() if b is not None]
