"""Tracer rules for token axes and functional layers: class tokens concatenated along the
tokens, ``x[:, 0]``, channel slices and splits at space boundaries, F.batch_norm /
F.group_norm / F.instance_norm, addcmul, F.pad. Each is exact after randomizing every
parameter, and switching its rule off makes the self-check fail."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphmerge.graphs import randomize_statistics, trace
from graphmerge.graphs.spaces import Channels
from graphmerge.graphs.trace import _Walker


def relative(model, x):
    model = randomize_statistics(model).eval()
    graph = trace(model, x)
    return graph, graph.check_symmetries(x, relative=True)


class ClassToken(nn.Module):
    """Patch tokens with a class token and a position table; reads the class token."""

    def __init__(self, width=8, tokens=4):
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, tokens + 1, width))
        self.mlp, self.head = nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        x = x + torch.relu(self.mlp(x))
        return self.head(x[:, 0])


def test_a_class_token_joins_the_stream_and_the_first_token_is_read():
    graph, change = relative(ClassToken(), torch.randn(3, 4, 6))
    assert change < 1e-5 and graph.coverage == 1.0, graph.summary()
    assert {"token", "position", "embed.weight", "head.weight"} <= set(graph.space("embed").params)


def test_without_the_class_token_rule_the_check_fails(monkeypatch):
    def blind(self, node):  # the class token left out of the stream
        values = [self._value(t) for t in node.args[0]]
        return self.finder.join([v for v in values if isinstance(v, Channels)], node.name)

    monkeypatch.setattr(_Walker, "_cat", blind)
    _, change = relative(ClassToken(), torch.randn(3, 4, 6))
    assert change > 1e-3


class Indexed(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index = index
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.conv(x)[self.index].flatten(1).mean(1, keepdim=True).expand(-1, 8))


def test_indexing_a_single_channel_freezes_the_space_a_slice_refines_it():
    graph = trace(Indexed((slice(None), 0)), torch.randn(2, 3, 4, 4))
    assert "selects a single channel" in graph.space("conv").reason
    model = randomize_statistics(Indexed((slice(None), slice(0, 4))))
    x = torch.randn(2, 3, 4, 4)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) < 1e-6
    parts = [s for s in graph.spaces if s.role == "hidden" and "conv.weight" in s.params]
    assert [s.width for s in parts] == [4, 4]  # the part kept and the part dropped
    assert "slices channels inside a space" not in graph.summary()


class Pieces(nn.Module):
    """Two spaces side by side, then taken apart again by a slice or a split."""

    def __init__(self, split):
        super().__init__()
        self.split = split
        self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.gate = nn.Parameter(torch.ones(6, 1, 1))
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        both = torch.cat([self.left(x), self.right(x)], dim=1)
        if self.split == "slice":
            left, right = both[:, :4], both[:, 4:]
        else:
            left, right = both.split([4, 6], dim=1)
        rows, columns = right.chunk(2, dim=2)  # along a spatial axis: channels kept
        right = torch.cat([rows, columns], dim=2) * self.gate
        return self.head(torch.cat([left, right], dim=1).mean((2, 3)))


@pytest.mark.parametrize("split", ["slice", "split"])
def test_slices_and_splits_at_space_boundaries_are_followed(split):
    graph, change = relative(Pieces(split), torch.randn(2, 3, 4, 4))
    assert change < 1e-5 and graph.coverage == 1.0, graph.summary()
    assert "gate" in graph.space("right").params


class FunctionalNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        for name in ("bn", "gn", "inorm"):
            self.register_parameter(f"{name}_weight", nn.Parameter(torch.ones(8)))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(8)))
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.pad(self.conv(x), (1, 1, 1, 1))
        x = F.batch_norm(x, self.mean, self.var, self.bn_weight, self.bn_bias, False)
        x = F.group_norm(x, 1, self.gn_weight, self.gn_bias)
        x = F.instance_norm(x, weight=self.inorm_weight, bias=self.inorm_bias)
        x = torch.addcmul(self.bn_bias.view(1, -1, 1, 1), self.scale, torch.relu(x))
        return self.head(x.mean((2, 3)))


def test_functional_norms_addcmul_and_pad_join_the_channels():
    graph, change = relative(FunctionalNorms(), torch.randn(2, 3, 5, 5))
    assert change < 1e-5 and graph.coverage == 1.0, graph.summary()
    assert {"mean", "var", "gn_weight", "inorm_bias", "scale"} <= set(graph.space("conv").params)


def test_without_the_functional_norm_rule_the_check_fails(monkeypatch):
    monkeypatch.setattr(_Walker, "_functional_norm", lambda self, node, name, value: value)
    _, change = relative(FunctionalNorms(), torch.randn(2, 3, 5, 5))
    assert change > 1e-3


def test_group_norm_with_groups_and_padding_channels_freeze():
    class Grouped(nn.Module):
        def __init__(self, padding):
            super().__init__()
            self.padding, self.conv = padding, nn.Conv2d(3, 8, 1)

        def forward(self, x):
            x = self.conv(x)
            return F.pad(x, self.padding) if self.padding else F.group_norm(x, 2)

    assert (
        "group_norm with 2 groups" in trace(Grouped(None), torch.randn(2, 3, 4, 4)).space(1).reason
    )
    padded = trace(Grouped((0, 0, 0, 0, 1, 1)), torch.randn(2, 3, 4, 4))
    assert "pads the channel axis" in padded.space("conv").reason
