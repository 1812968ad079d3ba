"""Tracing: spaces found by union-find are exact (self-check) and frozen where unsafe."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE_MODELS, state_hash
from torch import nn

import graphmerge as gm
from graphmerge.graphs import GraphTraceError, randomize_statistics, trace
from graphmerge.graphs.model_graph import ModelGraph
from graphmerge.graphs.shapes import reshaped_axis
from graphmerge.models import reference_graph

# Coverage 1.0: every hidden space mergeable (grouped convolutions as structured spaces).
TORCHVISION_MODELS = [
    ("resnet18", 1.0),
    ("resnet50", 1.0),
    ("vgg11_bn", 1.0),
    ("densenet121", 1.0),
    ("mobilenet_v2", 1.0),
    ("efficientnet_b0", 1.0),
    ("googlenet", 1.0),
    ("squeezenet1_0", 1.0),
    ("regnet_x_400mf", 1.0),
    ("resnext50_32x4d", 1.0),
]


def relative_change(graph, model, x, trials=3):
    change = graph.check_symmetries(x, trials=trials)
    with torch.no_grad():
        scale = model.eval()(x).abs().max().item()
    return change / scale


@pytest.mark.parametrize(("name", "kwargs", "shape"), REFERENCE_MODELS)
def test_reference_models_trace_exactly_and_match_their_hand_written_graphs(name, kwargs, shape):
    model = randomize_statistics(gm.models.build(name, seed=0, **kwargs))
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x)
    assert relative_change(graph, model, x) < 1e-4
    assert graph.coverage == 1.0 and not graph.frozen_spaces
    hand = reference_graph(model)
    assert graph.same_spaces(hand)
    assert [s.name for s in graph.spaces] == [s.name for s in hand.spaces]
    assert [s.width for s in graph.spaces] == [s.width for s in hand.spaces]
    assert relative_change(hand, model, x) < 1e-4


@pytest.mark.parametrize(("name", "coverage"), TORCHVISION_MODELS)
def test_torchvision_models_trace_exactly(name, coverage):
    model = randomize_statistics(gm.models.build(f"torchvision:{name}", num_classes=10, seed=0))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x)
    assert relative_change(graph, model, x, trials=2) < 1e-4
    if coverage is not None:
        assert graph.coverage == coverage, graph.summary()
    else:
        assert 0 < graph.coverage < 0.5
        assert graph.frozen_spaces
        assert all("grouped convolution" in s.reason for s in graph.frozen_spaces)
    assert graph.spaces[0].role == "input" and graph.spaces[-1].role == "output"
    assert graph.spaces[-1].width == 10


def test_resnet_streams_are_single_spaces():
    model = gm.models.build("resnet20", seed=0)
    graph = trace(model, torch.randn(2, 3, 8, 8))
    stream = graph.space("conv1")
    assert stream.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    params = set(stream.params)
    assert {"norm1.running_var", "layer1.2.norm2.weight", "layer2.0.conv1.weight"} <= params
    assert "layer2.0.shortcut.0.weight" in params  # the 1x1 projection reads the stream
    stage2 = graph.space("layer2.0.conv2")
    assert "layer2.0.shortcut.0.weight" in stage2.params  # ... and writes the next one
    assert stream.merge_point == "add_2"  # pre-activation: the stream's last residual sum


def test_input_and_output_are_never_permuted():
    model = gm.models.build("mlp", hidden=(16,), seed=0)
    graph = trace(model, torch.randn(2, 64))
    first, last = graph.spaces[0], graph.spaces[-1]
    assert (first.name, first.role, first.frozen) == ("input", "input", True)
    assert (last.name, last.role, last.frozen, last.width) == ("output", "output", True, 10)
    assert {a.param for a in last.param_axes} == {"head.weight", "head.bias"}
    assert set(graph.random_permutations()) == {"layers.fc1"}
    with pytest.raises(ValueError, match="not mergeable"):
        graph.permute({"output": torch.arange(10)})


def test_tracing_never_changes_the_model():
    model = gm.models.build("resnet20", seed=0).train()
    before = state_hash(model)
    trace(model, torch.randn(4, 3, 8, 8))
    assert state_hash(model) == before  # BN running stats untouched by the example pass
    assert model.training and all(m.training for m in model.modules())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_suggests_graph_builder():
    with pytest.raises(GraphTraceError, match="GraphBuilder") as error:
        trace(DataDependent(), torch.randn(2, 4))
    assert "DataDependent" in str(error.value)


def test_example_input_of_the_wrong_shape_is_explained():
    model = gm.models.build("resnet20", seed=0)
    with pytest.raises(ValueError, match=r"example input \(2, 1, 8, 8\) does not fit ResNet20"):
        trace(model, torch.randn(2, 1, 8, 8))


# -- single operations ------------------------------------------------------------------------
def traced(model, *shape, generator_seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(generator_seed))
    model = randomize_statistics(model)
    graph = trace(model, x)
    return graph, relative_change(graph, model, x)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.conv2(x).mean((2, 3))


def test_channel_shuffle_is_frozen_with_its_reason():
    graph, change = traced(Shuffle(), 2, 3, 6, 6)
    assert change < 1e-6
    conv1 = graph.space("conv1")
    assert conv1.frozen and "channel shuffle" in conv1.reason
    assert graph.coverage == 0.0
    assert "frozen conv1" in graph.summary()


class Grouped(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.bn(self.conv2(F.relu(self.conv1(x)))))).flatten(1)


def test_grouped_convolution_structures_both_sides_with_one_group_index():
    graph, change = traced(Grouped(groups=2), 2, 3, 4, 4)
    assert change < 1e-6 and graph.coverage == 1.0
    groups = graph.space("conv2.groups")
    assert groups.role == "blocks" and groups.width == 2
    assert graph.space("conv1").blocks == graph.space("conv2").blocks == "conv2.groups"
    (read,) = [a for a in graph.space("conv1").param_axes if a.param == "conv2.weight"]
    assert (read.axis, read.role, read.groups, read.block_width, read.size) == (1, "in", 2, 4, 4)
    unstructured = dataclasses.replace
    wrong = ModelGraph(
        graph.model, graph.graph,
        [unstructured(s, blocks="") for s in graph.spaces if s.role != "blocks"],
        graph.concatenations, source="traced", module=graph.module,
    )  # fmt: skip
    assert wrong.check_symmetries(torch.randn(2, 3, 4, 4), relative=True) > 1e-2  # across groups
    graph, change = traced(Grouped(groups=8), 2, 3, 4, 4)
    assert change < 1e-6 and graph.coverage == 1.0
    space = graph.space("conv1")  # depthwise conv and its BN stay in conv1's space
    assert {"conv2.weight", "conv2.bias", "bn.running_mean", "conv3.weight"} <= set(space.params)


class GroupNormNet(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.conv1, self.norm, self.conv2 = (
            nn.Conv2d(3, 8, 1),
            nn.GroupNorm(groups, 8),
            nn.Conv2d(8, 2, 1),
        )

    def forward(self, x):
        return self.conv2(F.gelu(self.norm(self.conv1(x))))


@pytest.mark.parametrize(("groups", "structured"), [(1, False), (2, True), (8, False)])
def test_group_norm_structures_channels_only_when_groups_would_mix(groups, structured):
    graph, change = traced(GroupNormNet(groups), 2, 3, 4, 4)
    assert change < 1e-5
    space = graph.space("conv1")
    assert space.mergeable and graph.coverage == 1.0
    assert space.blocks == ("norm.groups" if structured else "")
    assert "norm.weight" in space.params


class NestedGroups(nn.Module):
    """Blocks of 4 (conv2's groups) and of 2 (GroupNorm(4)) in one space."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.norm = nn.GroupNorm(4, 8)
        self.conv3 = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.norm(self.conv2(F.relu(self.conv1(x)))))).flatten(1)


def test_blocks_of_two_sizes_in_one_space_freeze_it_and_what_shares_its_blocks():
    graph, change = traced(NestedGroups(), 2, 3, 4, 4)
    assert change < 1e-6
    assert "blocks of [2, 4] sizes" in graph.space("conv2").reason
    assert "its blocks are frozen" in graph.space("conv1").reason  # shares conv2's groups


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        x = self.norm(self.embed(tokens))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(dim=1))


def test_embeddings_layer_norm_and_residual_mlp():
    model = randomize_statistics(Tokens())
    tokens = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    graph = trace(model, tokens)
    assert relative_change(graph, model, tokens) < 1e-5
    stream = graph.space("embed")
    assert {"embed.weight", "norm.weight", "fc1.weight", "fc2.bias", "head.weight"} <= set(
        stream.params
    )
    assert [a.axis for a in stream.param_axes if a.param == "embed.weight"] == [1]
    assert graph.space("fc1").width == 32 and graph.coverage == 1.0


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.head = nn.Linear(10 * 2 * 2, 5)

    def forward(self, x):
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        x = F.max_pool2d(self.bn(x), 2)
        return self.head(x.view(x.size(0), -1))


def test_concatenation_blocks_and_flatten_repeats():
    graph, change = traced(Concat(), 2, 3, 4, 4)
    assert change < 1e-5 and graph.coverage == 1.0
    (cat,) = graph.concatenations
    assert [(b.space, b.offset, b.width) for b in cat.blocks] == [("a", 0, 4), ("b", 4, 6)]
    head = {a.param: a for a in graph.space("b").param_axes if a.param == "head.weight"}
    axis = head["head.weight"]
    assert (axis.axis, axis.role, axis.offset, axis.width, axis.repeat) == (1, "in", 16, 6, 4)
    bn = [a for a in graph.space("a").param_axes if a.param == "bn.running_var"]
    assert [(a.offset, a.width) for a in bn] == [(0, 4)]


class Gated(nn.Module):
    """Squeeze-and-excitation, a layer-scale parameter, channel-last LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze, self.excite = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.gamma = nn.Parameter(torch.randn(8, 1, 1))
        self.ln_weight, self.ln_bias = (
            nn.Parameter(torch.rand(8) + 0.5),
            nn.Parameter(torch.randn(8)),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.silu(self.conv(x))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = self.gamma * (x * gate)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,), self.ln_weight, self.ln_bias)
        return self.head(x.permute(0, 3, 1, 2).amax(dim=(2, 3)))


def test_gating_layer_scale_and_functional_layer_norm():
    graph, change = traced(Gated(), 2, 3, 5, 5)
    assert change < 1e-5 and graph.coverage == 1.0
    space = graph.space("conv")
    assert {"excite.weight", "gamma", "ln_weight", "ln_bias", "squeeze.weight"} <= set(space.params)
    assert graph.space("squeeze").width == 2


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = torch.cumsum(F.relu(self.conv1(x)), dim=1)  # order-dependent along channels
        return self.head(F.relu(self.conv2(x))).sum((2, 3))


def test_unknown_operation_freezes_what_it_touches_and_nothing_else():
    graph, change = traced(Unknown(), 2, 3, 3, 3)
    assert change < 1e-5
    conv1 = graph.space("conv1")
    assert conv1.frozen and "unknown operation cumsum" in conv1.reason
    assert graph.space("conv2").mergeable  # downstream of the unknown op, but its own space
    read = graph.space("conv2.input")  # what conv2 reads: the unknown op's output, frozen
    assert read.frozen and "reads unknown operation cumsum" in read.reason
    assert [a.param for a in read.param_axes] == ["conv2.weight"]
    assert graph.coverage == pytest.approx(1 / 3)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.head = (
            nn.Conv1d(2, 5, 1),
            nn.Conv1d(5, 5, 3, padding=1),
            nn.Linear(5, 3),
        )

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv(F.relu(self.conv(x))))  # the same layer twice
        return self.head(x.mean(-1))


def test_a_layer_called_twice_ties_its_input_and_output_spaces():
    graph, change = traced(Shared(), 2, 2, 9)
    assert change < 1e-5
    assert [s.name for s in graph.spaces] == ["input", "stem", "output"]


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.alias = self.fc1  # one module under two names: two state_dict keys, one tensor
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.alias(x)))


def test_modules_reachable_under_two_names_are_permuted_consistently():
    graph, change = traced(SharedModule(), 3, 4)
    assert change < 1e-6
    permuted = graph.permute(graph.random_permutations(seed=1))
    state = permuted.state_dict()
    assert torch.equal(state["fc1.weight"], state["alias.weight"])
    assert not torch.equal(state["fc1.weight"], graph.model.state_dict()["fc1.weight"])


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "axis", "expected"),
    [
        ((2, 8, 3, 3), (2, 72), 1, (1, 9, "")),
        ((2, 8, 1, 1), (2, 8), 1, (1, 1, "")),
        (
            (2, 3, 3, 8),
            (2, 72),
            3,
            (0, 1, "flattens other dims in front of the channels (channel-last flatten)"),
        ),
        ((2, 8, 4), (2, 2, 4, 4), 1, (0, 1, "splits the channel axis (as a channel shuffle does)")),
        ((6, 8, 4), (2, 3, 8, 4), 1, (2, 1, "")),
        ((2, 8), (2, 8, 1, 1), 1, (1, 1, "")),
    ],
)
def test_reshaped_axis(in_shape, out_shape, axis, expected):
    assert reshaped_axis(in_shape, out_shape, axis) == expected


class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.left, self.right = (
            nn.Conv2d(3, 8, 1),
            nn.Conv2d(4, 2, 1),
            nn.Conv2d(4, 2, 1),
        )

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return (self.left(a) + self.right(b)).mean((2, 3))


def test_a_chunk_inside_a_space_refines_it_into_its_pieces():
    graph, change = traced(Chunked(), 2, 3, 4, 4)
    assert change < 1e-6 and graph.coverage == 1.0
    halves = [s for s in graph.mergeable_spaces if "conv.weight" in s.params]
    assert [s.width for s in halves] == [4, 4]
    assert "left.weight" in halves[0].params and "right.weight" in halves[1].params
