"""GraphBuilder: hand-written graphs are checked against the real model."""

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.graphs import GraphBuilder, GraphTraceError, randomize_statistics, trace


class Gated(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, GraphBuilder can describe it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.right = nn.Conv2d(8, 4, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        if torch.isnan(x).any():  # data-dependent control flow
            raise FloatingPointError("NaN features")
        x = self.relu(self.left(x) + x)
        x = torch.cat([x, self.right(x)], dim=1)
        return self.head(self.pool(x).flatten(1))


def gated_graph(model, residual=True):
    b = GraphBuilder(model)
    x = b.add_sequence(b.add_input(), "stem")
    branch = b.add_sequence(x, "left")
    x = b.add_sum(branch, x) if residual else branch
    x = b.add_module(x, "relu")
    b.add_merge(x, name="stream")
    x = b.add_concat(x, b.add_module(x, "right"))
    x = b.add_sequence(x, "pool")
    x = b.add_flatten(x, repeat=1)
    b.add_output(b.add_module(x, "head"))
    return b.build()


def test_graph_builder_describes_an_untraceable_model_exactly():
    model = randomize_statistics(Gated())
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(GraphTraceError):
        trace(model, x)
    graph = gated_graph(model)
    assert graph.source == "built"
    assert [s.name for s in graph.spaces] == ["input", "stream", "right", "output"]
    stream = graph.space("stream")
    assert stream.merge_point == "relu"
    assert {"stem.0.weight", "stem.1.running_var", "left.0.weight", "left.1.bias"} <= set(
        stream.params
    )
    (cat,) = graph.concatenations
    assert [(b.space, b.offset, b.width) for b in cat.blocks] == [("stream", 0, 8), ("right", 8, 4)]
    with torch.no_grad():
        scale = model.eval()(x).abs().max().item()
    assert graph.check_symmetries(x) / scale < 1e-5


def test_a_residual_stream_split_in_two_spaces_is_caught_by_the_check():
    model = randomize_statistics(Gated())
    x = torch.randn(4, 3, 6, 6)
    broken = gated_graph(model, residual=False)  # forgot the add: the stream is split
    assert [s.name for s in broken.spaces] == ["input", "stem.0", "stream", "right", "output"]
    with torch.no_grad():
        scale = model.eval()(x).abs().max().item()
    assert broken.check_symmetries(x) / scale > 1e-2


def test_broken_hand_written_resnet_is_detected():
    model = randomize_statistics(gm.models.build("resnet20", seed=0))
    x = torch.randn(4, 3, 8, 8)
    b = GraphBuilder(model)
    x_node = b.add_sequence(b.add_input(), "conv1", "norm1", "relu1")
    for stage in ("layer1", "layer2", "layer3"):
        for index in range(3):
            path = f"{stage}.{index}"
            layers = ("conv1", "norm1", "relu1", "conv2", "norm2")
            h = b.add_sequence(x_node, *(f"{path}.{name}" for name in layers))
            s = b.add_sequence(x_node, f"{path}.shortcut")
            # the mistake: layer2.1 treats its residual branch as a plain chain
            joined = h if path == "layer2.1" else b.add_sum(h, s, name=f"{path}.add")
            x_node = b.add_module(joined, f"{path}.relu2")
    b.add_output(b.add_sequence(x_node, "avgpool", "flatten", "fc"))
    broken = b.build()
    good = gm.models.resnet20_graph(model)
    assert not broken.same_spaces(good)
    assert len(broken.spaces) == len(good.spaces) + 1
    with torch.no_grad():
        scale = model.eval()(x).abs().max().item()
    assert good.check_symmetries(x) / scale < 1e-4
    assert broken.check_symmetries(x) / scale > 1e-2


def test_builder_errors_are_specific():
    model = Gated()
    b = GraphBuilder(model)
    x = b.add_input()
    with pytest.raises(KeyError, match="no module 'lfet'"):
        b.add_module(x, "lfet")
    with pytest.raises(KeyError, match="no node 'nowhere'"):
        b.add_module("nowhere", "stem")
    y = b.add_sequence(x, "stem")
    z = b.add_concat(y, b.add_module(y, "right"))
    with pytest.raises(ValueError, match="exactly one space"):
        b.add_merge(z)
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        b.add_flatten(y, repeat=0)
    with pytest.raises(ValueError, match="no output"):
        b.build()


def test_a_width_mistake_freezes_instead_of_guessing():
    model = Gated()
    b = GraphBuilder(model)
    x = b.add_sequence(b.add_input(), "stem", "left", "relu", "pool")
    x = b.add_flatten(x)
    b.add_output(b.add_module(x, "head"))  # head expects 12 features, the graph gives 8
    graph = b.build()
    frozen = {s.name: s.reason for s in graph.frozen_spaces}
    assert any("head expects 12 channels but its input has 8" in r for r in frozen.values())


def test_non_elementwise_function_freezes_its_input():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    b = GraphBuilder(model)
    x = b.add_module(b.add_input(), "0")
    x = b.add_function(x, "sort", elementwise=False)
    b.add_output(b.add_module(x, "1"))
    graph = b.build()
    assert graph.space("0").frozen and "sort mixes channels" in graph.space("0").reason


def test_product_joins_spaces():
    class Glu(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.a(x) * torch.sigmoid(self.b(x)))

    model = Glu()
    b = GraphBuilder(model)
    x = b.add_input()
    gate = b.add_function(b.add_module(x, "b"), "sigmoid")
    y = b.add_product(b.add_module(x, "a"), gate)
    b.add_output(b.add_module(y, "out"))
    graph = b.build()
    assert [s.name for s in graph.spaces] == ["input", "b", "output"]  # first writer names it
    assert graph.same_spaces(trace(model, torch.randn(2, 4)))
    assert graph.check_symmetries(torch.randn(3, 4)) < 1e-6
