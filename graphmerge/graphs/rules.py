"""How each kind of layer reads, writes and passes on channel spaces.

Shared by the tracer (which knows tensor shapes, so it checks channel axes) and
the GraphBuilder (which does not: axes are None there). A rule gets the layer,
its path, the :class:`Channels` of its input and the rank of its output, registers
the parameter axes it touches with the :class:`SpaceFinder`, and returns the
channel structure of its output.
"""

from __future__ import annotations

from torch import nn

from graphmerge.graphs.spaces import Channels, SpaceFinder, Unknown, Value
from graphmerge.models.layers import LayerNorm2d

NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")

# Layers that pass their input through unchanged in eval mode.
IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
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
    *IDENTITY_MODULES,
    nn.Softmax,
    nn.LogSoftmax,
)

# Pooling and resizing act on the trailing spatial dims only (their count is the value).
SPATIAL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.Upsample: 2,
    nn.UpsamplingNearest2d: 2,
    nn.UpsamplingBilinear2d: 2,
}

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def is_known_module(module: nn.Module) -> bool:
    """Whether graphmerge knows how ``module`` treats channels (else its inputs are frozen)."""
    return isinstance(
        module,
        (
            nn.Linear,
            *CONVOLUTIONS,
            *BATCH_NORMS,
            nn.LayerNorm,
            LayerNorm2d,
            nn.GroupNorm,
            nn.Embedding,
            nn.PReLU,
            nn.Flatten,
            *ELEMENTWISE_MODULES,
            *SPATIAL_MODULES,
        ),
    )


def apply_module(
    finder: SpaceFinder,
    module: nn.Module,
    path: str,
    value: Value,
    in_ndim: int | None = None,
) -> Value:
    """Register what ``module`` (called at ``path`` on ``value``) touches; return its output."""
    if isinstance(module, nn.Linear):
        return _linear(finder, module, path, value, in_ndim)
    if isinstance(module, CONVOLUTIONS):
        return _convolution(finder, module, path, value)
    if isinstance(module, BATCH_NORMS):
        return _per_channel(finder, module, path, value, module.num_features, axis=1)
    if isinstance(module, nn.LayerNorm):
        return _layer_norm(finder, module, path, value, in_ndim)
    if isinstance(module, LayerNorm2d):  # channel-last LayerNorm of (N, C, H, W) maps
        return _layer_norm(finder, module.norm, f"{path}.norm", value, None)
    if isinstance(module, nn.GroupNorm):
        return _group_norm(finder, module, path, value)
    if isinstance(module, nn.Embedding):
        out_axis = None if in_ndim is None else in_ndim
        return finder_output(finder, module, path, module.embedding_dim, out_axis, (("weight", 1),))
    if isinstance(module, nn.PReLU):
        if module.num_parameters == 1:
            return value
        return _per_channel(finder, module, path, value, module.num_parameters, axis=1)
    if isinstance(module, (*ELEMENTWISE_MODULES, nn.Flatten)):
        # Flatten reaches here only from hand-built graphs (the tracer follows it with shapes):
        # channels pass with repeat 1, and the next layer's width check catches a mistake.
        return value
    if isinstance(module, tuple(SPATIAL_MODULES)):
        return spatial(finder, value, path, SPATIAL_MODULES[type(module)], in_ndim)
    reason = f"unknown layer {path} ({type(module).__name__})"
    finder.freeze_value(value, f"read by {reason}")
    return Unknown(reason)


def module_category(module: nn.Module) -> str:
    """How good the module's output is as a place to read a space's features (merge point)."""
    if isinstance(module, (nn.Linear, *CONVOLUTIONS, nn.Embedding)):
        return "producer"
    if isinstance(module, (*BATCH_NORMS, nn.LayerNorm, LayerNorm2d, nn.GroupNorm)):
        return "norm"
    passive = (*IDENTITY_MODULES, nn.Softmax)
    if isinstance(module, ELEMENTWISE_MODULES) and not isinstance(module, passive):
        return "activation"
    return ""


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


def readable(
    finder: SpaceFinder,
    value: Value,
    path: str,
    param: str,
    param_axis: int,
    width: int,
    expected_axis: int | None,
) -> Channels:
    """The channels a layer reads along ``param_axis`` of ``param``, frozen where not followable.

    Registers the parameter axis as reading ("in") those channels.
    """
    if finder.is_input(value):
        value = finder.input_channels(width)
    problem = "" if finder.is_input(value) else _read_problem(value, width, expected_axis)
    if problem:
        finder.freeze_value(value, f"{path} {problem}")
        return finder.touch_unknown(param, param_axis, width, f"{path} {problem}")
    finder.touch(param, param_axis, "in", value)
    return value


def _read_problem(value: Value, width: int, expected_axis: int | None) -> str:
    if isinstance(value, Unknown):
        return f"reads {value.reason}"
    if value is None:
        return "reads a tensor without tracked channels"
    if expected_axis is not None and value.axis is not None and value.axis != expected_axis:
        return f"reads axis {expected_axis} but channels are on axis {value.axis}"
    if value.size != width:
        return f"expects {width} channels but its input has {value.size}"
    return ""


def finder_output(
    finder: SpaceFinder,
    module: nn.Module,
    path: str,
    width: int,
    axis: int | None,
    param_axes: tuple[tuple[str, int], ...],
) -> Channels:
    """A new space written by ``module``: its ``param_axes`` (and bias) write it."""
    out = finder.new_channels(path, width, axis)
    for name, param_axis in (*param_axes, ("bias", 0)):
        if getattr(module, name, None) is not None:
            finder.touch(f"{path}.{name}", param_axis, "out", out)
    return out


def _linear(
    finder: SpaceFinder, module: nn.Linear, path: str, value: Value, in_ndim: int | None
) -> Channels:
    last = None if in_ndim is None else in_ndim - 1
    readable(finder, value, path, f"{path}.weight", 1, module.in_features, last)
    return finder_output(finder, module, path, module.out_features, last, (("weight", 0),))


def _convolution(finder: SpaceFinder, module: nn.Module, path: str, value: Value) -> Value:
    groups, channels_in = module.groups, module.in_channels
    if groups == 1:
        readable(finder, value, path, f"{path}.weight", 1, channels_in, 1)
        return finder_output(finder, module, path, module.out_channels, 1, (("weight", 0),))
    if groups == channels_in == module.out_channels:  # depthwise: channel c reads channel c
        return _per_channel(finder, module, path, value, channels_in, axis=1)
    reason = f"{path} is a grouped convolution ({groups} groups of {channels_in // groups})"
    finder.freeze_value(value, reason)
    out = finder_output(finder, module, path, module.out_channels, 1, (("weight", 0),))
    finder.freeze_value(out, reason)
    return out


def _per_channel(
    finder: SpaceFinder, module: nn.Module, path: str, value: Value, width: int, axis: int
) -> Channels:
    """A layer that acts on each channel separately, with per-channel parameters."""
    problem = "" if finder.is_input(value) else _read_problem(value, width, axis)
    if problem:
        reason = f"{path} {problem}"
        finder.freeze_value(value, reason)
        value = finder.new_channels(path, width, axis)
        finder.freeze_value(value, reason)
    for name in NORM_BUFFERS:
        tensor = getattr(module, name, None)
        if tensor is not None and tensor.dim() >= 1:
            finder.touch(f"{path}.{name}", 0, "out", value)
    return value


def _layer_norm(
    finder: SpaceFinder, module: nn.LayerNorm, path: str, value: Value, in_ndim: int | None
) -> Value:
    normalized = len(module.normalized_shape)
    if isinstance(value, Channels) and value.axis is not None and in_ndim is not None:
        first = in_ndim - normalized
        if value.axis < first:  # normalizes within each channel: channels pass untouched
            return value
        param_axis = value.axis - first
    else:
        param_axis = 0
    width = module.normalized_shape[param_axis]
    problem = _read_problem(value, width, None)
    if problem:
        reason = f"{path} {problem}"
        finder.freeze_value(value, reason)
        value = finder.new_channels(path, width, None)
        finder.freeze_value(value, reason)
    for name in ("weight", "bias"):
        if getattr(module, name, None) is not None:
            finder.touch(f"{path}.{name}", param_axis, "out", value)
    return value


def _group_norm(finder: SpaceFinder, module: nn.GroupNorm, path: str, value: Value) -> Value:
    groups, channels = module.num_groups, module.num_channels
    value = _per_channel(finder, module, path, value, channels, axis=1)
    if groups not in (1, channels):
        finder.freeze_value(
            value,
            f"{path} is a GroupNorm with {groups} groups: moving a channel to another group "
            "changes the group statistics",
        )
    return value
