"""Build a model from a template and a state dict whose tensors may have new widths.

The merged model is a deep copy of the first input model; every parameter and
buffer is replaced by its folded tensor, and the layers whose widths changed get
their shape attributes (in/out channels, features, num_features, normalized_shape,
groups of depthwise convolutions) updated so that they stay ordinary, savable,
re-mergeable modules.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from graphmerge.fold import loaded_copy
from graphmerge.graphs.rules import BATCH_NORMS, CONVOLUTIONS
from graphmerge.models import SPEC_ATTRIBUTE
from graphmerge.models.layers import LayerNorm2d


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
            _update_shape_attributes(module, path)
            resized = True
    if resized and hasattr(model, SPEC_ATTRIBUTE):
        delattr(model, SPEC_ATTRIBUTE)
    return model


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in _tensors(module)}


def _tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    found = [(n, p) for n, p in module._parameters.items() if p is not None]
    return found + [(n, b) for n, b in module._buffers.items() if b is not None]


def _update_shape_attributes(module: nn.Module, path: str) -> None:
    if isinstance(module, CONVOLUTIONS):
        weight = module.weight
        if module.groups > 1:  # only depthwise convolutions reach here with new widths
            module.groups = weight.shape[0]
            module.in_channels = module.out_channels = weight.shape[0]
        else:
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, BATCH_NORMS):
        module.num_features = _first(module, ("running_mean", "weight")).shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]
    elif not isinstance(module, LayerNorm2d) and _has_own_tensors(module):
        raise ValueError(
            f"cannot change the width of layer {path or 'model'} ({type(module).__name__}): "
            "graphmerge knows how to resize Conv, Linear, norm, Embedding and PReLU layers. "
            "Keep its spaces at their width (identity or permute matching) or freeze them."
        )


def _first(module: nn.Module, names: tuple[str, ...]) -> Tensor:
    for name in names:
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor
    raise ValueError(f"{type(module).__name__} has none of {names}")


def _has_own_tensors(module: nn.Module) -> bool:
    return bool(_tensors(module))
