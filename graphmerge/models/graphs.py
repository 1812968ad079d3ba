"""Hand-written graphs of graphmerge's reference models, built with GraphBuilder.

They double as worked examples of GraphBuilder, and the tests check that the
tracer finds exactly the same spaces in the same models.
"""

from __future__ import annotations

from torch import nn

from graphmerge.graphs import GraphBuilder, ModelGraph
from graphmerge.models.mlp import MLP
from graphmerge.models.resnet import ResNet20
from graphmerge.models.vgg import VGG


def mlp_graph(model: MLP) -> ModelGraph:
    """flatten -> (fc, [norm], relu) x depth -> head; one space per hidden layer."""
    builder = GraphBuilder(model)
    x = builder.add_sequence(builder.add_input(), "layers.flatten")
    for name, _ in model.layers.named_children():
        if name != "flatten":
            x = builder.add_module(x, f"layers.{name}")
    builder.add_output(builder.add_module(x, "head"))
    return builder.build()


def vgg_graph(model: VGG) -> ModelGraph:
    """Conv stages, global average pool, flatten (1 x 1 maps: repeat 1), linear classifier."""
    builder = GraphBuilder(model)
    x = builder.add_sequence(builder.add_input(), "features", "avgpool")
    x = builder.add_flatten(x, repeat=1)
    builder.add_output(builder.add_module(x, "classifier"))
    return builder.build()


def _basic_block(builder: GraphBuilder, x: str, path: str) -> str:
    residual = builder.add_sequence(
        x, f"{path}.conv1", f"{path}.norm1", f"{path}.relu1", f"{path}.conv2", f"{path}.norm2"
    )
    shortcut = builder.add_sequence(x, f"{path}.shortcut")
    stream = builder.add_sum(residual, shortcut, name=f"{path}.add")
    return builder.add_module(stream, f"{path}.relu2")


def resnet20_graph(model: ResNet20) -> ModelGraph:
    """Stem, three stages of BasicBlocks whose adds keep each stage's stream one space, head."""
    builder = GraphBuilder(model)
    x = builder.add_sequence(builder.add_input(), "conv1", "norm1", "relu1")
    for stage in ("layer1", "layer2", "layer3"):
        for index in range(len(getattr(model, stage))):
            x = _basic_block(builder, x, f"{stage}.{index}")
    builder.add_output(builder.add_sequence(x, "avgpool", "flatten", "fc"))
    return builder.build()


def reference_graph(model: nn.Module) -> ModelGraph:
    """The hand-written graph of a graphmerge reference model (MLP, VGG or ResNet20)."""
    for kind, builder in ((MLP, mlp_graph), (VGG, vgg_graph), (ResNet20, resnet20_graph)):
        if isinstance(model, kind):
            return builder(model)
    raise ValueError(
        f"no hand-written graph for {type(model).__name__}; use graphmerge.graphs.trace "
        "or build one with GraphBuilder"
    )
