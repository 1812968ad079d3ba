"""GraphBuilder: write a model's graph by hand, for models torch.fx cannot trace.

You list the model's layers in the order data flows through them, join branches
with ``add_sum`` / ``add_concat``, and optionally mark where a space's features
are read (``add_merge``). Spaces then follow from the same rules the tracer
uses, and ``check_symmetries`` proves the result against the real model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from graphmerge.fold import tensor_aliases
from graphmerge.graphs.layers import DEFAULT_RULE, LayerCall, apply_layer, rule_for
from graphmerge.graphs.model_graph import GraphRecorder, ModelGraph, NodeKind
from graphmerge.graphs.operations import PRODUCT, SUM, category
from graphmerge.graphs.spaces import Channels, SpaceFinder, Unknown, Value


class GraphBuilder:
    """Build a :class:`ModelGraph` by hand. Every ``add_*`` returns the new node's name.

    Example (a residual block; module paths are those of ``model.named_modules()``):
        >>> b = GraphBuilder(model)
        >>> x = b.add_input()
        >>> x = b.add_sequence(x, "conv1", "norm1", "relu1")
        >>> h = b.add_sequence(x, "block.conv1", "block.norm1", "block.relu1",
        ...                    "block.conv2", "block.norm2")
        >>> x = b.add_sum(h, x)                      # the residual stream stays ONE space
        >>> x = b.add_sequence(x, "block.relu2")
        >>> b.add_merge(x, name="stream")            # read the stream's features here
        >>> x = b.add_sequence(x, "avgpool", "flatten", "fc")
        >>> b.add_output(x)
        >>> graph = b.build()
        >>> graph.check_symmetries(example_input)    # ~1e-7 when the graph is right
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._modules = dict(model.named_modules())
        self._finder = SpaceFinder(tensor_aliases(model))
        self._recorder = GraphRecorder(self._finder)
        self._values: dict[str, Value] = {}
        self._counts: dict[str, int] = {}
        self._has_output = False

    # -- nodes -------------------------------------------------------------------------------
    def add_input(self, name: str = "input") -> str:
        """The model input (shared by all models, never permuted)."""
        return self._add(name, NodeKind.INPUT, "input", [], self._finder.input_channels(0))

    def add_module(self, source: str | Sequence[str], path: str) -> str:
        """Call the layer at ``path`` on the output of node ``source`` (a list of nodes for a
        layer that reads several tensors, in the order of its ``forward``)."""
        module = self._module(path)
        sources = [source] if isinstance(source, str) else list(source)
        inputs = [self._value(s) for s in sources]
        call = LayerCall(self._finder, module, path, inputs, [None] * len(inputs))
        value = apply_layer(call)
        category = (rule_for(module) or DEFAULT_RULE).category
        return self._add(path, NodeKind.MODULE, path, sources, value, category)

    def add_sequence(self, source: str, *paths: str) -> str:
        """Call layers one after another; an ``nn.Sequential`` path stands for its children."""
        for path in paths:
            for leaf in self._expand(path):
                source = self.add_module(source, leaf)
        return source

    def add_sum(self, *sources: str, name: str = "add") -> str:
        """Elementwise sum (a residual connection): the summands' spaces become one."""
        value = self._finder.join([self._value(s) for s in sources], name)
        return self._add(name, NodeKind.FUNCTION, SUM, list(sources), value, category(SUM))

    def add_product(self, *sources: str, name: str = "mul") -> str:
        """Elementwise product (gating, squeeze-and-excitation): the factors' spaces become one."""
        value = self._finder.join([self._value(s) for s in sources], name)
        return self._add(name, NodeKind.FUNCTION, PRODUCT, list(sources), value)

    def add_concat(self, *sources: str, name: str = "cat") -> str:
        """Concatenation along channels: a block-structured tensor of the sources' spaces."""
        values = [self._value(s) for s in sources]
        if all(isinstance(v, Channels) for v in values):
            value: Value = self._finder.concatenate(values, None)
        else:
            reason = f"{name} concatenates tensors of unknown channels"
            for v in values:
                self._finder.freeze_value(v, reason)
            value = Unknown(reason)
        key = self._add(name, NodeKind.FUNCTION, "cat", list(sources), value)
        if isinstance(value, Channels):
            self._recorder.concatenation(key, value)
        return key

    def add_flatten(self, source: str, repeat: int = 1, name: str = "flatten") -> str:
        """Flatten C x H x W maps into vectors: every channel repeats ``repeat`` = H*W times."""
        value = self._value(source)
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1 (the number of spatial positions), got {repeat}")
        if isinstance(value, Channels):
            value = value.repeated(repeat)
        return self._add(name, NodeKind.FUNCTION, "flatten", [source], value)

    def add_function(self, source: str, name: str, elementwise: bool = True) -> str:
        """A parameter-free op. ``elementwise=False`` (it mixes channels) freezes its input."""
        value = self._value(source)
        if not elementwise:
            reason = f"{name} mixes channels"
            self._finder.freeze_value(value, f"read by {reason}")
            value = Unknown(reason)
        return self._add(name, NodeKind.FUNCTION, name, [source], value, "")

    def add_merge(self, source: str, name: str | None = None) -> str:
        """Read the features of ``source``'s space at this node (and name the space)."""
        value = self._value(source)
        if not isinstance(value, Channels) or len(value.segments) != 1:
            raise ValueError(
                f"add_merge({source!r}): a merge point must carry exactly one space "
                "(not a concatenation or an unknown tensor)"
            )
        self._recorder.declare(source, value, name)
        return source

    def add_output(self, source: str, name: str = "output") -> str:
        """The model output (logits: averaged or concatenated, never permuted)."""
        value = self._value(source)
        if isinstance(value, Channels):
            for segment in value.segments:
                self._finder.union(segment.element, self._finder.output_element)
        self._has_output = True
        return self._add(name, NodeKind.OUTPUT, "output", [source], None)

    def build(self) -> ModelGraph:
        """The finished ModelGraph (check it with ``check_symmetries``)."""
        if not self._has_output:
            raise ValueError("the graph has no output: call add_output(node) before build()")
        return self._recorder.finish(self.model, source="built")

    # -- helpers -----------------------------------------------------------------------------
    def _add(
        self,
        name: str,
        kind: NodeKind,
        target: str,
        inputs: list[str],
        value: Value,
        category: str = "",
    ) -> str:
        count = self._counts.get(name, 0)
        self._counts[name] = count + 1
        key = name if count == 0 else f"{name}_{count}"
        self._values[key] = value
        self._recorder.add_node(
            key, kind, target=target, inputs=inputs, value=value, category=category
        )
        return key

    def _value(self, node: str) -> Value:
        if node not in self._values:
            known = ", ".join(list(self._values)[-5:])
            raise KeyError(f"no node {node!r} in the graph yet (latest: {known})")
        return self._values[node]

    def _module(self, path: str) -> nn.Module:
        if path not in self._modules:
            raise KeyError(
                f"{type(self.model).__name__} has no module {path!r}; "
                "paths are those of model.named_modules()"
            )
        return self._modules[path]

    def _expand(self, path: str) -> list[str]:
        module = self._module(path)
        if not isinstance(module, nn.Sequential):
            return [path]
        prefix = f"{path}." if path else ""
        return [leaf for name, _ in module.named_children() for leaf in self._expand(prefix + name)]
