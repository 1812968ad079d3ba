"""The layer-rule registry: everything graphmerge knows about a layer type, in one class.

A :class:`LayerRule` says how a layer reads and writes channel spaces (``channels``),
how it is resized when merging changes its widths (``resize``), where a REPAIR
correction y -> a * y + c can be folded into it (``correction``, ``parameter_holder``)
and how ``randomize_statistics`` fills its tensors (``random_tensor``). Rules are
registered by layer type and found along the type's MRO, the way torch.fx's
Interpreter dispatches by op; a layer without a rule freezes what it reads.

Example (a rule for your own layer, in one call):
    >>> @gm.graphs.register_layer(Gated)
    ... class GatedRule(gm.graphs.LayerRule):
    ...     category = "producer"
    ...     correction = "start"
    ...     def channels(self, call):
    ...         call.read("weight", 1, call.layer.in_features)
    ...         call.read("gate", 1, call.layer.in_features)
    ...         return call.write(call.layer.out_features, ("weight", 0), ("gate", 0))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from graphmerge.graphs.parameters import FromParameters
from graphmerge.graphs.spaces import Channels, Several, SpaceFinder, Unknown, Value

# How a layer meets a per-channel correction y -> a * y + c of the features it carries:
# "start" it writes a new space (the correction folds into its weight and bias), "pass" it
# is the identity in eval mode (the correction passes through it), "absorb" a channel-wise
# affine layer that takes the correction in place of the layer before it, "stop" none.
Correction = Literal["start", "pass", "absorb", "stop"]
# How good a layer's output is as the place to read a space's features (merge point).
Category = Literal["producer", "norm", "activation", ""]

NORM_RANGES = {  # uniform ranges for a norm layer's affine and running statistics
    "weight": (0.5, 1.5),
    "bias": (-0.5, 0.5),
    "running_mean": (-0.5, 0.5),
    "running_var": (0.5, 2.0),
}
SCALE_RANGE = NORM_RANGES["weight"]  # vectors: layer scales, gates, tokens, PReLU slopes
BIAS_RANGE = NORM_RANGES["bias"]
MIN_STD = 0.02  # the smallest spread given to a matrix that had none (a zero head, a table)


@dataclass
class LayerCall:
    """One call of a layer while a graph is built: what its rule reads and registers.

    ``inputs`` are the channel structures of the layer's tensor inputs, in order;
    ``input_shapes`` and ``output_shape`` are known when tracing (None in hand-built
    graphs, where channel axes are not tracked either).
    """

    finder: SpaceFinder
    layer: nn.Module
    path: str
    inputs: list[Value]
    input_shapes: list[tuple[int, ...] | None]
    output_shape: tuple[int, ...] | None = None

    @property
    def value(self) -> Value:
        """The first (usually only) input."""
        return self.inputs[0] if self.inputs else None

    @property
    def in_ndim(self) -> int | None:
        shape = self.input_shapes[0] if self.input_shapes else None
        return None if shape is None else len(shape)

    def param(self, name: str) -> str:
        """The state-dict name of the layer's tensor ``name``."""
        return f"{self.path}.{name}" if self.path else name

    def read(
        self,
        name: str,
        axis: int,
        width: int,
        value: Value | None = None,
        expected_axis: int | None = None,
        groups: int = 1,
    ) -> Channels:
        """Axis ``axis`` of tensor ``name`` reads ``value`` (default: the first input).

        ``width`` is the number of channels the tensor expects along ``axis``; a mismatch,
        an untracked input or channels on another axis than ``expected_axis`` freeze the
        input and give the axis a frozen space of its own. ``groups`` > 1: the axis holds
        one block of ``width // groups`` channels per group of rows (grouped convolution).
        """
        value = self.value if value is None else value
        finder, param = self.finder, self.param(name)
        if finder.is_input(value):
            value = finder.input_channels(width)
        problem = "" if finder.is_input(value) else read_problem(value, width, expected_axis)
        if problem:
            finder.freeze_value(value, f"{self.path} {problem}")
            return finder.touch_unknown(param, axis, width, f"{self.path} {problem}", groups)
        finder.touch(param, axis, "in", value, groups)
        return value

    def write(self, width: int, axis: int | None, *param_axes: tuple[str, int]) -> Channels:
        """A new space of ``width`` channels on tensor axis ``axis``, written by the layer's
        ``param_axes`` ((name, axis) pairs) and its ``bias`` (axis 0) if it has one."""
        out = self.finder.new_channels(self.path, width, axis)
        for name, param_axis in (*param_axes, ("bias", 0)):
            if getattr(self.layer, name, None) is not None:
                self.finder.touch(self.param(name), param_axis, "out", out)
        return out

    def per_channel(
        self,
        width: int,
        axis: int | None,
        names: Sequence[str] = ("weight", "bias", "running_mean", "running_var"),
        param_axis: int = 0,
    ) -> Channels:
        """The layer acts on each channel separately: its tensors ``names`` (where present,
        along ``param_axis``) join the input's space; a mismatched input is frozen."""
        value = self.value
        problem = "" if self.finder.is_input(value) else read_problem(value, width, axis)
        if problem:
            reason = f"{self.path} {problem}"
            self.finder.freeze_value(value, reason)
            value = self.finder.new_channels(self.path, width, axis)
            self.finder.freeze_value(value, reason)
        for name in names:
            tensor = getattr(self.layer, name, None)
            if isinstance(tensor, Tensor) and tensor.dim() >= 1:
                self.finder.touch(self.param(name), param_axis, "out", value)
        return value

    def freeze(self, value: Value, reason: str) -> None:
        """The spaces of ``value`` must not be permuted (``reason`` says why)."""
        self.finder.freeze_value(value, reason)

    def unknown(self, reason: str) -> Unknown:
        """The layer mixes its inputs' channels in a way no rule follows: they are frozen."""
        for value in self.inputs:
            self.finder.freeze_value(value, f"read by {reason}")
        return Unknown(reason)


class LayerRule:
    """What graphmerge knows about one layer type. Subclass it and register it by type.

    Attributes:
        category: how good the layer's output is as a merge point ("producer" for layers
            that write a space, "norm", "activation", or "").
        correction: how the layer meets a REPAIR correction (see ``Correction``).
        inputs: how many tensors the layer reads (nn.MultiheadAttention: 3; ``accepts``
            decides when a count may vary).
        elementwise: the layer maps each value on its own (applied to parameters, it
            passes them through).
        leaf: torch.fx keeps the layer as one call (True for your own layers, so that the
            rule sees it); False lets fx trace through its ``forward``.
    """

    category: Category = ""
    correction: Correction = "stop"
    inputs: int = 1
    elementwise: bool = False
    leaf: bool = True

    def channels(self, call: LayerCall) -> Value:
        """Register what the layer's tensors read and write; return its output's channels."""
        return call.unknown(f"unknown layer {call.path} ({type(call.layer).__name__})")

    def accepts(self, count: int) -> bool:
        """Whether the layer can be called on ``count`` tensors (``inputs`` by default)."""
        return count == self.inputs

    def on_parameters(
        self, layer: nn.Module, value: FromParameters, out_shape: tuple[int, ...]
    ) -> tuple[FromParameters | None, str]:
        """The layer applied to a tensor of parameters alone: the result, or a problem."""
        if self.elementwise:
            return value, ""
        return None, f"({type(layer).__name__}) is applied to parameters"

    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        """For a rule with ``leaf = False``: the plain forward torch.fx follows instead of
        the layer's own when called with ``kwargs`` (None: its own forward)."""
        return None

    def correction_of(self, layer: nn.Module) -> Correction:
        """``correction`` for this layer (a rule may decide per instance)."""
        return self.correction

    def parameter_holder(self, layer: nn.Module, path: str) -> tuple[nn.Module, str]:
        """The module (and its path) whose weight and bias take a folded correction."""
        return layer, path

    def resize(self, layer: nn.Module, path: str) -> None:
        """Update the layer's shape attributes after merging changed its tensors' widths."""
        if _own_tensors(layer):
            raise ValueError(
                f"cannot change the width of layer {path or 'model'} ({type(layer).__name__}): "
                "graphmerge knows how to resize the layers that have a rule with resize "
                "(Conv, Linear, norm, Embedding, PReLU and those registered with "
                "gm.graphs.register_layer). Keep its spaces at their width (identity or "
                "permute matching), freeze them, or register a rule for it."
            )

    def random_tensor(
        self, layer: nn.Module, name: str, tensor: Tensor, generator: torch.Generator
    ) -> Tensor:
        """A random value for the layer's tensor ``name`` (see ``randomize_statistics``)."""
        norm = "running_var" in layer._buffers
        if (norm and name in NORM_RANGES) or name in ("running_mean", "running_var"):
            return uniform(tensor, NORM_RANGES[name], generator)
        if "bias" in name:
            return uniform(tensor, BIAS_RANGE, generator)
        if sum(size > 1 for size in tensor.shape) == 1:
            return uniform(tensor, SCALE_RANGE, generator)
        std, mean = (value.item() for value in torch.std_mean(tensor.detach().double()))
        if not std > 0:
            fan_in = max(1, tensor[0].numel()) if tensor.dim() > 1 else tensor.numel()
            std = max(fan_in**-0.5, MIN_STD)
        noise = torch.randn(tensor.shape, generator=generator, dtype=_draw_dtype(tensor))
        return mean + std * noise


class NormRule(LayerRule):
    """Normalization layers: merge points of their own category, they absorb a correction
    and their affine and running statistics are randomized in the norm ranges."""

    category: Category = "norm"
    correction: Correction = "absorb"

    def random_tensor(
        self, layer: nn.Module, name: str, tensor: Tensor, generator: torch.Generator
    ) -> Tensor:
        if name in NORM_RANGES:
            return uniform(tensor, NORM_RANGES[name], generator)
        return super().random_tensor(layer, name, tensor, generator)


DEFAULT_RULE = LayerRule()  # layers without a rule: inputs frozen, never resized
_RULES: dict[type[nn.Module] | str, LayerRule] = {}  # by type, or by "module.QualName"
Rule = TypeVar("Rule", bound=type[LayerRule])


def register_layer(*layer_types: type[nn.Module] | str) -> Callable[[Rule], Rule]:
    """Class decorator: the decorated LayerRule serves ``layer_types`` (and their subclasses).

    A type may also be named as "module.QualName" (a layer of a library that need not be
    imported: ``"timm.layers.attention.Attention"``). A later registration for the same
    type replaces the earlier one.

    Example:
        >>> @gm.graphs.register_layer(MyNorm)
        ... class MyNormRule(gm.graphs.NormRule):
        ...     def channels(self, call):
        ...         return call.per_channel(call.layer.num_features, axis=1)
    """
    if not layer_types or not all(
        (isinstance(t, str) and "." in t) or (isinstance(t, type) and issubclass(t, nn.Module))
        for t in layer_types
    ):
        raise TypeError(
            f"register_layer needs nn.Module classes (or their 'module.QualName' names), got "
            f"{layer_types!r}"
        )

    def decorator(rule: Rule) -> Rule:
        if not (isinstance(rule, type) and issubclass(rule, LayerRule)):
            raise TypeError(f"register_layer decorates LayerRule subclasses, got {rule!r}")
        instance = rule()
        for layer_type in layer_types:
            _RULES[layer_type] = instance
        return rule

    return decorator


@dataclass
class FunctionCall:
    """One call of a function with a registered rule (see ``register_function``).

    ``args`` and ``kwargs`` are the call's, with every tensor replaced by its channel
    structure (a ``Value``, or ``FromParameters`` for a tensor of parameters); ``name`` is
    the graph node's.
    """

    finder: SpaceFinder
    name: str
    args: tuple
    kwargs: dict

    def argument(self, position: int, keyword: str, default: object = None) -> object:
        """The argument at ``position`` or named ``keyword``."""
        if position < len(self.args):
            return self.args[position]
        return self.kwargs.get(keyword, default)


class FunctionRule:
    """What graphmerge knows about a function that torch.fx keeps as one call (``fx.wrap``).

    Attributes:
        category: how good its output is as a merge point (as for ``LayerRule``).
    """

    category: Category = ""

    def channels(self, call: FunctionCall) -> Value:
        """Register what the call's tensors read and write; return its output's channels.

        The default follows nothing: every tensor the call reads is frozen."""
        reason = f"read by {call.name}, a function whose rule follows no channels"
        for value in (*call.args, *call.kwargs.values()):
            if isinstance(value, FromParameters):
                for param, axis in value.parameter_axes:
                    call.finder.freeze_parameter_axis(param, axis, reason)
            else:
                call.finder.freeze_value(value, reason)
        return Unknown(reason)


_FUNCTION_RULES: dict[Callable | str, FunctionRule] = {}  # or by "module.qualname"
FunctionRuleType = TypeVar("FunctionRuleType", bound=type[FunctionRule])


def register_function(
    *functions: Callable | str,
) -> Callable[[FunctionRuleType], FunctionRuleType]:
    """Class decorator: use the decorated FunctionRule for calls of ``functions`` (functions
    torch.fx does not trace into: wrapped with ``torch.fx.wrap``), given as functions or as
    "module.qualname" (a library's function that need not be imported).

    Example:
        >>> torch.fx.wrap("scale_rows")  # in the module that defines scale_rows(x, weight)
        >>> @gm.graphs.register_function(scale_rows)
        ... class ScaleRowsRule(gm.graphs.FunctionRule):
        ...     def channels(self, call):  # call.args: the channels of x, the weight's axes
        ...         x, weight = call.args
        ...         call.finder.touch(weight.parameter, 0, "out", x)
        ...         return x
    """

    def decorator(rule: FunctionRuleType) -> FunctionRuleType:
        instance = rule()
        for function in functions:
            _FUNCTION_RULES[function] = instance
        return rule

    return decorator


def function_rule(target: object) -> FunctionRule | None:
    """The rule registered for the function ``target`` (None if it has none)."""
    if not callable(target):
        return None
    found = _FUNCTION_RULES.get(target)
    if found is None:
        name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        found = _FUNCTION_RULES.get(name)
    return found


def rule_for(layer: nn.Module) -> LayerRule | None:
    """The rule registered for ``layer``'s type or its nearest registered base class."""
    for layer_type in type(layer).__mro__:
        rule = _own_rule(layer_type)
        if rule is not None:
            return rule
    return None


def _own_rule(layer_type: type) -> LayerRule | None:
    """The rule registered for exactly ``layer_type``, by the type or by its name."""
    found = _RULES.get(layer_type)
    if found is None:
        found = _RULES.get(f"{layer_type.__module__}.{layer_type.__qualname__}")
    return found


def traced_whole(layer: nn.Module) -> bool:
    """Whether torch.fx keeps ``layer`` as one call for its rule: its own type is registered
    with ``leaf`` (a subclass may change ``forward``, so it is traced through)."""
    rule = _own_rule(type(layer))
    return rule is not None and rule.leaf


def traced_through(layer: nn.Module, kwargs: dict) -> Callable | None:
    """The plain forward torch.fx follows for ``layer`` called with ``kwargs``, if its own
    type's rule gives one (``traced_forward``); else None."""
    rule = _own_rule(type(layer))
    return None if rule is None or rule.leaf else rule.traced_forward(layer, kwargs)


def registered() -> dict[type[nn.Module], LayerRule]:
    """Every registered layer type and its rule (a copy)."""
    return dict(_RULES)


def apply_layer(call: LayerCall) -> Value:
    """Run the rule of ``call.layer`` (an unknown layer, or one called on more tensors than
    its rule reads, freezes its inputs)."""
    rule = rule_for(call.layer)
    kind = type(call.layer).__name__
    if rule is None or not rule.accepts(len(call.inputs)):
        return call.unknown(f"unknown layer {call.path} ({kind})")
    return rule.channels(call)


def read_problem(value: Value, width: int, expected_axis: int | None) -> str:
    """Why ``value`` cannot be read as ``width`` channels on ``expected_axis`` ("" if it can)."""
    if isinstance(value, Unknown):
        return f"reads {value.reason}"
    if isinstance(value, Several):
        return "reads several tensors as one"
    if value is None:
        return "reads a tensor without tracked channels"
    if expected_axis is not None and value.axis is not None and value.axis != expected_axis:
        return f"reads axis {expected_axis} but channels are on axis {value.axis}"
    if value.size != width:
        return f"expects {width} channels but its input has {value.size}"
    return ""


def uniform(tensor: Tensor, bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Uniform values in ``bounds``, shaped like ``tensor``."""
    low, high = bounds
    draw = torch.rand(tensor.shape, generator=generator, dtype=_draw_dtype(tensor))
    return low + (high - low) * draw


def _draw_dtype(tensor: Tensor) -> torch.dtype:
    """Draw in the tensor's precision (half precision draws in float32, then rounds)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _own_tensors(layer: nn.Module) -> bool:
    return any(t is not None for t in [*layer._parameters.values(), *layer._buffers.values()])
