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
    Depthwise: channel c reads channel c (per-channel). Other grouped ones are frozen."""

    category: Category = "producer"

    def channels(self, call: LayerCall) -> Value:
        layer = call.layer
        groups, channels_in = layer.groups, layer.in_channels
        if groups == 1:
            call.read("weight", 1, channels_in, expected_axis=1)
            return call.write(layer.out_channels, 1, ("weight", 0))
        if groups == channels_in == layer.out_channels:
            return call.per_channel(channels_in, axis=1)
        reason = (
            f"{call.path} is a grouped convolution ({groups} groups of {channels_in // groups})"
        )
        call.freeze(call.value, reason)
        out = call.write(layer.out_channels, 1, ("weight", 0))
        call.freeze(out, reason)
        return out

    def correction_of(self, layer: nn.Module) -> Correction:
        return "start" if layer.groups == 1 else "stop"

    def resize(self, layer: nn.Module, path: str) -> None:
        weight = layer.weight
        if layer.groups > 1:  # only depthwise convolutions reach here with new widths
            layer.groups = weight.shape[0]
            layer.in_channels = layer.out_channels = weight.shape[0]
        else:
            layer.out_channels, layer.in_channels = weight.shape[0], weight.shape[1]


@register_layer(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Writes a new space along a new last axis with ``weight`` axis 1 (the index is not read)."""

    category: Category = "producer"

    def channels(self, call: LayerCall) -> Value:
        return call.write(call.layer.embedding_dim, call.in_ndim, ("weight", 1))

    def resize(self, layer: nn.Embedding, path: str) -> None:
        layer.embedding_dim = layer.weight.shape[1]
