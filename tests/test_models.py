import math

import pytest
import torch
from conftest import assert_same_state

import graphmerge as gm
from graphmerge.models import LayerNorm2d


def run(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(*shape))


@pytest.mark.parametrize("hidden", [(512, 512, 512), (32,), (16, 8)])
@pytest.mark.parametrize("norm", ["none", "bn", "ln"])
def test_mlp_forward_and_widths(hidden, norm):
    model = gm.models.mlp(
        input_dim=64, hidden=hidden, num_classes=7, width_multiplier=0.5, norm=norm
    )
    assert run(model, (5, 64)).shape == (5, 7)
    widths = [
        layer.out_features for name, layer in model.layers.named_children() if name.startswith("fc")
    ]
    assert widths == [max(1, round(w * 0.5)) for w in hidden]


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
@pytest.mark.parametrize("norm", ["none", "bn", "ln"])
def test_vgg_forward_at_small_image_sizes(depth, norm):
    model = gm.models.vgg(depth, norm=norm, width_multiplier=0.125, num_classes=5, in_channels=1)
    for size in (8, 16, 32):
        assert run(model, (2, 1, size, size)).shape == (2, 5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    # VGG-n has n - 3 convs (the name counts the three FC layers of the ImageNet original).
    assert len(convs) == depth - 3
    assert convs[0].out_channels == 8 and convs[-1].out_channels == 64


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
@pytest.mark.parametrize("width", [0.5, 1, 2])
def test_resnet20_forward_and_stage_widths(norm, width):
    model = gm.models.resnet20(width_multiplier=width, norm=norm, num_classes=3, in_channels=3)
    assert run(model, (2, 3, 32, 32)).shape == (2, 3)
    assert run(model, (2, 3, 8, 8)).shape == (2, 3)
    assert [
        model.layer1[0].conv1.out_channels,
        model.layer2[0].conv1.out_channels,
        model.layer3[0].conv1.out_channels,
    ] == [round(16 * width), round(32 * width), round(64 * width)]
    blocks = [m for m in model.modules() if isinstance(m, gm.models.BasicBlock)]
    assert len(blocks) == 9


def test_resnet20_is_the_cifar_resnet20():
    # 0.27M parameters, with 1x1-conv shortcuts where the shape changes (option B).
    model = gm.models.resnet20()
    assert sum(p.numel() for p in model.parameters()) == 272_474
    shortcuts = [m.shortcut for m in model.modules() if isinstance(m, gm.models.BasicBlock)]
    assert sum(not isinstance(s, torch.nn.Identity) for s in shortcuts) == 2


def test_norm_choice_selects_layers():
    bn = gm.models.resnet20(norm="bn")
    ln = gm.models.resnet20(norm="ln")
    plain = gm.models.resnet20(norm="none")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert any(isinstance(m, LayerNorm2d) for m in ln.modules())
    assert not any(
        isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) for m in plain.modules()
    )
    assert plain.conv1.bias is not None and bn.conv1.bias is None


def test_layernorm2d_normalizes_each_position_over_channels():
    layer = LayerNorm2d(6)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 2)
        layer.norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 4, 5)
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5)
    expected = expected * layer.norm.weight.view(1, -1, 1, 1) + layer.norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    "name, width, check",
    [
        ("resnet18", 0.5, lambda m: m.fc.in_features == 256),
        (
            "resnet50",
            0.25,
            lambda m: m.fc.in_features == 512 and m.layer1[0].conv2.out_channels == 16,
        ),
        ("vgg11_bn", 0.125, lambda m: m.classifier[0].in_features == 64 * 49),
        ("mobilenet_v2", 0.5, lambda m: m.features[0][0].out_channels == 16),
        ("resnet18", 1, lambda m: m.fc.in_features == 512),
        ("densenet121", 1, lambda m: m.classifier.out_features == 7),
    ],
)
def test_torchvision_models_by_name(name, width, check):
    model = gm.models.build(f"torchvision:{name}", num_classes=7, width_multiplier=width, seed=0)
    assert run(model, (2, 3, 32, 32)).shape == (2, 7)
    assert check(model)


def test_torchvision_width_unsupported_family_is_a_clear_error():
    with pytest.raises(ValueError, match="not supported for torchvision 'densenet121'"):
        gm.models.build("torchvision:densenet121", width_multiplier=0.5)


def test_available_lists_reference_and_torchvision_names():
    names = gm.models.available()
    assert {"mlp", "vgg", "vgg11", "vgg19", "resnet20"} <= set(names)
    assert "torchvision:resnet18" in names and "torchvision:vgg11_bn" in names


def test_build_records_a_spec_that_rebuilds_the_model():
    model = gm.models.build("vgg11", norm="bn", width_multiplier=0.25, num_classes=4, in_channels=1)
    spec = gm.models.spec_of(model)
    assert spec.architecture == "vgg"
    assert spec.kwargs == {
        "depth": 11,
        "norm": "bn",
        "width_multiplier": 0.25,
        "num_classes": 4,
        "in_channels": 1,
    }
    rebuilt = gm.models.build(spec.architecture, **spec.kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert gm.models.spec_of(torch.nn.Linear(2, 2)) is None


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = gm.models.build("resnet20", seed=5)
    after = torch.rand(3)
    b = gm.models.build("resnet20", seed=5)
    c = gm.models.build("resnet20", seed=6)
    assert torch.equal(after, expected_next)
    assert_same_state(a, b)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_unknown_model_names_suggest_alternatives():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*Did you mean resnet20"):
        gm.models.build("resnet21")
    with pytest.raises(ValueError, match="Did you mean torchvision:resnet18"):
        gm.models.build("resnet18")
    with pytest.raises(ValueError, match="unknown torchvision architecture 'resnet17'"):
        gm.models.build("torchvision:resnet17")


@pytest.mark.parametrize("width", [0, -1, math.nan, math.inf, "2", True])
def test_bad_width_multiplier_is_rejected(width):
    with pytest.raises(ValueError, match="width_multiplier must be a finite number > 0"):
        gm.models.build("resnet20", width_multiplier=width)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown norm 'gn'"):
        gm.models.build("resnet20", norm="gn")
    with pytest.raises(ValueError, match="unknown VGG depth 12"):
        gm.models.build("vgg", depth=12)
    with pytest.raises(ValueError, match=r"bad arguments for 'mlp'.*It accepts: input_dim"):
        gm.models.build("mlp", depth=3)
    with pytest.raises(ValueError, match="'vgg11' fixes"):
        gm.models.build("vgg11", depth=13)
    with pytest.raises(ValueError, match="num_classes must be a whole number >= 1"):
        gm.models.build("mlp", num_classes=0)
    with pytest.raises(ValueError, match="hidden must list at least one layer"):
        gm.models.build("mlp", hidden=())


def test_the_small_vit_runs_traces_exactly_and_merges_a_permuted_copy_back(tmp_path):
    model = gm.models.build("vit", width=16, depth=2, heads=2, width_multiplier=2, seed=0)
    assert model.patch.out_channels == 32 and model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    checked = gm.graphs.randomize_statistics(model).eval()
    x = torch.randn(4, 1, 8, 8)
    graph = gm.graphs.trace(checked, x)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    layer = "encoder.layers.0"
    assert [s.name for s in graph.mergeable_spaces][:4] == [
        "patch", f"{layer}.self_attn.query_key", f"{layer}.self_attn.value", f"{layer}.linear1",
    ]  # fmt: skip
    assert {"class_token", "position", "norm.weight"} <= set(graph.space("patch").params)
    assert graph.coverage == 1.0 and not graph.frozen_spaces  # heads matched as blocks
    assert graph.space(f"{layer}.self_attn.value").blocks == f"{layer}.self_attn.heads"
    copy = graph.permute(graph.random_permutations(seed=3))
    with torch.no_grad():
        for method in ("permute", "weight_matching"):
            merged = gm.merge([checked, copy], [x], method, progress=False)
            assert torch.allclose(merged(x), checked(x), atol=1e-5), method
    gm.save_checkpoint(model, tmp_path / "vit.pt")
    assert_same_state(gm.load_checkpoint(tmp_path / "vit.pt").model, model)


def test_the_vit_checks_its_sizes():
    with pytest.raises(ValueError, match="width 30 is not a multiple of heads 4"):
        gm.models.build("vit", width=30)
    with pytest.raises(ValueError, match="image_size 9 is not a multiple of patch_size 2"):
        gm.models.build("vit", image_size=9)
    assert gm.models.data_kwargs("vit", (1, 8, 8), 5) == {
        "num_classes": 5, "in_channels": 1, "image_size": 8,
    }  # fmt: skip


def test_huggingface_and_timm_models_by_name_have_random_weights_and_a_spec():
    bert = gm.models.build("hf:bert", num_classes=4, width_multiplier=2, seed=0)
    assert type(bert).__name__ == "BertForSequenceClassification"
    assert bert.config.hidden_size == 128 and bert.config.num_labels == 4
    assert bert.config.vocab_size == 18  # the digit tokens 0..16 and [CLS]
    assert gm.models.spec_of(bert).architecture == "hf:bert"
    again = gm.models.build("hf:bert", num_classes=4, width_multiplier=2, seed=0)
    assert_same_state(bert, again)
    assert {f"hf:{name}" for name in ("bert", "gpt2", "vit")} <= set(gm.models.available())
    vit = gm.models.build("hf:vit", seed=0)
    assert vit(pixel_values=torch.randn(2, 1, 8, 8)).logits.shape == (2, 10)
    resnet = gm.models.build("timm:resnet18", num_classes=3, in_channels=1, seed=0)
    assert resnet(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_unknown_huggingface_and_timm_names_are_refused_with_suggestions():
    with pytest.raises(ValueError, match=r"unknown HuggingFace architecture 'bertt'.*hf:bert"):
        gm.models.build("hf:bertt")
    with pytest.raises(ValueError, match=r"unknown timm architecture 'resnet19'.*timm:resnet"):
        gm.models.build("timm:resnet19")
    with pytest.raises(ValueError, match=r"timm:resnet18 has no width multiplier"):
        gm.models.build("timm:resnet18", width_multiplier=2)
    with pytest.raises(ValueError, match="width_multiplier must be a finite number > 0"):
        gm.models.build("hf:gpt2", width_multiplier=0)
