"""pleas: partial merging under a width budget, then the least-squares refit of the layers."""

import pytest
import torch
from conftest import assert_same_state, state_hash, train_pair
from torch import nn

import graphmerge as gm
from graphmerge.matching_functions import GlobalBudget
from graphmerge.matching_functions.pleas import _parameter_count


@pytest.fixture(scope="module")
def mlps(digits_flat):
    return train_pair("mlp", {"hidden": (32, 32)}, [digits_flat, digits_flat], epochs=2, lr=0.05)


@pytest.fixture(scope="module")
def merger(mlps, digits_flat):
    merger = gm.Merger(mlps, example_input=next(iter(digits_flat.train))[0], progress=False)
    merger.collect(digits_flat.train, max_samples=512)
    return merger


def test_full_budget_without_least_squares_is_its_inner_method(merger):
    for inner in ("permute", "weight_matching"):
        pleas = merger.merge("pleas", inner=inner, budget=1.0, steps=0)
        assert_same_state(pleas.model, merger.merge(inner).model)


def test_budget_sets_the_merged_widths(merger):
    result = merger.merge("pleas", budget=1.5, steps=0)
    for space in merger.spaces:
        assert result.matches[space.name].merged_width == space.width + round(space.width / 2)
    first = merger.spaces[0].name
    per_space = merger.merge("pleas", budget={first: 2.0}, steps=0)
    widths = [per_space.matches[space.name].merged_width for space in merger.spaces]
    assert widths == [2 * merger.spaces[0].width] + [s.width for s in merger.spaces[1:]]


def test_least_similar_groups_are_kept_apart(merger):
    result = merger.merge("pleas", budget={merger.spaces[0].name: 1.25}, steps=0)
    space = merger.spaces[0]
    merge = result.matches[space.name].merge
    kept_apart = merge[(merge != 0).sum(dim=1) == 1]  # rows of one unit: unmerged groups
    apart_units = set(kept_apart.abs().argmax(dim=1).tolist())
    correlation = merger.statistics[space.name].correlation
    averaged = merge[(merge != 0).sum(dim=1) == 2]
    pairs = [row.nonzero().flatten().tolist() for row in averaged]
    merged_quality = [float(correlation[a, b]) for a, b in pairs]
    apart_pairs = [
        row.nonzero().flatten().tolist()
        for row in merger.merge("pleas", budget=1.0, steps=0).matches[space.name].merge
        if row.nonzero().flatten()[0].item() in apart_units
    ]
    apart_quality = [float(correlation[a, b]) for a, b in apart_pairs]
    assert len(apart_pairs) == round(space.width / 4)
    assert max(apart_quality) <= min(merged_quality) + 1e-12


def test_budget_of_n_is_the_ensemble(mlps, merger, digits_flat):
    result = merger.merge("pleas", budget=2.0, steps=0)
    x = next(iter(digits_flat.test))[0]
    with torch.no_grad():
        average = sum(model.eval()(x) for model in mlps) / 2
        assert torch.allclose(result.model.eval()(x), average, atol=1e-5)


def test_least_squares_lowers_every_layers_error(mlps, merger, digits_flat):
    before = [state_hash(model) for model in mlps]
    result = merger.merge("pleas", budget=1.25, loader=digits_flat.train, max_samples=512)
    report = result.details["least_squares"]
    assert [fit.layer for fit in report.layers] == ["layers.fc1", "layers.fc2", "head"]
    # The first layer reads the shared input: its merged outputs are exact already.
    assert report.layers[0].loss_before < 1e-10
    for fit in report.layers[1:]:
        assert fit.kept and fit.solver == "ridge"
        assert fit.loss_after < 0.9 * fit.loss_before
    assert report.samples == 512
    assert [state_hash(model) for model in mlps] == before
    # The refit model is the one evaluated: its layer outputs are closer to the targets.
    partial = merger.merge("pleas", budget=1.25, steps=0)
    refitted, alone = (gm.evaluation.evaluate(m.model, digits_flat.test) for m in (result, partial))
    assert refitted["loss"] < alone["loss"]


def test_least_squares_is_deterministic(merger, digits_flat):
    fixed = list(digits_flat.train)[:4]  # the training loader shuffles
    first = merger.merge("pleas", budget=1.5, loader=fixed)
    again = merger.merge("pleas", budget=1.5, loader=fixed)
    assert_same_state(first.model, again.model)


def test_permuted_copy_stays_exact():
    model = gm.models.build(
        "resnet20", norm="bn", seed=0, in_channels=3, num_classes=10, width_multiplier=0.5
    )
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    graph = gm.graphs.trace(model, x)
    copy = graph.permute(graph.random_permutations(seed=3))
    batches = [x[:16], x[16:]]
    merged = gm.merge([model, copy], batches, "pleas", budget=1.0, progress=False)
    with torch.no_grad():
        reference, output = model.eval()(x), merged.eval()(x)
    assert (output - reference).norm() / reference.norm() < 1e-4


def test_global_width_budget_ranks_groups_across_spaces(merger):
    result = merger.merge("pleas", budget=GlobalBudget(width=1.25), steps=0)
    total = sum(space.width for space in merger.spaces)
    merged = sum(result.matches[space.name].merged_width for space in merger.spaces)
    assert merged == total + round(total / 4)
    threshold = []
    for space in merger.spaces:
        merge = result.matches[space.name].merge
        correlation = merger.statistics[space.name].correlation
        full = merger.merge("pleas", budget=1.0, steps=0).matches[space.name].merge
        apart = set(merge[(merge != 0).sum(dim=1) == 1].abs().argmax(dim=1).tolist())
        for row in full:
            a, b = row.nonzero().flatten().tolist()
            threshold.append((float(correlation[a, b]), a in apart))
    apart_values = [value for value, apart in threshold if apart]
    merged_values = [value for value, apart in threshold if not apart]
    assert max(apart_values) <= min(merged_values) + 1e-12


def test_global_parameter_budget_is_the_largest_that_fits(mlps, merger):
    result = merger.merge("pleas", budget=GlobalBudget(parameters=1.5), steps=0)
    reference = sum(p.numel() for p in mlps[0].parameters())
    count = sum(p.numel() for p in result.model.parameters())
    assert reference < count <= 1.5 * reference
    widths = {s.name: result.matches[s.name].merged_width for s in merger.spaces}
    assert _parameter_count(merger.graph, mlps[0], widths) == count
    wider = {name: width + 1 for name, width in widths.items()}
    assert _parameter_count(merger.graph, mlps[0], wider) > 1.5 * reference - 200


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.grouped(x))
        return self.head(x.mean(dim=(2, 3)))


def test_layers_without_a_closed_form_take_gradient_steps():
    torch.manual_seed(0)
    models = [Grouped(), Grouped()]
    x = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    batches = [x[:48], x[48:]]
    merger = gm.Merger(models, example_input=x, progress=False)
    merger.collect(batches)
    result = merger.merge("pleas", budget=1.5, loader=batches, steps=30, lr=1e-2)
    fits = {fit.layer: fit for fit in result.details["least_squares"].layers}
    assert fits["grouped"].solver == "gradient" and fits["stem"].solver == "ridge"
    assert fits["grouped"].loss_after < fits["grouped"].loss_before


def test_joint_logits_of_disjoint_models(digits_flat):
    halves = [gm.data.digits(layout="flat", classes=c) for c in ("0-4", "5-9")]
    models = train_pair("mlp", {"hidden": (32,)}, halves, epochs=2, lr=0.05)
    loader = digits_flat.train
    merger = gm.Merger(models, example_input=next(iter(loader))[0], progress=False)
    merger.collect(loader, max_samples=256)
    result = merger.merge("pleas", budget=1.5, output="concat", loader=loader, max_samples=256)
    assert result.model(next(iter(loader))[0]).shape[1] == 10
    assert all(fit.loss_after <= fit.loss_before for fit in result.details["least_squares"].layers)


@pytest.mark.parametrize(
    ("hparams", "error", "message"),
    [
        ({"budget": 2.5, "steps": 0}, ValueError, r"outside \[1, 2\]"),
        ({"budget": 0.5, "steps": 0}, ValueError, r"outside \[1, 2\]"),
        ({"budget": {"nope": 1.5}, "steps": 0}, ValueError, "does not merge here"),
        ({"inner": "zip", "steps": 0}, ValueError, "permutation matches"),
        ({"steps": -1}, ValueError, "steps >= 0"),
        ({"ridge": 0}, ValueError, "ridge > 0"),
        ({"steps": 5}, ValueError, "pass the loader"),
        ({"alpha": 0.3, "steps": 0}, ValueError, "no hyper-parameter alpha"),
    ],
)
def test_bad_settings(merger, hparams, error, message):
    with pytest.raises(error, match=message):
        merger.merge("pleas", **hparams)


def test_bad_global_budgets():
    with pytest.raises(ValueError, match="exactly one"):
        GlobalBudget(width=1.5, parameters=1.5)
    with pytest.raises(ValueError, match="ratio >= 1"):
        GlobalBudget(width=0.5)


def test_refuses_one_shot_iterators_and_reweighting(merger, digits_flat):
    with pytest.raises(ValueError, match="one-shot iterator"):
        merger.merge("pleas", loader=iter(list(digits_flat.train)))
    result = merger.merge("pleas", budget=1.0, loader=digits_flat.train, max_samples=128)
    with pytest.raises(ValueError, match="merge again with weights="):
        merger.reweight(result, 0.3)
