"""The fast part of the zoo (benchmarks/zoo.py): torchvision and timm models of many families,
random weights, every parameter randomized. None may be silently wrong (a change above 1e-4
relative while a space is reported mergeable), none may crash with anything but a
GraphTraceError; coverage may grow, never shrink below today's."""

import pytest
import timm
import torch
import torchvision
from conftest import relative_error

import graphmerge as gm
from graphmerge.graphs import GraphTraceError, randomize_statistics, trace

SMALL = (3, 32, 32)
# (source, name, constructor kwargs, input shape, coverage at least)
ZOO = [
    ("torchvision", "mnasnet0_5", {}, SMALL, 1.0),
    ("torchvision", "squeezenet1_1", {}, (3, 48, 48), 1.0),
    ("torchvision", "shufflenet_v2_x0_5", {}, SMALL, 0.45),
    ("torchvision", "mobilenet_v3_small", {}, SMALL, 1.0),
    ("torchvision", "regnet_y_400mf", {}, SMALL, 1.0),
    ("torchvision", "efficientnet_b0", {}, SMALL, 1.0),
    ("torchvision", "convnext_tiny", {}, SMALL, 1.0),
    ("torchvision", "swin_t", {}, SMALL, 1.0),
    ("timm", "convnext_atto", {}, SMALL, 1.0),
    ("timm", "vit_tiny_patch16_224", {"img_size": 32}, SMALL, 1.0),
    ("timm", "swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 2}, SMALL, 1.0),
    ("timm", "resnext26ts", {}, SMALL, 1.0),
    ("timm", "poolformer_s12", {}, SMALL, 1.0),
    ("timm", "ghostnet_050", {}, SMALL, 1.0),
    ("timm", "mixnet_s", {}, SMALL, 1.0),
    ("timm", "mobilenetv2_050", {}, SMALL, 1.0),
    ("timm", "rexnet_100", {}, SMALL, 1.0),
    ("timm", "cspresnet50", {}, SMALL, 1.0),
    ("timm", "levit_128s", {"img_size": 32}, SMALL, 0.4),
    ("timm", "resmlp_12_224", {"img_size": 32}, SMALL, 0.6),
    ("timm", "edgenext_xx_small", {}, SMALL, 0.75),
    ("timm", "dla34", {}, SMALL, 1.0),
]


def build(source, name, kwargs):
    if source == "torchvision":
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


@pytest.mark.parametrize(
    ("source", "name", "kwargs", "shape", "coverage"),
    ZOO,
    ids=[f"{source}-{name}" for source, name, *_ in ZOO],
)
def test_zoo_models_are_exact_or_frozen_never_silently_wrong(source, name, kwargs, shape, coverage):
    model = randomize_statistics(build(source, name, kwargs)).eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    graph = trace(model, x)
    change = graph.check_symmetries(x, trials=2, relative=True)
    assert change < 1e-4 or not graph.mergeable_spaces, (change, graph.summary())
    assert graph.coverage >= coverage
    assert all(space.reason for space in graph.frozen_spaces)  # every freeze says why


def test_timm_convnext_with_random_layer_scales_merges_a_permuted_copy_back():
    model = randomize_statistics(build("timm", "convnext_atto", {})).eval()
    layer_scales = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    assert layer_scales and all(p.min() >= 0.5 for p in layer_scales)  # not 1e-6 any more
    x = torch.randn(48, *SMALL, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x[:2])
    assert graph.check_symmetries(x[:4], relative=True) < 1e-5
    permuted = graph.permute(graph.random_permutations(seed=2))
    merged = gm.merge([model, permuted], [x], "permute", graph=graph, progress=False)
    with torch.no_grad():
        assert relative_error(model(x), merged(x)) < 1e-4


class ShapeDependent(torch.nn.Module):
    """timm's vgg11_bn and mobilevit branch on sizes like this, which torch.fx cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.norm(self.conv(x)).relu()
        if x.shape[-1] > 4:
            x = torch.nn.functional.max_pool2d(x, 2)
        return self.head(x.mean((2, 3)))


def test_models_fx_refuses_are_traced_by_torch_export_and_exact():
    model = randomize_statistics(ShapeDependent())
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(GraphTraceError, match=r"torch\.fx cannot trace ShapeDependent"):
        trace(model, x, tracer="fx")
    graph = trace(model, x)
    assert graph.tracer == "export" and graph.coverage == 1.0
    assert [s.name for s in graph.mergeable_spaces] == ["conv"]
    assert graph.check_symmetries(x, relative=True) < 1e-5
    permuted = graph.permute(graph.random_permutations(1))
    merged = gm.merge([model, permuted], [x, x[:3]], method="permute", progress=False)  # any size
    assert relative_error(merged.eval()(x), model.eval()(x)) < 1e-5


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_models_neither_tracer_captures_are_refused_with_both_causes():
    with pytest.raises(GraphTraceError) as error:
        trace(DataDependent(), torch.randn(2, 4))
    message = str(error.value)
    assert message.startswith("neither tracer captures DataDependent. torch.fx cannot trace")
    assert "and torch.export cannot capture DataDependent" in message
    assert "test_zoo.py:" in message and "GraphBuilder" in message
