"""ste (Git Re-Basin's straight-through estimator): loss trace, determinism, exactness."""

import copy
import sys

import pytest
import torch
from conftest import assert_same_state, calibrated, train_pair

import graphmerge as gm
from graphmerge.fold import state_tensors
from graphmerge.graphs import trace

STEPS, LR = 8, 1e-2


@pytest.fixture(scope="module")
def pair(digits_flat):
    """Two digit MLPs from seeds 0 and 1 (3 x 16 units: weight matching leaves a barrier)."""
    return train_pair("mlp", {"hidden": (16, 16, 16)}, [digits_flat] * 2, epochs=5, lr=0.1)


@pytest.fixture(scope="module")
def batches(digits_flat):
    """256 labelled training samples in 4 fixed batches."""
    torch.manual_seed(0)
    return [batch for batch, _ in zip(digits_flat.train, range(4), strict=False)]


@pytest.fixture(scope="module")
def merger(pair, digits_flat):
    return gm.Merger(pair, example_input=next(iter(digits_flat.train))[0], progress=False)


@pytest.fixture(scope="module")
def solved(merger, batches):
    return merger.merge("ste", loader=batches, steps=STEPS, lr=LR)


def test_the_loss_trace_starts_at_weight_matching_and_the_best_projection_is_kept(
    solved, merger, batches
):
    details = solved.details
    assert len(details["loss"]) == STEPS + 1
    assert details["loss"][0] == details["initial_loss"]
    assert details["loss"][details["best_step"]] == min(details["loss"])
    assert min(details["loss"]) < details["initial_loss"]  # the STE improved on this pair
    # initial_loss is weight matching's midpoint; the merged model is the best projection's
    matched = merger.merge("weight_matching").model
    assert gm.evaluation.evaluate(matched, batches)["loss"] == pytest.approx(
        details["initial_loss"], rel=1e-5
    )
    merged = gm.evaluation.evaluate(solved.model, batches)["loss"]
    assert merged == pytest.approx(min(details["loss"]), rel=1e-5)


def test_same_seed_same_permutations(solved, merger, batches, digits_flat):
    again = merger.merge("ste", loader=batches, steps=STEPS, lr=LR)
    assert again.details["loss"] == solved.details["loss"]
    for name, match in solved.matches.items():
        assert torch.equal(match.merge, again.matches[name].merge), name
    # a shuffling loader: the seed fixes the batches it draws
    runs = [
        merger.merge("ste", loader=digits_flat.train, max_batches=4, steps=2, lr=LR)
        for _ in range(2)
    ]
    assert runs[0].details["loss"] == runs[1].details["loss"]


def test_the_source_models_are_unchanged(pair, batches):
    before = [copy.deepcopy(model) for model in pair]
    grads = [[None if p.grad is None else p.grad.clone() for p in m.parameters()] for m in pair]
    gm.merge(pair, batches, method="ste", steps=2, progress=False)
    for model, saved, saved_grads in zip(pair, before, grads, strict=True):
        assert_same_state(model, saved)
        for parameter, grad in zip(model.parameters(), saved_grads, strict=True):
            assert (parameter.grad is None) == (grad is None)
            assert grad is None or torch.equal(parameter.grad, grad)


def test_a_permuted_copy_is_recovered_exactly(pair, batches, digits_flat):
    model = pair[0]
    x = next(iter(digits_flat.test))[0]
    graph = trace(model, x)
    permuted = graph.permute(graph.random_permutations(seed=3), model)
    merged = gm.merge([model, permuted], batches, method="ste", steps=3, progress=False)
    with torch.no_grad():
        assert (merged.eval()(x) - model.eval()(x)).abs().max() < 1e-4


def test_three_models_are_aligned_to_model_zero(pair, batches):
    graph = trace(pair[0], batches[0][0])
    models = [*pair, graph.permute(graph.random_permutations(seed=1), pair[1])]
    merger = gm.Merger(models, example_input=batches[0][0], progress=False)
    result = merger.merge("ste", loader=batches, steps=2, lr=LR)
    match = result.matches["layers.fc1"]
    assert torch.equal(match.unmerge[:16], torch.eye(16, dtype=torch.float64))  # model 0 stays
    merged = gm.evaluation.evaluate(result.model, batches)["loss"]
    assert merged == pytest.approx(min(result.details["loss"]), rel=1e-5)


def test_a_residual_network_with_batch_norm_merges_as_its_trained_midpoint():
    """Residual streams and BatchNorm buffers: the midpoint the STE trains is the fold."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=generator)
    loader = [(x, torch.randint(0, 10, (32,), generator=generator))]
    models = [
        calibrated(gm.models.build("resnet20", norm="bn", width_multiplier=0.5, seed=s), x, seed=s)
        for s in (0, 1)
    ]
    merger = gm.Merger(models, example_input=x, progress=False)
    result = merger.merge("ste", loader=loader, steps=1, lr=0.05)
    assert set(result.matches) >= {s.name for s in merger.spaces}
    merged = gm.evaluation.evaluate(result.model, loader)["loss"]
    assert merged == pytest.approx(min(result.details["loss"]), rel=1e-4)


def test_the_function_takes_the_states_directly(pair, batches):
    graph = trace(pair[0], batches[0][0])
    states = [state_tensors(model) for model in pair]
    found = gm.matching_functions.ste(states, graph, pair, batches, steps=0)
    matched = gm.matching_functions.weight_matching(states, graph)
    assert found.loss == [found.initial_loss] and found.best_step == 0
    for name, perms in matched.permutations.items():
        assert torch.equal(found.permutations[name][1], perms[1]), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": -1}, "steps must be"),
        ({"steps": 1.5}, "steps must be"),
        ({"lr": 0.0}, "lr must be"),
        ({"lr": -1e-3}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"init": "random"}, "init must be"),
        ({"max_batches": 0}, "max_batches must be"),
    ],
)
def test_bad_hyperparameters(merger, batches, options, message):
    with pytest.raises(ValueError, match=message):
        merger.merge("ste", loader=batches, **options)


def test_data_without_labels_is_refused(pair, merger, batches):
    x = batches[0][0]
    with pytest.raises(ValueError, match="ste needs labelled data"):
        gm.merge(pair, None, method="ste", example_input=x, progress=False)
    with pytest.raises(ValueError, match="ste needs labelled data"):
        merger.merge("ste")  # no loader=
    with pytest.raises(ValueError, match="ste needs labelled data"):
        merger.merge("ste", loader=[x, x], steps=1)  # inputs without targets
    with pytest.raises(ValueError, match="one-shot iterator"):
        merger.merge("ste", loader=iter([(x, torch.zeros(len(x)).long())]))


def test_it_is_registered_with_its_paper():
    entry = gm.matching_functions.entry("ste")
    assert "Git Re-Basin" in entry.paper and not entry.needs_statistics
    assert {"steps", "lr", "seed"} <= set(entry.hyperparameters)
    assert "loader" not in entry.hyperparameters
    assert sys.modules["graphmerge.matching_functions.ste"].TrainedEntry is type(entry)


def test_labels_beyond_the_outputs_are_refused(merger, batches):
    relabelled = [(inputs, targets + 10) for inputs, targets in batches]  # not the models' labels
    with pytest.raises(ValueError, match="different label sets have no common midpoint"):
        merger.merge("ste", loader=relabelled, steps=1)
