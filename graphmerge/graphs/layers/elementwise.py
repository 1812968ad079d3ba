"""Rules of the layers that keep channels where they are: activations, identities, PReLU,
Flatten, pooling and resizing."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from graphmerge.graphs import parameters
from graphmerge.graphs.layers.registry import (
    Category,
    Correction,
    LayerCall,
    LayerRule,
    register_layer,
)
from graphmerge.graphs.parameters import FromParameters
from graphmerge.graphs.shapes import reshaped_channels
from graphmerge.graphs.spaces import Channels, SpaceFinder, Unknown, Value

# Layers that pass their input through unchanged in eval mode.
IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
)


@register_layer(*ACTIVATION_MODULES)
class ActivationRule(LayerRule):
    """Elementwise: channels pass as they are."""

    category: Category = "activation"
    elementwise = True

    def channels(self, call: LayerCall) -> Value:
        return call.value


@register_layer(*IDENTITY_MODULES)
class IdentityRule(ActivationRule):
    """The identity in eval mode: channels and a REPAIR correction pass through."""

    category: Category = ""
    correction: Correction = "pass"


@register_layer(nn.Softmax, nn.LogSoftmax)
class SoftmaxRule(ActivationRule):
    """Equivariant to a permutation of the axis it normalizes: channels pass."""

    category: Category = ""


@register_layer(nn.PReLU)
class PReLURule(LayerRule):
    """One slope per channel (axis 1) joins the input's space; a single slope is elementwise."""

    def channels(self, call: LayerCall) -> Value:
        if call.layer.num_parameters == 1:
            return call.value
        return call.per_channel(call.layer.num_parameters, axis=1)

    def resize(self, layer: nn.PReLU, path: str) -> None:
        layer.num_parameters = layer.weight.shape[0]


@register_layer(nn.Flatten)
class FlattenRule(LayerRule):
    """Flattening C x H x W into vectors repeats every channel H * W times."""

    def channels(self, call: LayerCall) -> Value:
        value = call.value
        if call.output_shape is None:
            # hand-built graphs: channels pass with repeat 1 (GraphBuilder.add_flatten gives
            # the repeat), and the next layer's width check catches a mistake
            return value
        return reshaped(value, call.input_shapes[0], call.output_shape, call.path, call.unknown)

    def on_parameters(
        self, layer: nn.Module, value: FromParameters, out_shape: tuple[int, ...]
    ) -> tuple[FromParameters | None, str]:
        return parameters.reshaped(value, out_shape)


def reshaped(
    value: Value,
    in_shape: tuple[int, ...] | None,
    out_shape: tuple[int, ...] | None,
    where: str,
    unknown: Callable[[str], Unknown],
) -> Value:
    """``value`` after a reshape from ``in_shape`` to ``out_shape``; where the channels cannot
    be followed, ``unknown(reason)`` (which freezes what the op reads)."""
    if not isinstance(value, Channels) or value.axis is None:
        return value
    if in_shape is None or out_shape is None or in_shape[value.axis] != value.size:
        return unknown(f"{where} reshapes channels it cannot follow")
    axis, tiles, repeat, problem = reshaped_channels(in_shape, out_shape, value.axis)
    if problem:
        return unknown(f"{where} {problem}")
    return Channels(axis, value.segments * tiles).repeated(repeat)


class SpatialRule(LayerRule):
    """Pooling and resizing act on the last ``trailing_dims`` dims only: channels pass."""

    trailing_dims = 2

    def channels(self, call: LayerCall) -> Value:
        return spatial(call.finder, call.value, call.path, self.trailing_dims, call.in_ndim)


@register_layer(nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
class Pool1dRule(SpatialRule):
    trailing_dims = 1


@register_layer(
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)
class Pool2dRule(SpatialRule):
    trailing_dims = 2


@register_layer(nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)
class Pool3dRule(SpatialRule):
    trailing_dims = 3


def spatial(
    finder: SpaceFinder, value: Value, where: str, trailing_dims: int, in_ndim: int | None
) -> Value:
    """An op over the last ``trailing_dims`` dims (pooling, resizing): channels pass if outside."""
    if not isinstance(value, Channels) or value.axis is None or in_ndim is None:
        return value
    if value.axis >= in_ndim - trailing_dims:
        reason = f"{where} pools over the channel axis"
        finder.freeze_value(value, reason)
        return Unknown(reason)
    return value
