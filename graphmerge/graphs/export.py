"""The export tracer: torch.export's aten graph of a model, in the fx tracer's vocabulary.

torch.export captures models torch.fx cannot (HuggingFace transformers, shape-dependent
code). Its graph is rewritten into a plain torch.fx GraphModule that the walker of
``graphs.trace`` reads like any other:

- parameters and buffers become ``get_attr`` nodes named by their state_dict names;
- every call of a layer with a rule (nn.Linear, nn.LayerNorm, GPT-2's Conv1D, ...) that
  torch.fx would keep whole becomes one ``call_module`` node again, so the same layer
  rules apply (found from the ``nn_module_stack`` torch.export records);
- the aten ops whose arguments differ from their torch function (slice, select,
  embedding, batch_norm) are written as that function; the others keep their aten op,
  which the vocabulary names by its packet ("aten.view.default" is "view").

The batch axis of the example's tensors (and every axis of its integer ones, token ids
and masks) is exported as dynamic where the model allows it, so the graph runs on
batches of any size (and text of any length).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from graphmerge.graphs.layers import rule_for, traced_through, traced_whole
from graphmerge.runtime import ModelInputs

aten = torch.ops.aten


class ExportError(RuntimeError):
    """torch.export could not capture the model (the cause is chained)."""


def exported_module(model: nn.Module, inputs: ModelInputs) -> fx.GraphModule:
    """``model`` captured by torch.export on ``inputs``, as a plain fx GraphModule that
    takes the example's tensors (positional ones first, then the keyword ones by name)."""
    program = export(model, inputs)
    graph, root = _plain_graph(program, model)
    _collapse_layers(graph, model, root)
    _rewrite_ops(graph)
    for node in graph.nodes:
        if node.op == "call_module":
            root[node.target] = model.get_submodule(node.target)
    used = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    module = fx.GraphModule(
        {k: v for k, v in root.items() if k in used}, graph, type(model).__name__
    )
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.recompile()
    return module


def export(model: nn.Module, inputs: ModelInputs) -> ExportedProgram:
    """torch.export.export with the axes of ``_dynamic_dims`` dynamic (``Dim.AUTO``)."""
    names = list(inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs).arguments)
    values = [*inputs.args, *inputs.kwargs.values()]
    shapes = {
        name: pytree.tree_map(_dynamic_dims, value)
        for name, value in zip(names, values, strict=True)
    }
    try:
        with _quiet(QUIET_LOGGERS):
            return torch.export.export(
                model, tuple(inputs.args), dict(inputs.kwargs), dynamic_shapes=shapes,
                strict=False,
            )  # fmt: skip
    except Exception as error:  # torch.export and model code raise anything: one error type
        raise ExportError(f"{type(error).__name__}: {error}") from error


# torch.export logs a failed capture (the whole graph so far) before it raises; the error
# graphmerge raises says what failed.
QUIET_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the graph dump of a failure
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _dynamic_dims(value: Any) -> Any:
    """The batch axis is dynamic; so are the other axes of integer tensors (token ids and
    masks: batches of text differ in length). Images keep their size: symbolic spatial
    sizes cost torch.export minutes on models that cut them into patches."""
    if not isinstance(value, Tensor):
        return None
    if value.is_floating_point() or value.is_complex():
        return {0: Dim.AUTO} if value.dim() else {}
    return {axis: Dim.AUTO for axis in range(value.dim())}


def _plain_graph(program: ExportedProgram, model: nn.Module) -> tuple[fx.Graph, dict]:
    """The program's graph with its lifted parameters, buffers and constants as get_attr
    nodes (state_dict names) and only the user's outputs; plus the tensors they name."""
    specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs}
    graph, env, root = fx.Graph(), {}, {}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind is InputKind.USER_INPUT:
                env[node] = graph.placeholder(node.name)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                root[spec.target] = tensors[spec.target]
                env[node] = graph.get_attr(spec.target)
            elif spec.kind is InputKind.CONSTANT_TENSOR:
                name = f"_constant_{len(root)}"
                root[name] = program.constants[spec.target]
                env[node] = graph.get_attr(name)
            else:
                raise ExportError(f"input {node.name} of kind {spec.kind.name} is not supported")
            env[node].meta = dict(node.meta)
        elif node.op == "output":
            user = {
                spec.arg.name
                for spec in program.graph_signature.output_specs
                if spec.kind is OutputKind.USER_OUTPUT
            }
            leaves = [env[n] for n in node.args[0] if isinstance(n, fx.Node) and n.name in user]
            graph.output(tuple(leaves))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return graph, root


# -- layers ---------------------------------------------------------------------------------
def _kept_whole(module: nn.Module) -> bool:
    """Whether torch.fx's tracer would keep ``module`` as one call with a rule."""
    if rule_for(module) is None or traced_through(module, {}) is not None:
        return False
    standard = type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))
    return traced_whole(module) or (standard and not isinstance(module, nn.Sequential))


def _layer_of(node: fx.Node, model: nn.Module) -> tuple[str, str] | None:
    """(call key, module path) of the outermost layer kept whole whose call made ``node``."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if path and _kept_whole(module):
            return key, path
    return None


def _collapse_layers(graph: fx.Graph, model: nn.Module, root: dict) -> None:
    """Each call of a layer kept whole, on one input tensor with one output, becomes a
    ``call_module`` node (calls that do not fit stay as their aten ops)."""
    calls: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            found = _layer_of(node, model)
            if found is not None:
                calls.setdefault(found[0], []).append(node)
                paths[found[0]] = found[1]
    order = {node: index for index, node in enumerate(graph.nodes)}
    for key, nodes in calls.items():
        layer = model.get_submodule(paths[key])
        own = {id(t) for t in (*layer.parameters(), *layer.buffers())}
        _collapse(graph, paths[key], nodes, order, own, root)


def _collapse(
    graph: fx.Graph, path: str, nodes: list[fx.Node], order: dict, own: set[int], root: dict
) -> None:
    members = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in members or arg in inputs or not isinstance(arg.meta.get("val"), Tensor):
                continue
            if arg.op == "get_attr" and id(root.get(arg.target)) in own:  # its own (or tied)
                continue
            inputs.append(arg)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return
    (output,) = outputs
    if not isinstance(output.meta.get("val"), Tensor) or order[inputs[0]] > order[output]:
        return
    with graph.inserting_before(output):
        call = graph.call_module(path, (inputs[0],))
    call.meta = dict(output.meta)
    order[call] = order[output]
    output.replace_all_uses_with(call)
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


# -- ops ------------------------------------------------------------------------------------
def _index(dim: int, ndim: int, item: Any) -> tuple:
    return (slice(None),) * (dim % ndim) + (item,)


def _slice(node: fx.Node) -> tuple[Callable, tuple]:
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1 :])[:5]
    return operator.getitem, (x, _index(dim, x.meta["val"].dim(), slice(start, end, step)))


def _select(node: fx.Node) -> tuple[Callable, tuple]:
    x, dim, index = node.args
    return operator.getitem, (x, _index(dim, x.meta["val"].dim(), index))


def _embedding(node: fx.Node) -> tuple[Callable, tuple]:
    return F.embedding, (node.args[1], node.args[0])


def _batch_norm(node: fx.Node) -> tuple[Callable, tuple]:
    x, weight, bias, mean, var, training, momentum, eps = node.args[:8]
    return F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps)


def _no_training_batch_norm(node: fx.Node) -> tuple[Callable, tuple]:
    x, weight, bias, mean, var, momentum, eps = node.args[:7]
    return F.batch_norm, (x, mean, var, weight, bias, False, momentum, eps)


def _dropped_last(function: Callable, keep: int) -> Callable[[fx.Node], tuple[Callable, tuple]]:
    return lambda node: (function, tuple(node.args[:keep]))


def _same(function: Callable) -> Callable[[fx.Node], tuple[Callable, tuple]]:
    return lambda node: (function, tuple(node.args))


# aten ops written as the torch function the vocabulary knows (their arguments differ, or
# the walker recognizes the function itself, as for the pools).
REWRITES: dict[Any, Callable[[fx.Node], tuple[Callable, tuple]]] = {
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.embedding.default: _embedding,
    aten.batch_norm.default: _batch_norm,
    aten.layer_norm.default: _dropped_last(F.layer_norm, 5),
    aten.group_norm.default: _dropped_last(F.group_norm, 5),
    aten.max_pool1d.default: _same(F.max_pool1d),
    aten.max_pool2d.default: _same(F.max_pool2d),
    aten.max_pool3d.default: _same(F.max_pool3d),
    aten.avg_pool1d.default: _same(F.avg_pool1d),
    aten.avg_pool2d.default: _same(F.avg_pool2d),
    aten.avg_pool3d.default: _same(F.avg_pool3d),
    aten.adaptive_avg_pool1d.default: _same(F.adaptive_avg_pool1d),
    aten.adaptive_avg_pool2d.default: _same(F.adaptive_avg_pool2d),
    aten.adaptive_avg_pool3d.default: _same(F.adaptive_avg_pool3d),
}
# Ops returning a tuple whose first item is the result (the others unused in eval mode).
FIRST_OF_TUPLE = {aten._native_batch_norm_legit_no_training.default: _no_training_batch_norm}


def _rewrite_ops(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in REWRITES and not node.kwargs:
            node.target, node.args = REWRITES[node.target](node)
        elif node.target in FIRST_OF_TUPLE and not node.kwargs:
            items = [user for user in node.users if user.target is operator.getitem]
            firsts = [user for user in items if user.args[1] == 0]
            if len(items) != len(node.users) or any(
                user.args[1] != 0 and user.users for user in items
            ):
                continue  # the statistics are read: leave the op (it freezes what it reads)
            with graph.inserting_before(node):
                function, args = FIRST_OF_TUPLE[node.target](node)
                plain = graph.call_function(function, args)
            plain.meta = dict(firsts[0].meta) if firsts else {}
            for user in firsts:
                user.replace_all_uses_with(plain)
