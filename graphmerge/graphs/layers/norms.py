"""Rules of the normalization layers: BatchNorm / InstanceNorm, LayerNorm, GroupNorm."""

from __future__ import annotations

import torch
from torch import nn

from graphmerge.graphs.layers.registry import LayerCall, NormRule, read_problem, register_layer
from graphmerge.graphs.spaces import Channels, Value

BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


@register_layer(*BATCH_NORMS)
class BatchNormRule(NormRule):
    """Per channel (axis 1): affine and running statistics join the input's space."""

    def channels(self, call: LayerCall) -> Value:
        return call.per_channel(call.layer.num_features, axis=1)

    def resize(self, layer: nn.Module, path: str) -> None:
        for name in ("running_mean", "weight"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                layer.num_features = tensor.shape[0]
                return


@register_layer(nn.LayerNorm)
class LayerNormRule(NormRule):
    """Normalizes the trailing dims: channels among them join weight and bias (exact for
    permutations); channels before them pass untouched."""

    def channels(self, call: LayerCall) -> Value:
        layer, value, in_ndim = call.layer, call.value, call.in_ndim
        normalized = len(layer.normalized_shape)
        if isinstance(value, Channels) and value.axis is not None and in_ndim is not None:
            first = in_ndim - normalized
            if value.axis < first:  # normalizes within each channel: channels pass untouched
                return value
            param_axis = value.axis - first
        else:
            param_axis = 0
        width = layer.normalized_shape[param_axis]
        problem = read_problem(value, width, None)
        if problem:
            reason = f"{call.path} {problem}"
            call.freeze(value, reason)
            value = call.finder.new_channels(call.path, width, None)
            call.freeze(value, reason)
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                call.finder.touch(call.param(name), param_axis, "out", value)
        return value

    def resize(self, layer: nn.LayerNorm, path: str) -> None:
        if layer.weight is not None:
            layer.normalized_shape = tuple(layer.weight.shape)


@register_layer(nn.GroupNorm)
class GroupNormRule(NormRule):
    """Per channel; with 1 < groups < channels the space is structured by a block index of
    the groups (``<path>.groups``): a channel moved to another group would change the group
    statistics, whole groups may move."""

    def channels(self, call: LayerCall) -> Value:
        groups, channels = call.layer.num_groups, call.layer.num_channels
        value = call.per_channel(channels, axis=1)
        if groups not in (1, channels) and isinstance(value, Channels):
            call.finder.structure(value, call.finder.block_index(f"{call.path}.groups", groups))
        return value

    def resize(self, layer: nn.GroupNorm, path: str) -> None:
        if layer.num_groups > 1:  # merges keep the width of a group
            layer.num_groups = layer.weight.shape[0] // (layer.num_channels // layer.num_groups)
        layer.num_channels = layer.weight.shape[0]
