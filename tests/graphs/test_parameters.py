"""Parameters that reach channels through shape and elementwise ops are followed, never lost.

A layer scale is rarely used as it is stored: ``gamma.reshape(1, -1, 1, 1)``,
``sigmoid(gate)``, ``scale.to(x.dtype)`` come first. Each such use must put the parameter
in the space of the channels it meets (permuted with them), or freeze that space with a
reason. The mutation tests switch the rule off and show the self-check would catch it.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch import nn

import graphmerge as gm
from graphmerge.graphs import GraphTraceError, randomize_statistics, trace
from graphmerge.graphs.trace import _Walker

WIDTH = 8


class LayerScaled(nn.Module):
    """x + conv(x) * gamma.reshape(1, -1, 1, 1), a sigmoid gate and non-persistent buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 3, padding=1)
        self.conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((WIDTH,), 1e-6))  # timm's layer-scale init
        self.gate = nn.Parameter(torch.zeros(WIDTH))
        self.register_buffer("scale", torch.ones(WIDTH), persistent=False)
        self.register_buffer("steps", torch.arange(4), persistent=False)  # an index table
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(F.relu(x)) * self.gamma.reshape(1, -1, 1, 1)
        x = x * torch.sigmoid(self.gate).view(1, -1, 1, 1)
        x = x * self.scale.to(x.dtype).unsqueeze(-1).unsqueeze(-1)
        return self.head(F.relu(x).mean((2, 3)))


def inputs(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_layer_scale_gate_and_non_persistent_buffers_merge_back_exactly():
    model = randomize_statistics(LayerScaled())
    x = inputs(32, 3, 6, 6)
    graph = trace(model, x)
    assert graph.coverage == 1.0
    assert {"gamma", "gate", "scale", "conv.weight"} <= set(graph.space("stem").params)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    permuted = graph.permute(graph.random_permutations(seed=1))
    assert not torch.equal(permuted.scale, model.scale)  # the channel buffer moved too
    merged = gm.merge([model, permuted], [x], "permute", progress=False)
    with torch.no_grad():
        assert relative_error(model(x), merged(x)) < 1e-4
    assert torch.equal(merged.steps, model.steps)  # carried over, never a KeyError
    torch.testing.assert_close(merged.scale, model.scale)
    assert "scale" not in merged.state_dict()  # still non-persistent


@pytest.mark.parametrize("method", ["zip", "weight_matching"])
def test_every_method_folds_layer_scales_and_non_persistent_buffers(method):
    model = randomize_statistics(LayerScaled())
    x = inputs(32, 3, 6, 6)
    graph = trace(model, x)
    permuted = graph.permute(graph.random_permutations(seed=2))
    merger = gm.Merger([model, permuted], graph=graph, example_input=x, progress=False)
    if method != "weight_matching":
        merger.collect([x])
    merged = merger.merge(method).model
    with torch.no_grad():
        assert relative_error(model(x), merged(x)) < 1e-4


class Scaled(nn.Module):
    """conv -> ``use(p, x)`` -> head, where ``use`` brings a parameter to the channels."""

    def __init__(self, use) -> None:
        super().__init__()
        self.use = use
        self.conv = nn.Conv2d(3, WIDTH, 1)
        self.p = nn.Parameter(torch.ones(WIDTH))
        self.q = nn.Parameter(torch.ones(WIDTH))
        self.head = nn.Conv2d(WIDTH, 2, 1)

    def forward(self, x):
        return self.head(self.use(self.p, self.q, F.relu(self.conv(x)))).mean((2, 3))


USES = {
    "reshape": lambda p, q, x: x * p.reshape(1, -1, 1, 1),
    "view": lambda p, q, x: x * p.view(1, WIDTH, 1, 1),
    "unsqueeze": lambda p, q, x: p.unsqueeze(-1).unsqueeze(-1) * x,
    "3-d reshape": lambda p, q, x: x + p.reshape(-1, 1, 1),
    "expand": lambda p, q, x: x * p.view(1, -1, 1, 1).expand(x.shape),
    "flatten": lambda p, q, x: x * p.view(1, 1, -1, 1, 1).flatten(1, 2),
    "permute": lambda p, q, x: x * p.view(1, 1, 1, -1).permute(0, 3, 1, 2),
    "to dtype": lambda p, q, x: x * p.to(x.dtype).view(1, -1, 1, 1),
    "type_as": lambda p, q, x: x * p.type_as(x).view(1, -1, 1, 1),
    "sigmoid": lambda p, q, x: x * torch.sigmoid(p).view(1, -1, 1, 1),
    "exp": lambda p, q, x: x * p.exp().view(1, -1, 1, 1),
    "abs": lambda p, q, x: x * p.abs().view(1, -1, 1, 1),
    "softplus": lambda p, q, x: x * F.softplus(p).view(1, -1, 1, 1),
    "parameter * parameter": lambda p, q, x: x * (p * q).view(1, -1, 1, 1),
    "parameter + number": lambda p, q, x: x * (1 + p).view(1, -1, 1, 1),
    "mean over channels": lambda p, q, x: x + x.mean(1, keepdim=True) * p.view(1, -1, 1, 1),
    "channel-last": lambda p, q, x: (x.permute(0, 2, 3, 1) * p).permute(0, 3, 1, 2),
    "layer_norm weight .to()": lambda p, q, x: F.layer_norm(
        x.permute(0, 2, 3, 1), (WIDTH,), p.to(x.dtype), q.to(x.dtype)
    ).permute(0, 3, 1, 2),
}


def relative_check(model, x, trials=2):
    graph = trace(model, x)
    return graph, graph.check_symmetries(x, trials=trials, relative=True)


@pytest.mark.parametrize("use", list(USES))
def test_parameters_through_shape_and_elementwise_ops_are_permuted(use):
    model = randomize_statistics(Scaled(USES[use]))
    graph, change = relative_check(model, inputs(4, 3, 5, 5))
    assert change < 1e-5
    assert graph.coverage == 1.0, graph.summary()
    assert "p" in graph.space("conv").params


@pytest.mark.parametrize("use", list(USES))
def test_without_the_rule_the_check_sees_the_missing_permutation(use, monkeypatch):
    model = randomize_statistics(Scaled(USES[use]))
    monkeypatch.setattr(_Walker, "_along_channels", lambda *args: None)
    _, change = relative_check(model, inputs(4, 3, 5, 5))
    assert change > 1e-3


def test_randomizing_is_what_makes_the_check_see_a_layer_scale(monkeypatch):
    monkeypatch.setattr(_Walker, "_along_channels", lambda *args: None)  # the old tracer
    x = inputs(4, 3, 6, 6)
    fresh = LayerScaled()  # gamma 1e-6, gate 0 (sigmoid 0.5 everywhere), scale 1
    with torch.no_grad():
        fresh.stem.bias.zero_(), fresh.conv.bias.zero_()
    _, blind = relative_check(fresh, x)
    _, seen = relative_check(randomize_statistics(fresh), x)
    assert blind < 1e-5 < 1e-2 < seen


class Untracked(nn.Module):
    """Parameters used in ways no permutation of theirs can follow."""

    def __init__(self, use) -> None:
        super().__init__()
        self.use = use
        self.conv = nn.Conv2d(3, WIDTH, 1)
        self.other = nn.Conv2d(3, WIDTH, 1)
        self.p = nn.Parameter(torch.ones(WIDTH))
        self.plain = torch.linspace(0.5, 1.5, WIDTH)  # a tensor attribute, not a buffer
        self.head = nn.Conv2d(WIDTH, 2, 1)

    def forward(self, x):
        a, b = F.relu(self.conv(x)), F.relu(self.other(x))
        return self.head(self.use(self, a, b)).mean((2, 3))


FROZEN = {
    "cumsum of a parameter": (
        lambda m, a, b: a * torch.cumsum(m.p, 0).view(1, -1, 1, 1),
        "unknown operation cumsum",
    ),
    "a layer scale also used in cumsum": (
        lambda m, a, b: a * m.p.view(1, -1, 1, 1) + b * m.p.cumsum(0)[0],
        "unknown operation cumsum",
    ),
    "indexed parameter": (
        lambda m, a, b: a * m.p[torch.arange(WIDTH).flip(0)].view(1, -1, 1, 1),
        "getitem",
    ),
    "outer product": (
        lambda m, a, b: a * (m.p.view(-1, 1) * m.p.view(1, -1)).sum(1).view(1, -1, 1, 1),
        "outer product",
    ),
    "plain tensor attribute": (
        lambda m, a, b: a * m.plain.view(1, -1, 1, 1),
        "neither a parameter nor a buffer",
    ),
    "parameter along space": (
        lambda m, a, b: a * m.p.view(1, -1, 1, 1) + b * m.p,  # along b's width of 8 pixels
        "not channels",
    ),
}


@pytest.mark.parametrize("case", list(FROZEN))
def test_parameters_that_cannot_be_followed_freeze_the_space_with_the_reason(case):
    use, reason = FROZEN[case]
    model = randomize_statistics(Untracked(use))
    graph, change = relative_check(model, inputs(4, 3, 5, WIDTH))
    assert change < 1e-5
    frozen = graph.space("conv")
    assert frozen.frozen and reason in frozen.reason, graph.summary()


def test_a_constant_of_forward_freezes_the_channels_it_scales():
    model = randomize_statistics(Untracked(lambda m, a, b: a * torch.tensor(list(range(8)))
                                           .view(1, -1, 1, 1).to(a)))  # fmt: skip
    graph, change = relative_check(model, inputs(2, 3, 4, 4))
    assert change < 1e-6
    assert graph.space("conv").frozen and graph.space("other").mergeable


# -- errors while tracing ---------------------------------------------------------------------
class HuggingFaceLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, input_ids=None, inputs_embeds=None):
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds")
        return self.fc(input_ids)


def test_errors_of_model_code_while_tracing_become_graph_trace_errors():
    with pytest.raises(GraphTraceError) as error:
        trace(HuggingFaceLike(), torch.randn(2, 4), tracer="fx")
    message = str(error.value)
    assert message.startswith("torch.fx cannot trace HuggingFaceLike: ValueError: You cannot")
    assert "test_parameters.py:" in message and "in forward: raise ValueError" in message
    assert "GraphBuilder" in message


def test_auto_tracing_falls_back_to_torch_export_where_fx_fails():
    graph = trace(HuggingFaceLike(), torch.randn(2, 4))
    assert graph.tracer == "export" and graph.coverage == 1.0
    assert trace(Untracked(lambda m, a, b: a + b), inputs(2, 3, 4, 4)).tracer == "fx"


def test_a_failure_while_following_a_node_names_the_node(monkeypatch):
    def broken(self, node):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(_Walker, "_binary", broken)
    expected = r"node mul \(call_function mul\) of LayerScaled: IndexError"
    with pytest.raises(GraphTraceError, match=expected):
        trace(LayerScaled(), torch.randn(2, 3, 4, 4))


def test_shape_propagation_failures_are_graph_trace_errors(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("ShapeProp error for: node=%conv")

    monkeypatch.setattr("torch.fx.passes.shape_prop.ShapeProp.propagate", broken)
    with pytest.raises(GraphTraceError, match="traced graph of LayerScaled fails"):
        trace(LayerScaled(), torch.randn(2, 3, 4, 4))


def test_an_input_the_model_rejects_is_a_graph_trace_error_naming_the_shape():
    with pytest.raises(GraphTraceError, match=r"example input \(2, 5, 4, 4\) does not fit"):
        trace(LayerScaled(), torch.randn(2, 5, 4, 4))


# -- tied weights ------------------------------------------------------------------------------
class Tied(nn.Module):
    """An embedding and an output head sharing one tensor (GPT-2's LM head), an MLP between."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.embed(tokens)))).mean(1)


def test_tied_weights_unite_their_spaces_and_stay_tied():
    model = randomize_statistics(Tied()).eval()
    tokens = torch.randint(0, 12, (64, 5), generator=torch.Generator().manual_seed(0))
    graph = trace(model, tokens)
    # the embedding's columns and the head's columns are one tensor: one space
    assert [s.name for s in graph.spaces] == ["input", "embed", "output"]
    assert {"embed.weight", "fc.weight", "fc.bias"} <= set(graph.space("embed").params)
    assert graph.check_symmetries(tokens, relative=True) < 1e-5
    permuted = graph.permute(graph.random_permutations(seed=1))
    assert permuted.head.weight is permuted.embed.weight
    for method, kwargs in [("permute", {"weights": 1.0}), ("permute", {}), ("zip", {})]:
        merged = gm.merge([model, permuted], [tokens], method, progress=False, **kwargs)
        assert merged.head.weight is merged.embed.weight, method
        with torch.no_grad():
            assert relative_error(model(tokens), merged(tokens)) < 1e-5, (method, kwargs)


def test_models_with_constants_of_forward_merge():
    """torch.fx keeps ``torch.tensor(...)`` of forward on the traced module only: the
    statistics pass must find it there (it raised AttributeError '_tensor_constant0')."""
    model = randomize_statistics(Untracked(lambda m, a, b: a * m.p.view(1, -1, 1, 1) + b
                                           + torch.tensor(0.5)))  # fmt: skip
    x = inputs(16, 3, 4, 4)
    graph = trace(model, x)
    permuted = graph.permute(graph.random_permutations(seed=1))
    for method in ("permute", "zip"):
        merged = gm.merge([model, permuted], [x], method, graph=graph, progress=False)
        with torch.no_grad():
            assert relative_error(model(x), merged(x)) < 1e-4, method
