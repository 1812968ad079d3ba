"""Layer rules: the registry, a rule for a user's own layer in one call, several inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphmerge as gm
from graphmerge.graphs import LayerRule, randomize_statistics, register_layer, rule_for, trace
from graphmerge.graphs.layers import registry
from graphmerge.graphs.layers.dense import ConvolutionRule, LinearRule
from graphmerge.graphs.layers.elementwise import IdentityRule
from graphmerge.graphs.layers.norms import BatchNormRule
from graphmerge.models.layers import LayerNorm2d, LayerNorm2dRule


@pytest.fixture
def rules(monkeypatch):
    """The registry as it is, restored after the test (registrations are global)."""
    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))


class Gated(nn.Module):
    """y = (W x + b) * sigmoid(G x): a gated linear unit with its own weights."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.gate = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * torch.sigmoid(F.linear(x, self.gate))


def gated_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Gated(12, 16), nn.ReLU(), Gated(16, 16), nn.ReLU(), nn.Linear(16, 3))


def register_gated():
    @register_layer(Gated)
    class GatedRule(LayerRule):
        category = "producer"

        def channels(self, call):
            last = None if call.in_ndim is None else call.in_ndim - 1
            call.read("weight", 1, call.layer.in_features, expected_axis=last)
            call.read("gate", 1, call.layer.in_features, expected_axis=last)
            return call.write(call.layer.out_features, last, ("weight", 0), ("gate", 0))

        def resize(self, layer, path):
            layer.out_features, layer.in_features = layer.weight.shape

    return GatedRule


def test_built_in_layers_find_their_rules():
    assert isinstance(rule_for(nn.Linear(2, 3)), LinearRule)
    assert isinstance(rule_for(nn.Conv1d(2, 3, 1)), ConvolutionRule)
    assert isinstance(rule_for(nn.BatchNorm2d(3)), BatchNormRule)
    assert isinstance(rule_for(nn.Dropout()), IdentityRule)
    assert rule_for(nn.Bilinear(2, 2, 3)) is None
    # the reference models register their own layer's rule (the core never imports them)
    assert isinstance(rule_for(LayerNorm2d(4)), LayerNorm2dRule)


def test_a_subclass_uses_its_base_rule_but_is_traced_through():
    class MyLinear(nn.Linear):
        pass

    assert isinstance(rule_for(MyLinear(2, 3)), LinearRule)
    assert not registry.traced_whole(MyLinear(2, 3)) and registry.traced_whole(nn.Linear(2, 3))


def test_without_a_rule_a_custom_layer_is_traced_through_and_never_resized(rules):
    model = randomize_statistics(gated_net())
    x = torch.randn(8, 12)
    graph = trace(model, x)  # its F.linear calls are followed like nn.Linear
    assert graph.coverage == 1.0 and graph.check_symmetries(x, relative=True) < 1e-5
    with pytest.raises(ValueError, match=r"cannot change the width of layer 0 \(Gated\)"):
        registry.DEFAULT_RULE.resize(model[0], "0")


def test_a_linear_map_of_computed_weights_is_frozen():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.head = nn.Parameter(torch.randn(6, 6)), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(F.linear(x, self.weight @ self.weight))

    graph = trace(Tied(), torch.randn(3, 6))
    assert "linear map of computed weights" in graph.space("head.input").reason


def test_a_registered_rule_makes_a_custom_layer_exact(rules):
    register_gated()
    model = randomize_statistics(gated_net())
    x = torch.randn(8, 12)
    graph = trace(model, x)
    assert graph.coverage == 1.0, graph.summary()
    assert [space.name for space in graph.mergeable_spaces] == ["0", "2"]
    assert set(graph.space("0").params) == {"0.weight", "0.gate", "0.bias", "2.weight", "2.gate"}
    assert graph.check_symmetries(x, relative=True) < 1e-6

    # and the check sees a rule that forgets the gate
    @register_layer(Gated)
    class Forgetful(LayerRule):
        def channels(self, call):
            call.read("weight", 1, call.layer.in_features, expected_axis=call.in_ndim - 1)
            return call.write(call.layer.out_features, call.in_ndim - 1, ("weight", 0))

    wrong = trace(model, x)
    assert wrong.coverage == 1.0 and wrong.check_symmetries(x, relative=True) > 1e-3


def test_a_permuted_copy_of_a_custom_model_merges_back_exactly(rules):
    register_gated()
    model = randomize_statistics(gated_net())
    x = torch.randn(64, 12)
    graph = trace(model, x)
    copy = graph.permute(graph.random_permutations(seed=3))
    merged = gm.merge([model, copy], [x], "permute", progress=False)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=1e-5)


def test_the_rule_resizes_a_custom_layer_kept_side_by_side(rules):
    register_gated()
    models = [gated_net(0), gated_net(1)]
    x = torch.randn(64, 12)
    merged = gm.merge(models, [x], "permute", start_at=1, progress=False)
    assert (merged[0].out_features, merged[2].in_features) == (32, 32)
    assert merged[0].weight.shape == (32, 12) and merged[2].weight.shape == (16, 32)
    with torch.no_grad():
        assert merged(x).shape == (64, 3)


class Mix(nn.Module):
    """y = A x + B h: a layer of two inputs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.b = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x, h):
        return x @ self.a.T + h @ self.b.T


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(6, 8), nn.Linear(6, 8)
        self.mix, self.head = Mix(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.mix(self.left(x), self.right(x))))


def register_mix():
    @register_layer(Mix)
    class MixRule(LayerRule):
        inputs = 2  # the rule receives both inputs' channels
        category = "producer"

        def channels(self, call):
            x, h = call.inputs
            call.read("a", 1, 8, value=x, expected_axis=1)
            call.read("b", 1, 8, value=h, expected_axis=1)
            return call.write(8, 1, ("a", 0), ("b", 0))


def test_a_rule_reads_several_inputs_when_traced_and_when_built(rules):
    model = randomize_statistics(TwoBranch())
    x = torch.randn(8, 6)
    assert trace(model, x).coverage < 1.0  # no rule: Mix is traced through and frozen
    register_mix()
    traced = trace(model, x)
    assert [s.name for s in traced.mergeable_spaces] == ["left", "right", "mix"]
    assert traced.check_symmetries(x, relative=True) < 1e-6
    builder = gm.graphs.GraphBuilder(model)
    start = builder.add_input()
    left, right = builder.add_module(start, "left"), builder.add_module(start, "right")
    mixed = builder.add_module([left, right], "mix")
    builder.add_output(builder.add_module(mixed, "head"))
    built = builder.build()
    assert built.same_spaces(traced)
    assert built.check_symmetries(x, relative=True) < 1e-6


def test_register_layer_refuses_what_is_not_a_rule_or_a_layer(rules):
    with pytest.raises(TypeError, match=r"nn\.Module classes"):
        register_layer("Gated")
    with pytest.raises(TypeError, match="LayerRule subclasses"):
        register_layer(Gated)(object)


def test_a_layer_of_a_library_is_registered_by_its_name_without_importing_it(rules):
    @register_layer(f"{Gated.__module__}.{Gated.__qualname__}")
    class NamedRule(LayerRule):
        category = "producer"

        def channels(self, call):
            call.read("weight", 1, call.layer.in_features)
            call.read("gate", 1, call.layer.in_features)
            return call.write(call.layer.out_features, 1, ("weight", 0), ("gate", 0))

    model = randomize_statistics(gated_net())
    x = torch.randn(4, 12)
    assert isinstance(rule_for(model[0]), NamedRule)
    graph = trace(model, x)
    assert graph.coverage == 1.0 and graph.check_symmetries(x, relative=True) < 1e-5


def scaled_rows(x, weight):
    return x * weight


torch.fx.wrap("scaled_rows")


def test_a_function_rule_that_says_nothing_freezes_what_the_call_reads(monkeypatch):
    monkeypatch.setattr(registry, "_FUNCTION_RULES", dict(registry._FUNCTION_RULES))

    @gm.graphs.register_function(scaled_rows)
    class Silent(gm.graphs.FunctionRule):
        pass

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale, self.head = (
                nn.Linear(4, 6),
                nn.Parameter(torch.rand(6)),
                nn.Linear(6, 2),
            )

        def forward(self, x):
            return self.head(scaled_rows(self.fc(x), self.scale))

    graph = trace(Scaled(), torch.randn(3, 4))
    assert "a function whose rule follows no channels" in graph.space("fc").reason
