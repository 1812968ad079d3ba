"""The merge engine: exactness on permuted copies, identity, ensembles, N = 3 (bad inputs:
test_bad_inputs.py)."""

import warnings

import pytest
import torch
from conftest import REFERENCE_MODELS, calibrated, relative_error, state_hash

import graphmerge as gm
from graphmerge.graphs import trace

ARCHITECTURES = [
    *REFERENCE_MODELS,
    ("torchvision:resnet18", {}, (3, 32, 32)),
    ("torchvision:resnet50", {}, (3, 32, 32)),
    ("torchvision:vgg11_bn", {"width_multiplier": 0.25}, (3, 32, 32)),
    ("torchvision:densenet121", {}, (3, 32, 32)),
    ("torchvision:mobilenet_v2", {}, (3, 32, 32)),
    ("torchvision:efficientnet_b0", {}, (3, 32, 32)),
    ("torchvision:googlenet", {}, (3, 32, 32)),
    ("torchvision:squeezenet1_0", {}, (3, 32, 32)),
    ("torchvision:regnet_x_400mf", {}, (3, 32, 32)),  # frozen spaces: averaged, still exact
]


def model_and_data(name, kwargs, shape, samples=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *shape, generator=generator)
    model = gm.models.build(name, seed=seed, num_classes=10, **kwargs)
    return calibrated(model, x), x


def batches(x, size=32):
    return [x[i : i + size] for i in range(0, len(x), size)]


@pytest.mark.parametrize(("name", "kwargs", "shape"), ARCHITECTURES)
def test_permute_merges_a_model_with_its_permuted_copy_exactly(name, kwargs, shape):
    model, x = model_and_data(name, kwargs, shape, samples=32 if name.startswith("torch") else 64)
    graph = trace(model, x[:8])
    copy = graph.permute(graph.random_permutations(seed=7))
    with torch.no_grad():
        reference, permuted_out = model(x), copy.eval()(x)
    assert relative_error(reference, permuted_out) < 1e-4  # the copy computes the same
    assert state_hash(copy) != state_hash(model)  # ... with other weights (BN buffers too)
    merged = gm.merge([model, copy], batches(x), method="permute", graph=graph, progress=False)
    with torch.no_grad():
        assert relative_error(reference, merged.eval()(x)) < 1e-4


@pytest.mark.parametrize("method", ["zip", "cca", "weight_matching"])
@pytest.mark.parametrize(("name", "kwargs", "shape"), [REFERENCE_MODELS[i] for i in (1, 5, 6)])
def test_every_method_merges_a_model_with_its_permuted_copy_exactly(method, name, kwargs, shape):
    model, x = model_and_data(name, kwargs, shape)
    graph = trace(model, x[:8])
    copy = graph.permute(graph.random_permutations(seed=3))
    merger = gm.Merger([model, copy], graph=graph, example_input=x)
    if method != "weight_matching":
        merger.collect(batches(x), progress=False)
    merged = merger.merge(method).model
    with torch.no_grad():
        assert relative_error(model(x), merged.eval()(x)) < 1e-4


def test_identity_is_the_plain_state_dict_average():
    a, x = model_and_data("resnet20", {}, (3, 8, 8), seed=0)
    b, _ = model_and_data("resnet20", {}, (3, 8, 8), seed=1)
    merged = gm.merge([a, b], batches(x), method="identity", progress=False)
    for key, value in merged.state_dict().items():
        first, second = a.state_dict()[key], b.state_dict()[key]
        if value.is_floating_point():
            assert torch.equal(value, (first + second) / 2), key
        else:
            assert torch.equal(value, first), key  # counters: model 0's


def test_identity_of_three_models_is_their_average():
    models = [model_and_data("mlp", {"hidden": (16,)}, (64,), seed=s)[0] for s in range(3)]
    x = torch.randn(32, 64)
    merged = gm.merge(models, [x], method="identity", progress=False)
    for key, value in merged.state_dict().items():
        expected = sum(m.state_dict()[key] for m in models) / 3
        assert torch.allclose(value, expected, atol=1e-7), key


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_nothing_merged_is_the_exact_ensemble(name):
    shape = (64,) if name == "mlp" else (3, 8, 8)
    kwargs = {"hidden": (16, 16)} if name == "mlp" else {}
    a, x = model_and_data(name, kwargs, shape, seed=0)
    b, _ = model_and_data(name, kwargs, shape, seed=1)
    merger = gm.Merger([a, b], example_input=x)
    merger.collect(batches(x), progress=False)
    count = len(merger.spaces)
    with torch.no_grad():
        logits = [a(x), b(x)]
        for scope in ({"start_at": count}, {"stop_at": 0}):
            average = merger.merge("permute", **scope).model.eval()(x)
            assert relative_error((logits[0] + logits[1]) / 2, average) < 1e-5
            joint = merger.merge("permute", output="concat", **scope).model.eval()(x)
            assert joint.shape == (len(x), 20)
            assert relative_error(torch.cat(logits, dim=1), joint) < 1e-5
    widths = merger.merge("identity", start_at=count).matches
    assert all(
        m.merged_width == 2 * s.width for s, m in zip(merger.spaces, widths.values(), strict=True)
    )


def test_partial_scopes_by_index_and_by_name():
    a, x = model_and_data("resnet20", {}, (3, 8, 8), seed=0)
    b, _ = model_and_data("resnet20", {}, (3, 8, 8), seed=1)
    merger = gm.Merger([a, b], example_input=x)
    merger.collect(batches(x), progress=False)
    names = [space.name for space in merger.spaces]
    by_index = merger.merge("permute", start_at=2, stop_at=5)
    by_name = merger.merge("permute", start_at=names[2], stop_at=names[5])
    assert by_index.merged == by_name.merged == names[2:5]
    assert state_hash(by_index.model) == state_hash(by_name.model)
    widths = {n: m.merged_width for n, m in by_index.matches.items()}
    assert widths[names[0]] == 2 * merger.spaces[0].width
    assert widths[names[3]] == merger.spaces[3].width
    with torch.no_grad():
        assert by_index.model.eval()(x).shape == (64, 10)
    assert by_index.model.conv1.out_channels == 32  # the stem stream is kept side by side


def test_three_models_merge():
    model, x = model_and_data("resnet20", {"norm": "bn"}, (3, 8, 8))
    graph = trace(model, x[:8])
    copies = [graph.permute(graph.random_permutations(seed=s)) for s in (1, 2)]
    merged = gm.merge([model, *copies], batches(x), graph=graph, progress=False)
    with torch.no_grad():
        assert relative_error(model(x), merged.eval()(x)) < 1e-4
    others = [model_and_data("resnet20", {}, (3, 8, 8), seed=s)[0] for s in (1, 2)]
    merged = gm.merge([model, *others], batches(x), progress=False)
    with torch.no_grad():
        assert torch.isfinite(merged.eval()(x)).all()


def test_merging_is_deterministic_and_leaves_the_inputs_alone():
    a, x = model_and_data("resnet20", {}, (3, 8, 8), seed=0)
    b, _ = model_and_data("resnet20", {}, (3, 8, 8), seed=1)
    a.train()
    hashes = [state_hash(a), state_hash(b)]
    first = gm.merge([a, b], batches(x), progress=False)
    second = gm.merge([a, b], batches(x), progress=False)
    assert state_hash(first) == state_hash(second)
    assert [state_hash(a), state_hash(b)] == hashes
    assert a.training and not b.training
    assert first is not a and first is not b


def test_merged_models_save_and_reload_only_when_their_widths_are_buildable(tmp_path):
    a, x = model_and_data("resnet20", {}, (3, 8, 8), seed=0)
    b, _ = model_and_data("resnet20", {}, (3, 8, 8), seed=1)
    merger = gm.Merger([a, b], example_input=x)
    merger.collect(batches(x), progress=False)
    merged = merger.merge("permute").model
    gm.save_checkpoint(merged, tmp_path / "merged.pt")
    reloaded = gm.load_checkpoint(tmp_path / "merged.pt").model
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), merged.eval()(x))
    wide = merger.merge("permute", start_at=3).model  # some spaces at 2 * d
    assert gm.models.spec_of(wide) is None and gm.models.spec_of(merged) is not None
    with pytest.raises(ValueError, match="cannot tell how to rebuild this model"):
        gm.save_checkpoint(wide, tmp_path / "wide.pt")


def zeroed_rows_mlp(seed=0):
    """An MLP whose first layer has 6 units constant on the data: zero rows, distinct biases."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 3),
    )  # fmt: skip
    with torch.no_grad():
        model[0].weight[:6] = 0.0
        model[0].bias[:6] = torch.linspace(0.1, 1.5, 6)
    return model.eval()


@pytest.mark.parametrize(
    ("method", "kwargs"), [("permute", {}), ("zip", {"beta": 0.0}), ("zip", {})]
)
def test_units_constant_on_the_data_merge_back_to_their_copies(method, kwargs):
    model = zeroed_rows_mlp()
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    graph = trace(model, x[:4])
    copy = graph.permute(graph.random_permutations(seed=5))
    merged = gm.merge([model, copy], [x], method, graph=graph, progress=False, **kwargs)
    with torch.no_grad():
        assert relative_error(model(x), merged(x)) < 1e-5


@pytest.mark.parametrize(("method", "kwargs"), [("permute", {}), ("zip", {"beta": 0.0})])
def test_mnasnet_with_random_statistics_merges_its_permuted_copy_back(method, kwargs):
    # 291 of its 576 units at merge points are constant on the data with distinct values
    model = gm.graphs.randomize_statistics(gm.models.build("torchvision:mnasnet0_5", seed=0))
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = trace(model, x[:2])
    copy = graph.permute(graph.random_permutations(seed=1))
    merged = gm.merge([model, copy], [x], method, graph=graph, progress=False, **kwargs)
    with torch.no_grad():
        assert relative_error(model.eval()(x), merged.eval()(x)) < 1e-4


@pytest.fixture(scope="module")
def five_trained_mlps(digits_flat):
    return [
        gm.training.train(
            gm.models.build("mlp", hidden=(64, 64), seed=seed), digits_flat.train, epochs=2,
            seed=seed, progress=False,
        ).model
        for seed in range(5)
    ]  # fmt: skip


@pytest.mark.parametrize("count", [3, 4, 5])
def test_zip_merges_three_to_five_models_on_its_defaults(count, five_trained_mlps, digits_flat):
    # with 3 of these the budgets of the defaults once blocked every pair: "no admissible pair"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the budgets may be lifted
        merged = gm.merge(five_trained_mlps[:count], digits_flat.train, "zip", progress=False)
    assert merged.layers.fc1.out_features == 64
    metrics = gm.evaluation.evaluate(merged, digits_flat.test)
    assert metrics["accuracy"] > 0.5  # a working model, well above the 10% of chance
