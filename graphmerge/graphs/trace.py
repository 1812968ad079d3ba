"""Automatic graphs: trace a model with torch.fx and find its spaces by union-find.

Every fx node becomes a graph node; shape propagation on the example input tells
which tensor axis carries channels at every step, so reshapes, permutes, flattens
and reductions are followed exactly. An op the tracer does not know freezes the
spaces it touches, with the reason recorded: a wrong graph is never guessed.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from graphmerge.fold import state_tensors, tensor_aliases
from graphmerge.graphs import heads as attention_heads
from graphmerge.graphs import parameters
from graphmerge.graphs.export import ExportError, exported_module
from graphmerge.graphs.layers import (
    FunctionCall,
    LayerCall,
    function_rule,
    read_problem,
    rule_for,
    traced_through,
    traced_whole,
)
from graphmerge.graphs.layers.elementwise import reshaped, spatial
from graphmerge.graphs.model_graph import GraphRecorder, ModelGraph, NodeKind
from graphmerge.graphs.operations import (
    BINARY_NAMES,
    BROADCAST_NAMES,
    ELEMENTWISE_NAMES,
    NORM_NAMES,
    ONE_OPERAND_NAMES,
    PERMUTE_NAMES,
    REDUCTION_NAMES,
    REFERENCE_NAMES,
    SHAPE_NAMES,
    SPATIAL_FUNCTIONS,
    SPLIT_NAMES,
    category,
    name_of,
)
from graphmerge.graphs.parameters import FromParameters
from graphmerge.graphs.shapes import broadcast_axis, indexed_axis
from graphmerge.graphs.spaces import Channels, Heads, Several, SpaceFinder, Unknown, Value
from graphmerge.runtime import ModelInputs, evaluating, example_inputs, input_hint


class GraphTraceError(ValueError):
    """The model could not be traced: torch.fx failed, the model rejected the example input,
    or an operation could not be followed. The message names the model, where it failed
    (the node or the line of the model's code), the cause and the fix."""


TRACE_HINT = (
    "Build the graph by hand with graphmerge.graphs.GraphBuilder (see the README section "
    "'Custom graphs'), or simplify the model's forward (data-dependent control flow cannot "
    "be traced)."
)


TracedValue = Value | FromParameters
# Weights recomputed by a forward pre-hook: (how it was applied, how to remove it).
HOOKED_NORMS = {
    WeightNorm: ("weight_norm", "remove_weight_norm"),
    SpectralNorm: ("spectral_norm", "remove_spectral_norm"),
}


TRACERS = ("auto", "fx", "export")


def trace(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | dict[str, Any] | ModelInputs,
    tracer: str = "auto",
) -> ModelGraph:
    """Trace ``model`` on ``example_input`` and find its spaces.

    ``example_input`` is one tensor, a tuple of positional input tensors, a dict of keyword
    inputs (``input_ids``, ``attention_mask``, ``pixel_values``) or a ModelInputs.
    ``tracer``: "fx" (torch.fx's symbolic tracer), "export" (torch.export's aten graph: it
    captures what torch.fx cannot, HuggingFace models among them) or "auto" (fx first,
    export where fx fails). Both give the same spaces and use the same layer rules.

    The model is traced and run in eval mode without gradients (its modes are
    restored, its weights and buffers are not touched). Whatever goes wrong on the way
    raises :class:`GraphTraceError` naming the model, the failing node or line and the fix.

    Example:
        >>> import torch, graphmerge as gm
        >>> model = gm.models.build("resnet20", num_classes=10, in_channels=1, seed=0)
        >>> graph = gm.graphs.trace(model, torch.randn(2, 1, 8, 8))
        >>> [space.name for space in graph.spaces][:3]
        ['input', 'conv1', 'layer1.0.conv1']
        >>> graph.check_symmetries(torch.randn(2, 1, 8, 8)) < 1e-4
        True
    """
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {', '.join(map(repr, TRACERS))}, got {tracer!r}")
    check_plain_model(model)
    try:
        inputs = example_inputs(example_input)
    except TypeError as error:
        raise GraphTraceError(str(error)) from error
    with evaluating(model), torch.no_grad():
        _check_runs(model, inputs)
        module, used = _captured(model, inputs, tracer)
    walker = _Walker(module, set(state_tensors(model)), tensor_aliases(model))
    for node in module.graph.nodes:
        walker.visit(node, model)
    try:
        graph = walker.recorder.finish(model, source="traced", module=module)
    except Exception as error:
        raise GraphTraceError(
            f"graphmerge could not build the graph of {type(model).__name__}: "
            f"{type(error).__name__}: {error}. {TRACE_HINT}"
        ) from error
    graph.tracer = used
    return graph


def _captured(model: nn.Module, inputs: ModelInputs, tracer: str) -> tuple[fx.GraphModule, str]:
    """The model's fx graph with shapes by ``tracer``, and the tracer that made it."""
    if tracer == "export":
        return _exported(model, inputs), "export"
    try:
        module = _symbolic_trace(model)
        _propagate_shapes(module, model, inputs)
        return module, "fx"
    except GraphTraceError as fx_error:
        if tracer == "fx":
            raise
        try:
            return _exported(model, inputs), "export"
        except GraphTraceError as export_error:
            raise GraphTraceError(
                f"neither tracer captures {type(model).__name__}. {_without_hint(fx_error)}; "
                f"and {_without_hint(export_error)}. {TRACE_HINT}"
            ) from export_error


def _without_hint(error: GraphTraceError) -> str:
    return str(error).replace(f". {TRACE_HINT}", "").replace(TRACE_HINT, "").rstrip(". ")


def _exported(model: nn.Module, inputs: ModelInputs) -> fx.GraphModule:
    try:
        module = exported_module(model, inputs)
    except ExportError as error:
        cause = error.__cause__ or error
        raise GraphTraceError(
            f"torch.export cannot capture {type(model).__name__}: {type(cause).__name__}: "
            f"{_first_line(cause)}{_model_line(cause)}. {TRACE_HINT}"
        ) from error
    try:
        ShapeProp(module).propagate(*inputs.args, *inputs.kwargs.values())
    except Exception as error:  # the exported code differs from the model's
        cause = error.__cause__ or error
        raise GraphTraceError(
            f"the exported graph of {type(model).__name__} fails where the model runs: "
            f"{_first_line(error)}: {type(cause).__name__}: {_first_line(cause)}. {TRACE_HINT}"
        ) from error
    return module


def check_plain_model(model: nn.Module, label: str = "the model") -> None:
    """A clear error for models graphmerge cannot merge as they are, naming the fix:
    wrappers (torch.compile, DataParallel) and weights computed by parametrizations."""
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise GraphTraceError(
            f"{label} is wrapped by torch.compile: merge the model inside it, model._orig_mod "
            "(compile the merged model afterwards if you like)"
        )
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise GraphTraceError(
            f"{label} is wrapped by {type(model).__name__}: merge the model inside it, model.module"
        )
    for path, module in model.named_modules():
        layer = path or type(model).__name__
        if parametrize.is_parametrized(module):
            names = ", ".join(module.parametrizations.keys())
            raise GraphTraceError(
                f"layer {layer} of {label} computes {names} through a parametrization "
                "(weight_norm, spectral_norm, orthogonal, ...): graphmerge permutes stored "
                f"weights; remove it first with torch.nn.utils.parametrize."
                f"remove_parametrizations(layer, {names.split(', ')[0]!r}) (the current "
                "values are kept), then merge"
            )
        for hook in module._forward_pre_hooks.values():
            if type(hook) in HOOKED_NORMS:
                applied, remove = HOOKED_NORMS[type(hook)]
                raise GraphTraceError(
                    f"layer {layer} of {label} computes {hook.name} with torch.nn.utils."
                    f"{applied}: graphmerge permutes stored weights; remove it first with "
                    f"torch.nn.utils.{remove}(layer), then merge"
                )


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the layers with a registered rule as single calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if traced_through(module, {}):
            return False
        return traced_whole(module) or super().is_leaf_module(module, qualified_name)

    def call_module(self, module: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        plain = traced_through(module, kwargs)
        if plain is not None:  # the rule's plain form of a layer fx cannot trace as it is
            return plain(*args, **kwargs)
        if traced_through(module, {}) is not None:  # no plain form for these arguments: a
            path = self.path_of_module(module)  # single call, which freezes what it reads
            return self.create_proxy("call_module", path, args, kwargs)
        return super().call_module(module, forward, args, kwargs)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as error:  # fx and model code raise anything: report each the same way
        raise GraphTraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(error).__name__}: "
            f"{_first_line(error)}{_model_line(error)}. {TRACE_HINT}"
        ) from error


def _check_runs(model: nn.Module, inputs: ModelInputs) -> None:
    """The plain model on the example first: its error is short and to the point."""
    try:
        model(*inputs.args, **inputs.kwargs)
    except Exception as error:
        tensors = inputs.tensors()
        if inputs.kwargs or len(inputs.args) != len(tensors):
            shapes = inputs.describe()
        else:
            shapes = ", ".join(str(tuple(x.shape)) for x in tensors)
            shapes = shapes if len(tensors) == 1 else f"({shapes})"
        hint = input_hint(model, tensors, error)
        if isinstance(error, TypeError) and "argument" in str(error):
            hint = (
                "A dict batch is passed as keyword arguments (every key but 'labels', 'label', "
                "'targets' and 'target'), a tuple input as positional ones; reshape the "
                "batches with graphmerge.data.formatted(loader, function)."
            )
        raise GraphTraceError(
            f"the example input {shapes} does not fit {type(model).__name__}: "
            f"{_first_line(error)}{_model_line(error)}. {hint}"
        ) from error


def _propagate_shapes(module: fx.GraphModule, model: nn.Module, inputs: ModelInputs) -> None:
    try:
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
        bound.apply_defaults()
        ShapeProp(module).propagate(*bound.arguments.values())
    except Exception as error:  # the traced code differs from the model's (fx wraps the node)
        cause = error.__cause__ or error
        raise GraphTraceError(
            f"the traced graph of {type(model).__name__} fails where the model runs: "
            f"{_first_line(error)}: {type(cause).__name__}: {_first_line(cause)}. {TRACE_HINT}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _model_line(error: BaseException) -> str:
    """' (at file:line in function: code)' for the innermost frame outside torch, if any."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if f"{os.sep}torch{os.sep}" not in frame.filename
        and f"{os.sep}graphmerge{os.sep}graphs{os.sep}" not in frame.filename
    ]
    if not frames:
        return ""
    frame = frames[-1]
    code = f": {frame.line.strip()}" if frame.line else ""
    return f" (at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}{code})"


def _shapes(node: fx.Node) -> list[tuple[int, ...]]:
    """The shapes of a node that returns several tensors (empty if it does not)."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, (tuple, list)):
        return []
    shapes = [getattr(item, "shape", None) for item in meta]
    return [tuple(shape) for shape in shapes] if all(s is not None for s in shapes) else []


def _floating(node: fx.Node) -> bool:
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
    return dtype is None or dtype.is_floating_point or dtype.is_complex


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(shape)


class _Walker:
    """Visits fx nodes in order, giving each output a channel structure."""

    def __init__(
        self, module: fx.GraphModule, tensor_names: set[str], aliases: dict[str, str]
    ) -> None:
        self.module = module
        self.tensor_names = tensor_names
        self.finder = SpaceFinder(aliases)
        self.recorder = GraphRecorder(self.finder)
        self.values: dict[fx.Node, TracedValue] = {}

    # -- dispatch ----------------------------------------------------------------------------
    def visit(self, node: fx.Node, model: nn.Module) -> None:
        try:
            self._visit(node)
        except GraphTraceError:
            raise
        except Exception as error:  # a bug or an unforeseen argument form: never half a graph
            raise GraphTraceError(
                f"graphmerge cannot follow node {node.name} ({node.op} {name_of(node.target)}) of "
                f"{type(model).__name__}: {type(error).__name__}: {_first_line(error)}. "
                f"{TRACE_HINT}"
            ) from error

    def _visit(self, node: fx.Node) -> None:
        value, kind, category = getattr(self, f"_{node.op}")(node)
        self.values[node] = value
        target = node.target if isinstance(node.target, str) else name_of(node.target)
        self.recorder.add_node(
            node.name,
            kind,
            target=target,
            inputs=[n.name for n in node.all_input_nodes],
            shape=_shape(node),
            value=value if not isinstance(value, FromParameters) else None,
            category=category,
        )

    def _placeholder(self, node: fx.Node) -> tuple[Value, NodeKind, str]:
        shape = _shape(node)
        if shape is None or not _floating(node):  # token ids, masks: no channels
            return None, NodeKind.INPUT, ""
        width = shape[1] if len(shape) > 1 else 1
        return self.finder.input_channels(width), NodeKind.INPUT, ""

    def _output(self, node: fx.Node) -> tuple[Value, NodeKind, str]:
        for value in self._leaves(node.args):
            if isinstance(value, Heads):
                self.finder.freeze_value(value, "attention heads are an output of the model")
            if isinstance(value, Channels):
                for segment in self.finder.expand(value).segments:
                    self.finder.union(segment.element, self.finder.output_element)
        return None, NodeKind.OUTPUT, ""

    def _get_attr(self, node: fx.Node) -> tuple[TracedValue, NodeKind, str]:
        shape = _shape(node)
        if shape is None:
            return None, NodeKind.FUNCTION, "parameter"
        name = str(node.target)
        if name in self.tensor_names and not _floating(node):
            return None, NodeKind.FUNCTION, "parameter"  # index tables, position ids
        if name in self.tensor_names:
            return FromParameters.of(name, shape), NodeKind.FUNCTION, "parameter"
        reason = (
            f"{name}, a tensor that is neither a parameter nor a buffer of the model (a plain "
            "attribute, or a constant of forward)"
        )
        return FromParameters.constant_tensor(shape, reason), NodeKind.FUNCTION, "parameter"

    def _call_module(self, node: fx.Node) -> tuple[TracedValue, NodeKind, str]:
        path = str(node.target)
        module = self.module.get_submodule(path)
        rule = rule_for(module)
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        inputs = [self._value(arg) for arg in tensors]
        if rule is None or not rule.accepts(len(inputs)):
            reason = f"unknown layer {path} ({type(module).__name__})"
            return self._unknown(node, reason), NodeKind.MODULE, ""
        if any(isinstance(value, FromParameters) for value in inputs):
            return self._module_on_parameters(node, module, inputs), NodeKind.MODULE, ""
        if any(isinstance(value, Heads) for value in inputs):
            if rule.elementwise and len(inputs) == 1:  # dropout, softmax, identity on heads
                return inputs[0], NodeKind.MODULE, ""
            reason = f"{path} ({type(module).__name__}) applied to attention heads"
            return self._unknown(node, reason), NodeKind.MODULE, ""
        shapes = [_shape(arg) for arg in tensors]
        call = LayerCall(self.finder, module, path, inputs, shapes, _shape(node))
        return rule.channels(call), NodeKind.MODULE, rule.category

    def _module_on_parameters(
        self, node: fx.Node, module: nn.Module, inputs: list[TracedValue]
    ) -> FromParameters:
        values = [value for value in inputs if isinstance(value, FromParameters)]
        if len(inputs) == 1:
            found, problem = rule_for(module).on_parameters(module, values[0], _shape(node) or ())
            if not problem:
                return found
        reason = f"{node.target} ({type(module).__name__}) is applied to parameters"
        return self._untracked(node, values, reason)

    def _call_function(self, node: fx.Node) -> tuple[TracedValue, NodeKind, str]:
        name = name_of(node.target)
        rule = function_rule(node.target)
        if rule is not None:
            call = FunctionCall(
                self.finder,
                node.name,
                fx.node.map_arg(node.args, self._value),
                fx.node.map_arg(node.kwargs, self._value),
            )
            return rule.channels(call), NodeKind.FUNCTION, rule.category
        value = self._function(node, name, node.target)
        if name == "getitem" and isinstance(self._value(node.args[0]), Several):
            return value, NodeKind.FUNCTION, "producer"  # an output of a layer
        return value, NodeKind.FUNCTION, self._category(node, name, value)

    def _call_method(self, node: fx.Node) -> tuple[TracedValue, NodeKind, str]:
        name = str(node.target)
        value = self._function(node, name, None)
        return value, NodeKind.FUNCTION, self._category(node, name, value)

    def _category(self, node: fx.Node, name: str, value: TracedValue) -> str:
        """The op's merge-point category; heads put side by side again are an attention's
        output (the features of its value space)."""
        first = self._value(node.args[0]) if node.args else None
        if isinstance(first, Heads) and isinstance(value, Channels):
            return "producer"
        return category(name)

    # -- functions ---------------------------------------------------------------------------
    def _function(self, node: fx.Node, name: str, target: Any) -> TracedValue:
        if _shape(node) is None:  # sizes, shapes, tuples of them: no channels to follow
            if name in SPLIT_NAMES and _shapes(node):
                return self._split(node, name)
            return self._non_tensor(node)
        if all(self._value(arg) is None for arg in node.all_input_nodes):
            return None  # made of tensors without channels (masks, position ids) or of none
        operands = self._operands(node, name)
        if name == "getitem":
            return self._getitem(node)
        if any(isinstance(v, Heads) for v in operands):
            return self._heads_function(node, name, operands)
        if any(isinstance(v, Several) for v in operands):
            return self._unknown(node, f"{name} at {node.name} reads several tensors as one")
        if operands and all(isinstance(v, FromParameters) for v in operands):
            return self._parameter_function(node, name, operands)
        first = self._value(node.args[0]) if node.args else None
        if name == "linear":
            return self._linear(node, first)
        if name in BINARY_NAMES:
            return self._binary(node)
        if name == "layer_norm":
            return self._functional_layer_norm(node, first)
        if name in NORM_NAMES:
            return self._functional_norm(node, name, first)
        if name == "cat":
            return self._cat(node)
        if name == "index" and isinstance(first, Channels):
            return self._index(node, first)
        if len(operands) > 1:  # everything below reads one tensor: a second one would be lost
            if name in ONE_OPERAND_NAMES or target in SPATIAL_FUNCTIONS:
                return self._unknown(node, f"{name} at {node.name} with several tensor operands")
            return self._unknown(node, f"unknown operation {name} at {node.name}")
        if isinstance(first, FromParameters):  # e.g. gamma.to(x): the reference is not read
            return self._parameter_function(node, name, [first])
        if name in ELEMENTWISE_NAMES:
            return first
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
        if name == "pad":
            return self._pad(node, first)
        if name == "roll":
            return self._roll(node, first)
        if name in SHAPE_NAMES:
            return self._reshape(node, first)
        if name in BROADCAST_NAMES:
            return self._expand(node, first)
        if name in PERMUTE_NAMES:
            return self._permute(node, first, name)
        if name in REDUCTION_NAMES:
            return self._reduce(node, first)
        return self._unknown(node, f"unknown operation {name} at {node.name}")

    def _operands(self, node: fx.Node, name: str) -> list[TracedValue]:
        """The values of the tensors the op computes with (a reference's dtype/shape is not)."""
        nodes = node.all_input_nodes
        if name in REFERENCE_NAMES and node.args and isinstance(node.args[0], fx.Node):
            nodes = [node.args[0]]
        return [self._value(n) for n in nodes if _shape(n) is not None]

    def _non_tensor(self, node: fx.Node) -> Value:
        if node.meta.get("tensor_meta") is not None:  # several tensors (chunk, split, ...)
            return self._unknown(node, f"{node.name} returns several tensors")
        values = [self._value(arg) for arg in node.all_input_nodes]
        return next((v for v in values if isinstance(v, Unknown)), None)  # sizes, shapes

    def _unknown(self, node: fx.Node, reason: str) -> Unknown:
        """An op the tracer cannot follow: everything it reads is frozen."""
        for arg in node.all_input_nodes:
            value = self._value(arg)
            if isinstance(value, FromParameters):
                self._freeze_parameters(value, f"read by {reason}")
            else:
                self.finder.freeze_value(value, f"read by {reason}")
        return Unknown(reason)

    # -- parameters --------------------------------------------------------------------------
    def _parameter_function(
        self, node: fx.Node, name: str, operands: list[TracedValue]
    ) -> FromParameters | None:
        """An op on tensors computed from parameters alone (no data reaches it)."""
        values = [v for v in operands if isinstance(v, FromParameters)]
        first, shape = values[0], _shape(node) or ()
        if name in BINARY_NAMES:
            return self._parameter_result(node, *parameters.combined(values, shape))
        if len(values) > 1:
            return self._untracked(node, values, f"{name} at {node.name} combines parameters")
        if name in ELEMENTWISE_NAMES:
            return first
        if name in SHAPE_NAMES:
            return self._parameter_result(node, *parameters.reshaped(first, shape))
        if name in BROADCAST_NAMES:
            return self._parameter_result(node, *parameters.broadcast(first, shape))
        if name in PERMUTE_NAMES:
            return parameters.permuted(first, self._permutation(node, name))
        if name in REDUCTION_NAMES:
            dims = self._reduced_dims(node)
            if dims is None:  # a full reduction: one number, the same in any order
                return None
            return parameters.reduced(first, dims, shape)
        return self._untracked(node, values, f"unknown operation {name} at {node.name}")

    def _parameter_result(
        self, node: fx.Node, value: FromParameters, problem: str
    ) -> FromParameters:
        if problem:
            return self._untracked(node, [value], f"{node.name} {problem}")
        return value

    def _untracked(
        self, node: fx.Node, values: list[FromParameters], reason: str
    ) -> FromParameters:
        """A tensor of parameters the tracer cannot follow: they are frozen, and the result
        freezes any channels it is broadcast along."""
        for value in values:
            self._freeze_parameters(value, reason)
        return FromParameters.constant_tensor(_shape(node) or (), reason)

    def _freeze_parameters(self, value: FromParameters, reason: str) -> None:
        for param, axis in value.parameter_axes:
            self.finder.freeze_parameter_axis(param, axis, reason)

    def _along_channels(
        self, value: FromParameters, axis: int, channels: Channels, where: str
    ) -> None:
        """``value`` meets ``channels`` with its ``axis`` on theirs: that axis joins their space.

        Parameter axes running along the other (non-channel) dims must not be permuted."""
        for other, carried in enumerate(value.axes):
            if other != axis:
                for param, param_axis in carried:
                    reason = f"{where} runs {param} along a dim that is not channels"
                    self.finder.freeze_parameter_axis(param, param_axis, reason)
        if value.shape[axis] == 1:
            return
        if value.shape[axis] != channels.size:
            reason = f"{where} broadcasts {value.shape[axis]} values along {channels.size} channels"
            self.finder.freeze_value(channels, reason)
            self._freeze_parameters(value, reason)
            return
        for param, param_axis in value.axes[axis]:
            self.finder.touch(param, param_axis, "out", channels)
        if value.constant:
            self.finder.freeze_value(channels, f"{where} multiplies them with {value.constant}")

    # -- data --------------------------------------------------------------------------------
    def _binary(self, node: fx.Node) -> TracedValue:
        out_shape = _shape(node) or ()
        joined: list[Value] = []
        params: list[FromParameters] = []
        plain: list[tuple[int, ...]] = []  # shapes of tensors without channels (masks, ids)
        for arg in (*node.args, *node.kwargs.values()):
            if not isinstance(arg, fx.Node) or _shape(arg) is None:
                continue
            value = self._value(arg)
            if value is None:
                plain.append(_shape(arg))
            if isinstance(value, FromParameters):
                params.append(value.aligned(len(out_shape)))
            elif isinstance(value, Channels) and value.axis is not None:
                axis = broadcast_axis(self._ndim(arg), len(out_shape), value.axis)
                if (_shape(arg) or ())[value.axis] == out_shape[axis]:
                    joined.append(value.moved(axis))
                # else: a single channel broadcast over the others, which it does not touch
            else:
                joined.append(value)
        if not any(isinstance(v, (Channels, Unknown)) for v in joined):
            # parameters with data that carries no channels (or none at all)
            if not params:
                return None
            return self._parameter_result(node, *parameters.combined(params, out_shape))
        axes = {v.axis for v in joined if isinstance(v, Channels)} - {None}
        if len(axes) > 1:
            return self._unknown(node, f"{node.name} combines channels on different axes")
        out = self.finder.join(joined, node.name)
        if isinstance(out, Channels) and out.axis is not None:
            for shape in plain:
                axis = out.axis - (len(out_shape) - len(shape))  # the axis in the plain tensor
                if 0 <= axis < len(shape) and shape[axis] > 1:
                    reason = f"{node.name} combines them with a tensor that varies along them"
                    self.finder.freeze_value(out, reason)
        for value in params:
            if isinstance(out, Channels) and out.axis is not None:
                self._along_channels(value, out.axis, out, node.name)
            else:  # unknown channels, or the model input (never permuted)
                self._freeze_parameters(value, f"{node.name} combines it with untracked channels")
        return out

    def _cat(self, node: fx.Node) -> Value:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim = dim % len(_shape(node) or (0,))
        values = [self._value(t) for t in tensors]
        if all(isinstance(v, Channels) and v.axis == dim for v in values):
            out = self.finder.concatenate(values, dim)
            self.recorder.concatenation(node.name, out)
            return out
        channels = [v for v in values if isinstance(v, Channels)]
        along = all(v.axis is not None and v.axis != dim for v in channels)
        if channels and along and all(isinstance(v, (Channels, FromParameters)) for v in values):
            # along another axis (the batch, the tokens): one channel structure; parameters
            # concatenated there (a class token) join it along their channel axis
            out = self.finder.join(channels, node.name)
            for value in values:
                if isinstance(value, FromParameters):
                    if isinstance(out, Channels):
                        aligned = value.aligned(len(_shape(node) or ()))
                        self._along_channels(aligned, out.axis, out, node.name)
                    else:
                        self._freeze_parameters(value, f"{node.name} joins it to {out}")
            return out
        return self._unknown(node, f"{node.name} concatenates tensors of unknown channels")

    def _getitem(self, node: fx.Node) -> TracedValue:
        """``x[index]``: an item of several outputs, or an index that leaves channels whole."""
        value, index = self._value(node.args[0]), node.args[1]
        if isinstance(value, Heads):
            return self._heads_item(node, value, index)
        if isinstance(value, Several):
            if isinstance(index, int) and -len(value.values) <= index < len(value.values):
                return value.values[index]
            return self._unknown(node, f"{node.name} takes {index!r} of several tensors")
        if isinstance(value, FromParameters):
            return self._untracked(node, [value], f"{node.name} indexes parameters")
        if not isinstance(value, Channels) or value.axis is None:
            return self._unknown(node, f"{node.name} indexes a tensor of unknown channels")
        axis, channel_slice, problem = indexed_axis(_shape(node.args[0]), index, value.axis)
        if problem:
            return self._unknown(node, f"{node.name} {problem}")
        if channel_slice is not None:
            kept = self._sliced(value, [channel_slice])[0]
            if kept is None:
                return self._unknown(node, f"{node.name} slices channels inside a space")
            value = kept
        return value.moved(axis)

    def _index(self, node: fx.Node, value: Channels) -> Value:
        """aten.index (``x[rows, cols]`` with index tensors, as torch.export writes it):
        channels after every indexed axis pass, at the same distance from the end."""
        indices = node.args[1] if len(node.args) > 1 else ()
        indexed = [axis for axis, index in enumerate(indices) if index is not None]
        plain = all(self._value(i) is None for i in indices if isinstance(i, fx.Node))
        if value.axis is None or not plain or not indexed or value.axis <= max(indexed):
            return self._unknown(node, f"{node.name} indexes the channel axis")
        return value.moved(value.axis - self._ndim(node.args[0]) + len(_shape(node) or ()))

    def _heads_item(self, node: fx.Node, value: Heads, index: Any) -> Value:
        """``qkv[i]`` of packed heads (q, k, v along the leading parts axis)."""
        if value.parts_axis == 0 and isinstance(index, int) and 0 <= index < value.parts:
            pieces = self._unpacked(node, value)
            if pieces is not None:
                return pieces[index]
        return self._unknown(node, f"{node.name} indexes attention heads")

    def _unpacked(self, node: fx.Node, value: Heads) -> list[Heads] | None:
        shape = _shape(node.args[0]) or ()
        width = value.heads * shape[value.inner_axis]
        return attention_heads.unpacked(value, self.finder, width)

    def _split(self, node: fx.Node, name: str) -> Value:
        """split / chunk / unbind: pieces along another axis keep the channels; along the
        channel axis, each piece must be whole segments (a concatenation taken apart)."""
        value, pieces = self._value(node.args[0]), _shapes(node)
        in_shape = _shape(node.args[0]) or ()
        dims = node.args[2:3] if name != "unbind" else node.args[1:2]
        dim = (dims[0] if dims else node.kwargs.get("dim", 0)) % max(1, len(in_shape))
        if isinstance(value, FromParameters):
            return self._untracked(node, [value], f"{node.name} splits parameters")
        if isinstance(value, Heads):
            pieces = self._unpacked(node, value) if name == "unbind" else None
            if pieces is None or dim != value.parts_axis:
                return self._unknown(node, f"{node.name} splits attention heads")
            return Several(tuple(pieces))
        if not isinstance(value, Channels) or value.axis is None:
            return self._unknown(node, f"{node.name} splits a tensor of unknown channels")
        if dim != value.axis:
            axis = value.axis - (1 if name == "unbind" and dim < value.axis else 0)
            return Several(tuple(value.moved(axis) for _ in pieces))
        if name == "unbind":
            return self._unknown(node, f"{node.name} unbinds the channel axis")
        bounds, start = [], 0
        for shape in pieces:
            bounds.append((start, start + shape[dim]))
            start += shape[dim]
        parts = self._sliced(value, bounds)
        if any(part is None for part in parts):
            reason = f"{node.name} returns several tensors that cut a space apart"
            return self._unknown(node, reason)
        return Several(tuple(parts))

    def _sliced(self, value: Channels, bounds: list[tuple[int, int]]) -> list[Channels | None]:
        """The channels at each [start, stop) of ``bounds``; a space cut inside is refined
        into parts at the cuts first (see ``SpaceFinder.refine``)."""
        parts = [value.sliced(start, stop) for start, stop in bounds]
        if all(part is not None for part in parts):
            return parts
        refined = self.finder.refine(value, sorted({b for pair in bounds for b in pair}))
        if refined is None:
            return parts
        return [refined.sliced(start, stop) for start, stop in bounds]

    def _functional_norm(self, node: fx.Node, name: str, value: TracedValue) -> TracedValue:
        """F.batch_norm / instance_norm / group_norm: statistics and affine on axis 1."""
        if not isinstance(value, Channels) or value.axis != 1:
            return self._unknown(node, f"{node.name} {name} of channels not on axis 1")
        tensors = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
        params = [self._value(t) for t in tensors if _shape(t) is not None]
        if any(not isinstance(p, FromParameters) for p in params):
            return self._unknown(node, f"{node.name} {name} with statistics from data")
        if name == "group_norm":
            groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
            if groups not in (1, value.size):
                self.finder.freeze_value(
                    value,
                    f"{node.name} is a group_norm with {groups} groups: moving a channel to "
                    "another group changes the group statistics",
                )
        for param in params:
            self._along_channels(param, 0, value, node.name)
        return value

    def _pad(self, node: fx.Node, value: Value) -> Value:
        """F.pad: channels pass unless the channel axis itself is padded."""
        if not isinstance(value, Channels) or value.axis is None:
            return value
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        from_end = self._ndim(node.args[0]) - 1 - value.axis
        if any(pad[2 * from_end : 2 * from_end + 2]):
            return self._unknown(node, f"{node.name} pads the channel axis")
        return value

    def _heads_function(self, node: fx.Node, name: str, operands: list) -> Value:
        """An op on heads (see ``graphs.heads``): followed where attention does it, else the
        heads are frozen. A per-head bias added to the logits (T5's relative attention bias,
        written by a layer along the heads' axis) joins the heads' block index."""
        first = operands[0] if operands else None
        found: Value | str = f"{name} of attention heads"
        tensors = [v for v in operands if isinstance(v, Heads)]
        others = [v for v in operands if not isinstance(v, Heads)]
        plain = all(v is None for v in others)  # masks, scales: no channels, no parameters
        ndim = len(_shape(node) or ())
        if name in SHAPE_NAMES and isinstance(first, Heads) and len(operands) == 1:
            found = attention_heads.reshaped_heads(first, _shape(node.args[0]), _shape(node))
        elif name in PERMUTE_NAMES and isinstance(first, Heads):
            order = self._permutation(node, name)
            found = first.moved({old: new for new, old in enumerate(order)})
        elif name in ELEMENTWISE_NAMES and len(operands) == 1:
            found = first
        elif name in BINARY_NAMES and len(tensors) == 1:
            if plain or self._head_biases(node, tensors[0], node.all_input_nodes):
                found = tensors[0]
        elif name in ("matmul", "bmm") and len(tensors) == 2 and not others:
            a, b = tensors
            if a.inner_axis == ndim - 1 and b.inner_axis == ndim - 2:
                found = attention_heads.attention_scores(self.finder, a, b, self._origin(a))
            elif a.inner_axis is None:
                found = attention_heads.attended(self.finder, a, b, ndim - 1)
        elif name == "scaled_dot_product_attention" and len(tensors) == 3:
            q, k, v = tensors
            if q.inner_axis == k.inner_axis == v.inner_axis == ndim - 1:
                scores = attention_heads.attention_scores(self.finder, q, k, self._origin(q))
                masks = [n for n in node.all_input_nodes if not isinstance(self._value(n), Heads)]
                if isinstance(scores, Heads) and (plain or self._head_biases(node, scores, masks)):
                    found = attention_heads.attended(self.finder, scores, v, ndim - 1)
                elif not isinstance(scores, Heads):
                    found = scores
        if isinstance(found, str):
            return self._unknown(node, f"{node.name} {found}")
        return found

    def _head_biases(self, node: fx.Node, scores: Heads, args: list[fx.Node]) -> bool:
        """Whether every tensor of ``args`` that carries channels is a bias per head of the
        attention logits ``scores`` (one space as wide as the heads, on their axis); those
        spaces join the heads' block index (only the head permutation moves them)."""
        if scores.inner_axis is not None or scores.index is None:
            return False
        biases = []
        for arg in args:
            value = self._value(arg)
            if value is None or isinstance(value, Heads):
                continue
            if not isinstance(value, Channels) or value.axis is None:
                return False
            segments = self.finder.expand(value).segments
            axis = broadcast_axis(self._ndim(arg), len(_shape(node) or ()), value.axis)
            if axis != scores.head_axis or len(segments) != 1 or segments[0].width != scores.heads:
                return False
            biases.append(segments[0].element)
        for element in biases:
            self.finder.union(element, scores.index)
        return True

    def _origin(self, heads: Heads) -> str:
        """The layer the heads' queries come from (a packed projection's, without the slice)."""
        return self.finder.origin(heads.element).split("[", 1)[0]

    def _linear(self, node: fx.Node, value: Value) -> Value:
        """F.linear(x, weight, bias) with stored parameters: as an nn.Linear (weight axis 1
        reads x's last axis, axis 0 and the bias write a new space)."""
        weight = self._value(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = self._value(bias_arg)
        params = [p for p in (weight, bias) if p is not None]
        if not all(isinstance(p, FromParameters) and p.parameter for p in params) or (
            bias_arg is not None and bias is None
        ):
            return self._unknown(node, f"{node.name} is a linear map of computed weights")
        last = self._ndim(node.args[0]) - 1
        width = weight.shape[1]
        if self.finder.is_input(value):
            value = self.finder.input_channels(width)
        elif read_problem(value, width, last):
            return self._unknown(node, f"{node.name} {read_problem(value, width, last)}")
        self.finder.touch(weight.parameter, 1, "in", value)
        origin = weight.parameter.rsplit(".", 1)[0] if "." in weight.parameter else node.name
        out = self.finder.new_channels(origin, weight.shape[0], last)
        for param in params:
            self.finder.touch(param.parameter, 0, "out", out)
        return out

    def _roll(self, node: fx.Node, value: Value) -> Value:
        """torch.roll: channels pass unless the channel axis is rolled (or the tensor is
        rolled flat)."""
        if not isinstance(value, Channels) or value.axis is None:
            return value
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
        ndim = self._ndim(node.args[0])
        dims = [dims] if isinstance(dims, int) else list(dims or ())
        if not dims or value.axis in [d % ndim for d in dims]:
            return self._unknown(node, f"{node.name} rolls the channel axis")
        return value

    def _permutation(self, node: fx.Node, name: str) -> list[int]:
        """New axis k of a permute / transpose / t is old axis ``dims[k]``."""
        ndim = len(_shape(node) or ())
        args = [a for a in node.args[1:]] or list(node.kwargs.values())
        if name == "t":
            args = [0, 1] if ndim > 1 else [0, 0]
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            return [d % ndim for d in dims]
        first, second = (a % ndim for a in args[:2])
        dims = list(range(ndim))
        dims[first], dims[second] = second, first
        return dims

    def _permute(self, node: fx.Node, value: Value, name: str) -> Value:
        if not isinstance(value, Channels) or value.axis is None:
            return value
        return value.moved(self._permutation(node, name).index(value.axis))

    def _reduced_dims(self, node: fx.Node) -> set[int] | None:
        """The dims a reduction runs over (None: all of them)."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return None
        in_ndim = self._ndim(node.args[0])
        return {d % in_ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])}

    def _reduce(self, node: fx.Node, value: Value) -> Value:
        if not isinstance(value, Channels) or value.axis is None:
            return value
        in_ndim = self._ndim(node.args[0])
        dims = self._reduced_dims(node)
        if dims is None:
            return None
        if value.axis in dims:  # a sum or mean over channels does not change when they move
            return None
        keepdim = len(_shape(node) or ()) == in_ndim
        return value.moved(value.axis - (0 if keepdim else sum(d < value.axis for d in dims)))

    def _reshape(self, node: fx.Node, value: Value) -> Value:
        if isinstance(value, Channels):
            found = attention_heads.split_into_heads(value, _shape(node.args[0]), _shape(node))
            if found is not None:
                return found
        return reshaped(
            value,
            _shape(node.args[0]),
            _shape(node),
            node.name,
            lambda reason: self._unknown(node, reason),
        )

    def _expand(self, node: fx.Node, value: Value) -> Value:
        if not isinstance(value, Channels) or value.axis is None:
            return value
        in_shape, out_shape = _shape(node.args[0]) or (), _shape(node) or ()
        axis = broadcast_axis(len(in_shape), len(out_shape), value.axis)
        if in_shape[value.axis] != out_shape[axis]:
            return self._unknown(node, f"{node.name} expands a single channel")
        return value.moved(axis)

    def _functional_layer_norm(self, node: fx.Node, value: TracedValue) -> TracedValue:
        args = list(node.args) + [None] * 5
        shape = args[1] or node.kwargs.get("normalized_shape")
        weight = args[2] if args[2] is not None else node.kwargs.get("weight")
        bias = args[3] if args[3] is not None else node.kwargs.get("bias")
        in_ndim = self._ndim(node.args[0])
        if not isinstance(value, Channels) or value.axis is None:
            return self._unknown(node, f"{node.name} layer_norm of unknown channels")
        affine = [self._value(t) for t in (weight, bias) if isinstance(t, fx.Node)]
        if any(not isinstance(p, FromParameters) for p in affine):
            return self._unknown(node, f"{node.name} layer_norm with affine parameters from data")
        first = in_ndim - len(shape)
        for param in affine:
            if value.axis < first:  # normalizes within each channel: channels pass untouched
                self._freeze_parameters(param, f"{node.name} runs it along a dim not channels")
            else:
                param = param.aligned(len(shape))
                self._along_channels(param, value.axis - first, value, node.name)
        return value

    # -- helpers -----------------------------------------------------------------------------
    def _value(self, arg: Any) -> TracedValue:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def _ndim(self, arg: Any) -> int:
        return len(_shape(arg) or ())

    def _leaves(self, args: Any) -> Iterator[TracedValue]:
        if isinstance(args, fx.Node):
            yield self._value(args)
        elif isinstance(args, (list, tuple)):
            for arg in args:
                yield from self._leaves(arg)
        elif isinstance(args, dict):
            for arg in args.values():
                yield from self._leaves(arg)
