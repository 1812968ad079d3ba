"""Automatic graphs: trace a model with torch.fx and find its spaces by union-find.

Every fx node becomes a graph node; shape propagation on the example input tells
which tensor axis carries channels at every step, so reshapes, permutes, flattens
and reductions are followed exactly. An op the tracer does not know freezes the
spaces it touches, with the reason recorded: a wrong graph is never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from graphmerge.evaluation.metrics import evaluating, input_hint
from graphmerge.graphs.model_graph import GraphRecorder, ModelGraph, NodeKind
from graphmerge.graphs.rules import apply_module, is_known_module, module_category, spatial
from graphmerge.graphs.spaces import Channels, SpaceFinder, Unknown, Value


class GraphTraceError(ValueError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported code)."""


@dataclass(frozen=True)
class Parameter:
    """A parameter or buffer read directly (fx get_attr), e.g. a layer-scale vector."""

    name: str
    shape: tuple[int, ...]


def _name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


ACTIVATION_NAMES = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "gelu",
        "silu",
        "hardswish",
        "hardsigmoid",
        "hardtanh",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "mish",
        "softplus",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "tanh_",
    }
)
ELEMENTWISE_NAMES = ACTIVATION_NAMES | {
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "stochastic_depth",
    "neg",
    "pos",
    "abs",
    "exp",
    "clamp",
    "clamp_",
    "clip",
    "sqrt",
    "rsqrt",
    "softmax",
    "log_softmax",
    "normalize",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "identity",
}
BINARY_NAMES = frozenset(
    {
        "add",
        "add_",
        "iadd",
        "sub",
        "sub_",
        "isub",
        "mul",
        "mul_",
        "imul",
        "truediv",
        "div",
        "div_",
        "itruediv",
    }
)
REDUCTION_NAMES = frozenset({"mean", "sum", "amax", "amin", "std", "var", "logsumexp"})
SHAPE_NAMES = frozenset(
    {"flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
)
SPATIAL_FUNCTIONS: dict[Callable, int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
ADD_NAMES = frozenset({"add", "add_", "iadd", "sub", "sub_", "isub"})


def trace(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> ModelGraph:
    """Trace ``model`` with torch.fx on ``example_input`` and find its spaces.

    The model is traced and run in eval mode without gradients (its modes are
    restored, its weights and buffers are not touched).

    Example:
        >>> import torch, graphmerge as gm
        >>> model = gm.models.build("resnet20", num_classes=10, in_channels=1, seed=0)
        >>> graph = gm.graphs.trace(model, torch.randn(2, 1, 8, 8))
        >>> [space.name for space in graph.spaces][:3]
        ['input', 'conv1', 'layer1.0.conv1']
        >>> graph.check_symmetries(torch.randn(2, 1, 8, 8)) < 1e-4
        True
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with evaluating(model), torch.no_grad():
        module = _symbolic_trace(model)
        _propagate_shapes(module, model, inputs)
    walker = _Walker(module)
    for node in module.graph.nodes:
        walker.visit(node)
    return walker.recorder.finish(model, source="traced", module=module)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except (fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as error:
        raise GraphTraceError(
            f"torch.fx cannot trace {type(model).__name__}: {error}. Models with data-dependent "
            "control flow cannot be traced; build the graph by hand with "
            "graphmerge.graphs.GraphBuilder (see the README section 'Custom graphs')."
        ) from error


def _propagate_shapes(module: fx.GraphModule, model: nn.Module, inputs: tuple) -> None:
    try:  # the plain model first: its error is short and to the point
        model(*inputs)
    except (RuntimeError, ValueError, TypeError) as error:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, Tensor))
        shapes = shapes if len(inputs) == 1 else f"({shapes})"
        raise ValueError(
            f"the example input {shapes} does not fit {type(model).__name__}: {error}. "
            f"{input_hint(model, inputs, error)}"
        ) from error
    ShapeProp(module).propagate(*inputs)


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(shape)


class _Walker:
    """Visits fx nodes in order, giving each output a channel structure."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.finder = SpaceFinder()
        self.recorder = GraphRecorder(self.finder)
        self.values: dict[fx.Node, Value | Parameter] = {}

    # -- dispatch ----------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        handler = getattr(self, f"_{node.op}")
        value, kind, category = handler(node)
        self.values[node] = value
        target = node.target if isinstance(node.target, str) else _name(node.target)
        self.recorder.add_node(
            node.name,
            kind,
            target=target,
            inputs=[n.name for n in node.all_input_nodes],
            shape=_shape(node),
            value=value if not isinstance(value, Parameter) else None,
            category=category,
        )

    def _placeholder(self, node: fx.Node) -> tuple[Value, NodeKind, str]:
        shape = _shape(node)
        if shape is None:
            return None, NodeKind.INPUT, ""
        width = shape[1] if len(shape) > 1 else 1
        return self.finder.input_channels(width), NodeKind.INPUT, ""

    def _output(self, node: fx.Node) -> tuple[Value, NodeKind, str]:
        for value in self._leaves(node.args):
            if isinstance(value, Channels):
                for segment in value.segments:
                    self.finder.union(segment.element, self.finder.output_element)
        return None, NodeKind.OUTPUT, ""

    def _get_attr(self, node: fx.Node) -> tuple[Value | Parameter, NodeKind, str]:
        shape = _shape(node)
        return Parameter(str(node.target), shape or ()), NodeKind.FUNCTION, "parameter"

    def _call_module(self, node: fx.Node) -> tuple[Value, NodeKind, str]:
        path = str(node.target)
        module = self.module.get_submodule(path)
        value = self._value(node.args[0]) if node.args else None
        if isinstance(module, nn.Flatten):
            return self._reshape(node, value), NodeKind.MODULE, "shape"
        if not is_known_module(module) or len(node.all_input_nodes) != 1:
            reason = f"unknown layer {path} ({type(module).__name__})"
            return self._unknown(node, reason), NodeKind.MODULE, ""
        in_shape = _shape(node.args[0])
        out = apply_module(
            self.finder, module, path, value, None if in_shape is None else len(in_shape)
        )
        return out, NodeKind.MODULE, module_category(module)

    def _call_function(self, node: fx.Node) -> tuple[Value, NodeKind, str]:
        name = _name(node.target)
        return self._function(node, name, node.target), NodeKind.FUNCTION, _category(name)

    def _call_method(self, node: fx.Node) -> tuple[Value, NodeKind, str]:
        name = str(node.target)
        return self._function(node, name, None), NodeKind.FUNCTION, _category(name)

    # -- functions ---------------------------------------------------------------------------
    def _function(self, node: fx.Node, name: str, target: Any) -> Value:
        if _shape(node) is None:  # sizes, shapes, tuples of them: no channels to follow
            return self._non_tensor(node)
        first = self._value(node.args[0]) if node.args else None
        if name in ELEMENTWISE_NAMES:
            return first if not isinstance(first, Parameter) else None
        if target in SPATIAL_FUNCTIONS:
            return spatial(
                self.finder, first, node.name, SPATIAL_FUNCTIONS[target], self._ndim(node.args[0])
            )
        if name == "interpolate":
            return spatial(
                self.finder,
                first,
                node.name,
                self._ndim(node.args[0]) - 2,
                self._ndim(node.args[0]),
            )
        if name in BINARY_NAMES:
            return self._binary(node)
        if name == "cat":
            return self._cat(node)
        if name in SHAPE_NAMES:
            return self._reshape(node, first)
        if name in ("permute", "transpose", "t"):
            return self._permute(node, first, name)
        if name in REDUCTION_NAMES:
            return self._reduce(node, first)
        if name == "layer_norm":
            return self._functional_layer_norm(node, first)
        return self._unknown(node, f"unknown operation {name} at {node.name}")

    def _non_tensor(self, node: fx.Node) -> Value:
        if node.meta.get("tensor_meta") is not None:  # several tensors (chunk, split, ...)
            return self._unknown(node, f"{node.name} returns several tensors")
        values = [self._value(arg) for arg in node.all_input_nodes]
        return next((v for v in values if isinstance(v, Unknown)), None)  # sizes, shapes

    def _unknown(self, node: fx.Node, reason: str) -> Unknown:
        for arg in node.all_input_nodes:
            value = self._value(arg)
            if not isinstance(value, Parameter):
                self.finder.freeze_value(value, f"read by {reason}")
        return Unknown(reason)

    def _binary(self, node: fx.Node) -> Value:
        out_shape = _shape(node) or ()
        joined: list[Value] = []
        parameters: list[Parameter] = []
        for arg in node.args:
            if not isinstance(arg, fx.Node):
                continue
            value = self._value(arg)
            if isinstance(value, Parameter):
                parameters.append(value)
            elif isinstance(value, Channels) and value.axis is not None:
                axis = value.axis + len(out_shape) - len(_shape(arg) or ())
                if (_shape(arg) or ())[value.axis] == out_shape[axis]:
                    joined.append(value.moved(axis))
                # else: a single channel broadcast over the others, which it does not touch
            else:
                joined.append(value)
        axes = {v.axis for v in joined if isinstance(v, Channels)} - {None}
        if len(axes) > 1:
            return self._unknown(node, f"{node.name} combines channels on different axes")
        out = self.finder.join(joined, node.name)
        if isinstance(out, Channels) and out.axis is not None:
            for parameter in parameters:
                self._touch_broadcast(parameter, out, len(out_shape))
        return out

    def _touch_broadcast(self, parameter: Parameter, value: Channels, out_ndim: int) -> None:
        """A parameter broadcast against channels (layer scale): its channel axis is written."""
        axis = value.axis - (out_ndim - len(parameter.shape))
        if axis < 0 or parameter.shape[axis] == 1:
            return
        if parameter.shape[axis] != value.size:
            self.finder.freeze_value(value, f"{parameter.name} does not match its channels")
            return
        self.finder.touch(parameter.name, axis, "out", value)

    def _cat(self, node: fx.Node) -> Value:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim = dim % len(_shape(node) or (0,))
        values = [self._value(t) for t in tensors]
        if all(isinstance(v, Channels) and v.axis == dim for v in values):
            out = self.finder.concatenate(values, dim)
            self.recorder.concatenation(node.name, out)
            return out
        if all(isinstance(v, Channels) and v.axis is not None for v in values):
            return self.finder.join(values, node.name)  # e.g. cat along the batch
        return self._unknown(node, f"{node.name} concatenates tensors of unknown channels")

    def _permute(self, node: fx.Node, value: Value, name: str) -> Value:
        if not isinstance(value, Channels) or value.axis is None:
            return value
        ndim = len(_shape(node) or ())
        args = [a for a in node.args[1:]] or list(node.kwargs.values())
        if name == "t":
            args = [0, 1]
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            return value.moved([d % ndim for d in dims].index(value.axis))
        first, second = (a % ndim for a in args[:2])
        swap = {first: second, second: first}
        return value.moved(swap.get(value.axis, value.axis))

    def _reduce(self, node: fx.Node, value: Value) -> Value:
        if not isinstance(value, Channels) or value.axis is None:
            return value
        in_ndim = self._ndim(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return None
        dims = {d % in_ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if value.axis in dims:  # a sum or mean over channels does not change when they move
            return None
        keepdim = len(_shape(node) or ()) == in_ndim
        return value.moved(value.axis - (0 if keepdim else sum(d < value.axis for d in dims)))

    def _reshape(self, node: fx.Node, value: Value) -> Value:
        if not isinstance(value, Channels) or value.axis is None:
            return value
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if in_shape is None or out_shape is None or in_shape[value.axis] != value.size:
            return self._unknown(node, f"{node.name} reshapes channels it cannot follow")
        axis, repeat, problem = reshaped_axis(in_shape, out_shape, value.axis)
        if problem:
            return self._unknown(node, f"{node.name} {problem}")
        return value.moved(axis).repeated(repeat)

    def _functional_layer_norm(self, node: fx.Node, value: Value) -> Value:
        args = list(node.args) + [None] * 5
        shape = args[1] or node.kwargs.get("normalized_shape")
        weight = args[2] if args[2] is not None else node.kwargs.get("weight")
        bias = args[3] if args[3] is not None else node.kwargs.get("bias")
        in_ndim = self._ndim(node.args[0])
        if not isinstance(value, Channels) or value.axis is None:
            return self._unknown(node, f"{node.name} layer_norm of unknown channels")
        if value.axis < in_ndim - len(shape):
            return value
        axis = value.axis - (in_ndim - len(shape))
        for tensor in (weight, bias):
            parameter = self.values.get(tensor) if isinstance(tensor, fx.Node) else None
            if isinstance(parameter, Parameter):
                self.finder.touch(parameter.name, axis, "out", value)
            elif tensor is not None:
                return self._unknown(node, f"{node.name} layer_norm with computed parameters")
        return value

    # -- helpers -----------------------------------------------------------------------------
    def _value(self, arg: Any) -> Value | Parameter:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def _ndim(self, arg: Any) -> int:
        return len(_shape(arg) or ())

    def _leaves(self, args: Any) -> Iterator[Value | Parameter]:
        if isinstance(args, fx.Node):
            yield self._value(args)
        elif isinstance(args, (list, tuple)):
            for arg in args:
                yield from self._leaves(arg)
        elif isinstance(args, dict):
            for arg in args.values():
                yield from self._leaves(arg)


def _category(name: str) -> str:
    if name in ACTIVATION_NAMES:
        return "activation"
    return "add" if name in ADD_NAMES else ""


def reshaped_axis(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int
) -> tuple[int, int, str]:
    """Where channel ``axis`` goes in a reshape: (new axis, repeat factor, problem or "").

    Merging dims that follow the channels into it (flattening C x H x W) repeats
    every channel; anything that splits the channels or moves other dims inside
    them is reported as a problem.
    """
    if in_shape[axis] == 1:
        return 0, 1, "reshapes a single-channel tensor"
    big_in = [i for i, size in enumerate(in_shape) if size != 1]
    big_out = [j for j, size in enumerate(out_shape) if size != 1]
    i = j = 0
    while i < len(big_in):
        group_in, group_out = [big_in[i]], [big_out[j]]
        size_in, size_out = in_shape[big_in[i]], out_shape[big_out[j]]
        while size_in != size_out:
            if size_in < size_out:
                i += 1
                group_in.append(big_in[i])
                size_in *= in_shape[big_in[i]]
            else:
                j += 1
                group_out.append(big_out[j])
                size_out *= out_shape[big_out[j]]
        if axis in group_in:
            if len(group_out) > 1:
                return 0, 1, "splits the channel axis (as a channel shuffle does)"
            if group_in[0] != axis:
                return 0, 1, "flattens other dims in front of the channels (channel-last flatten)"
            inner = size_in // in_shape[axis]
            return group_out[0], inner, ""
        i += 1
        j += 1
    return 0, 1, "reshape not understood"
