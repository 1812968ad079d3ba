"""Model graphs: networkx computation graphs of models, with their spaces.

A *space* is a set of channel axes that must always be transformed together
(a conv's output channels, everything elementwise after it, everything joined
to it by a residual add). ``trace`` finds them automatically with torch.fx;
``GraphBuilder`` builds a graph by hand; ``ModelGraph.check_symmetries`` proves
either kind exact by permuting every space at random. What graphmerge knows about each
layer type is its rule (``LayerRule``); ``register_layer`` adds one for your own layer, and
``register_function`` one for a function torch.fx keeps whole (``torch.fx.wrap``).

Example:
    >>> import torch, graphmerge as gm
    >>> model = gm.models.build("mlp", hidden=(64, 64), seed=0)
    >>> graph = gm.graphs.trace(model, torch.randn(4, 64))
    >>> [(s.name, s.width) for s in graph.spaces]
    [('input', 64), ('layers.fc1', 64), ('layers.fc2', 64), ('output', 10)]
"""

from graphmerge.graphs.builder import GraphBuilder
from graphmerge.graphs.layers import (
    FunctionCall,
    FunctionRule,
    LayerCall,
    LayerRule,
    NormRule,
    register_function,
    register_layer,
    rule_for,
)
from graphmerge.graphs.model_graph import ModelGraph
from graphmerge.graphs.nodes import GraphNode, NodeKind
from graphmerge.graphs.randomize import randomize_statistics
from graphmerge.graphs.spaces import Block, Concatenation, ParamAxis, Space
from graphmerge.graphs.trace import GraphTraceError, check_plain_model, trace

__all__ = [
    "Block",
    "Concatenation",
    "FunctionCall",
    "FunctionRule",
    "GraphBuilder",
    "GraphNode",
    "GraphTraceError",
    "LayerCall",
    "LayerRule",
    "ModelGraph",
    "NodeKind",
    "NormRule",
    "ParamAxis",
    "Space",
    "check_plain_model",
    "randomize_statistics",
    "register_function",
    "register_layer",
    "rule_for",
    "trace",
]
