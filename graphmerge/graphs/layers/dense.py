"""Rules of the layers that write spaces: Linear, convolutions, Embedding."""

from __future__ import annotations

from torch import nn

from graphmerge.graphs.layers.registry import (
    Category,
    Correction,
    LayerCall,
    LayerRule,
    register_layer,
)
from graphmerge.graphs.spaces import Value

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register_layer(nn.Linear)
class LinearRule(LayerRule):
    """Reads its input's last axis with ``weight`` axis 1, writes a new space with axis 0."""

    category: Category = "producer"
    correction: Correction = "start"

    def channels(self, call: LayerCall) -> Value:
        layer, last = call.layer, None if call.in_ndim is None else call.in_ndim - 1
        call.read("weight", 1, layer.in_features, expected_axis=last)
        return call.write(layer.out_features, last, ("weight", 0))

    def resize(self, layer: nn.Linear, path: str) -> None:
        layer.out_features, layer.in_features = layer.weight.shape


@register_layer(*CONVOLUTIONS)
class ConvolutionRule(LayerRule):
    """Ungrouped: reads channels (axis 1) with ``weight`` axis 1 and writes a new space.
    Depthwise: channel c reads channel c (per-channel). Grouped (G groups): the input and
    the output are structured by one block index of G groups (``<path>.groups``), whose
    permutation they share; channels move freely within their group on either side."""

    category: Category = "producer"

    def channels(self, call: LayerCall) -> Value:
        layer = call.layer
        groups, channels_in = layer.groups, layer.in_channels
        if groups == 1:
            call.read("weight", 1, channels_in, expected_axis=1)
            return call.write(layer.out_channels, 1, ("weight", 0))
        if groups == channels_in == layer.out_channels:
            return call.per_channel(channels_in, axis=1)
        read = call.read("weight", 1, channels_in, expected_axis=1, groups=groups)
        out = call.write(layer.out_channels, 1, ("weight", 0))
        index = call.finder.block_index(f"{call.path}.groups", groups)
        for value in (read, out):
            call.finder.structure(value, index)
        return out

    def correction_of(self, layer: nn.Module) -> Correction:
        return "start" if layer.groups == 1 else "stop"

    def resize(self, layer: nn.Module, path: str) -> None:
        weight = layer.weight
        if layer.groups > 1:  # merges keep a group's width: a new width is a new group count
            layer.groups = weight.shape[0] // (layer.out_channels // layer.groups)
        layer.out_channels, layer.in_channels = weight.shape[0], weight.shape[1] * layer.groups


@register_layer(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Writes a new space along a new last axis with ``weight`` axis 1 (the index is not read)."""

    category: Category = "producer"

    def channels(self, call: LayerCall) -> Value:
        return call.write(call.layer.embedding_dim, call.in_ndim, ("weight", 1))

    def resize(self, layer: nn.Embedding, path: str) -> None:
        layer.embedding_dim = layer.weight.shape[1]
