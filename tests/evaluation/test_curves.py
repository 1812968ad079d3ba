"""Interpolation curves and barriers; Merger.reweight, the fold behind every curve point."""

import copy
import math

import pytest
import torch
from conftest import assert_same_state, state_hash, train_pair

import graphmerge as gm
from graphmerge.evaluation import accuracy_barrier, alpha_grid, interpolation_curve, loss_barrier


@pytest.fixture(scope="module")
def trained(digits_flat):
    """Two digit MLPs from seeds 0 and 1, a Merger holding their statistics, and a
    fixed-order training loader (what REPAIR needs)."""
    models = train_pair("mlp", {"hidden": (32, 32)}, [digits_flat] * 2, epochs=3, lr=0.1)
    fixed = torch.utils.data.DataLoader(digits_flat.train.dataset, batch_size=256, shuffle=False)
    merger = gm.Merger(models, example_input=next(iter(fixed))[0], progress=False)
    merger.collect(digits_flat.train)
    return digits_flat, models, merger, fixed


def excess_by_hand(alphas, values):
    line = [(1 - a) * values[0] + a * values[-1] for a in alphas]
    return max(0.0, *(v - y for v, y in zip(values, line, strict=True)))


# barriers: (alphas, losses, loss barrier)
LOSS_CASES = [
    ([0, 0.5, 1], [0.1, 0.7, 0.2], 0.55),  # line at 0.5: 0.15
    ([0, 0.25, 0.5, 1], [1.0, 2.0, 1.2, 3.0], 0.5),  # line 1 + 2 alpha; max at alpha 0.25
    ([0, 0.5, 1], [1.0, 0.5, 1.0], 0.0),  # below the line: no barrier
    ([0, 1], [3.0, 1.0], 0.0),  # the endpoints alone
]


@pytest.mark.parametrize(("alphas", "losses", "barrier"), LOSS_CASES)
def test_loss_barrier_by_hand(alphas, losses, barrier):
    assert loss_barrier(alphas, losses) == pytest.approx(barrier, abs=1e-12)


def test_accuracy_barrier_by_hand():
    # line at 0.5: 0.85, shortfall 0.25; at 0.25: line 0.875, shortfall 0.075
    assert accuracy_barrier([0, 0.25, 0.5, 1], [0.9, 0.8, 0.6, 0.8]) == pytest.approx(0.25)
    assert accuracy_barrier([0, 0.5, 1], [0.9, 0.95, 0.8]) == 0.0  # above the line
    assert accuracy_barrier((0.0, 1.0), (0.5, 0.7)) == 0.0


@pytest.mark.parametrize(
    ("alphas", "values", "error", "message"),
    [
        ([0.1, 0.5, 1], [1, 2, 3], ValueError, r"alphas must ascend from 0 to 1"),
        ([0, 0.5, 0.9], [1, 2, 3], ValueError, r"alphas must ascend from 0 to 1"),
        ([0, 0.7, 0.5, 1], [1, 2, 3, 4], ValueError, r"alphas must ascend from 0 to 1"),
        ([0, 0.5, 0.5, 1], [1, 2, 3, 4], ValueError, r"alphas must ascend from 0 to 1"),
        ([1, 0], [1, 2], ValueError, r"alphas must ascend from 0 to 1"),
        ([0, 0.5, 1], [1, 2], ValueError, r"need one value per alpha.*3 alphas and 2 values"),
        ([0], [1], ValueError, r"at least 2 points"),
        ([0, 0.5, 1], [1, float("nan"), 2], FloatingPointError, r"NaN or Inf"),
        ([0, 0.5, 1], [1, 2, float("inf")], FloatingPointError, r"NaN or Inf"),
    ],
)
def test_barrier_errors(alphas, values, error, message):
    for barrier in (loss_barrier, accuracy_barrier):
        with pytest.raises(error, match=message):
            barrier(alphas, values)


def test_alpha_grid():
    assert alpha_grid(2) == [0.0, 1.0]
    assert alpha_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = alpha_grid(11)
    assert len(grid) == 11 and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(abs(a - i / 10) < 1e-15 for i, a in enumerate(grid))
    for bad in (1, 0, -3, 2.0, True, "5"):
        with pytest.raises(ValueError, match="needs points >= 2"):
            alpha_grid(bad)


def test_curve_labels_rows_and_barriers_of_a_hand_made_curve():
    curve = gm.evaluation.Curve("permute", "repair", [0, 0.5, 1], [0.9, 0.6, 0.8], [0.3, 1.2, 0.4])
    assert curve.label == "permute + repair"
    assert gm.evaluation.Curve("zip", None, [0, 1], [1, 1], [0, 0]).label == "zip"
    assert curve.barrier == pytest.approx(1.2 - 0.35)
    assert curve.accuracy_barrier == pytest.approx(0.85 - 0.6)
    assert curve.rows()[1] == {
        "method": "permute", "normalize": "repair", "alpha": 0.5, "accuracy": 0.6, "loss": 1.2
    }  # fmt: skip
    assert [row["alpha"] for row in curve.rows()] == [0, 0.5, 1]


def test_best_picks_the_lowest_loss_or_the_highest_accuracy():
    curve = gm.evaluation.Curve(
        "permute", None, [0, 0.25, 0.5, 0.75, 1], [0.8, 0.85, 0.9, 0.7, 0.6],
        [0.5, 0.2, 0.3, 0.9, 0.25],
    )  # fmt: skip
    assert curve.best() == gm.evaluation.CurvePoint(index=1, alpha=0.25, accuracy=0.85, loss=0.2)
    assert curve.best("accuracy") == gm.evaluation.CurvePoint(2, 0.5, 0.9, 0.3)
    with pytest.raises(ValueError, match="metric must be one of loss, accuracy, got 'acc'"):
        curve.best("acc")
    nan = gm.evaluation.Curve("permute", None, [0, 0.5, 1], [0.8, 0.9, 0.7], [0.5, math.nan, 1])
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        nan.best()


def test_best_breaks_ties_by_the_other_metric_then_the_smaller_alpha():
    alphas = [0, 0.5, 1]
    ties = gm.evaluation.Curve("permute", None, alphas, [0.9, 0.9, 0.8], [0.4, 0.3, 0.3])
    assert ties.best("accuracy").alpha == 0.5  # equal accuracy: the lower loss
    assert ties.best("loss").alpha == 0.5  # equal loss: the higher accuracy
    flat = gm.evaluation.Curve("identity", None, alphas, [0.7, 0.7, 0.7], [0.3, 0.3, 0.3])
    assert flat.best("loss").index == flat.best("accuracy").index == 0


def test_best_point_of_a_trained_curve_rebuilds_with_merge(trained):
    data, _, merger, _ = trained
    curve = interpolation_curve(merger, data.test, "identity", points=5)
    point = curve.best("loss")
    assert point.loss == min(curve.losses) and point.alpha == curve.alphas[point.index]
    assert point.alpha in (0.0, 1.0)  # unaligned: the middle of the path is worse
    rebuilt = merger.merge("identity", weights=point.alpha).model
    metrics = gm.evaluation.evaluate(rebuilt, data.test)
    assert metrics["loss"] == pytest.approx(point.loss, abs=1e-9)
    assert metrics["accuracy"] == pytest.approx(point.accuracy, abs=1e-9)
    assert curve.best("accuracy").accuracy == max(curve.accuracies)


def test_identity_curve_runs_from_model_0_to_model_1_through_the_plain_average(trained):
    data, models, merger, _ = trained
    curve = interpolation_curve(merger, data.test, "identity", points=3)
    assert curve.method == "identity" and curve.normalize is None and curve.label == "identity"
    assert curve.alphas == [0.0, 0.5, 1.0] and curve.seconds > 0
    for index, model in ((0, models[0]), (-1, models[1])):
        reference = gm.evaluation.evaluate(model, data.test)
        assert curve.accuracies[index] == pytest.approx(reference["accuracy"], abs=1e-6)
        assert curve.losses[index] == pytest.approx(reference["loss"], abs=1e-6)
    average = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    average.load_state_dict({key: (states[0][key] + states[1][key]) / 2 for key in states[0]})
    middle = gm.evaluation.evaluate(average, data.test)
    assert curve.accuracies[1] == pytest.approx(middle["accuracy"], abs=1e-6)
    assert curve.losses[1] == pytest.approx(middle["loss"], abs=1e-6)
    assert curve.barrier == pytest.approx(excess_by_hand(curve.alphas, curve.losses), abs=1e-12)
    assert curve.barrier > 0.1  # two seeds: plain averaging costs loss


def test_permuted_curve_has_a_lower_barrier_than_the_identity_curve(trained):
    data, models, merger, _ = trained
    curves = {
        m: interpolation_curve(merger, data.test, m, points=5) for m in ("identity", "permute")
    }
    permute = curves["permute"]
    for index, model in ((0, models[0]), (-1, models[1])):  # alignment keeps the endpoints
        assert permute.losses[index] == pytest.approx(
            gm.evaluation.evaluate(model, data.test)["loss"], abs=1e-6
        )
    assert permute.barrier < 0.5 * curves["identity"].barrier, curves
    assert permute.accuracy_barrier < curves["identity"].accuracy_barrier, curves


def test_repaired_curve_meets_the_endpoints_and_lowers_the_midpoint_loss(trained):
    data, models, merger, fixed = trained
    plain = interpolation_curve(merger, data.test, "permute", alphas=[0, 0.5, 1])
    curve = interpolation_curve(
        merger, data.test, "permute", normalize="repair", loader=fixed, alphas=[0, 0.5, 1]
    )
    assert curve.label == "permute + repair" and curve.alphas == [0.0, 0.5, 1.0]
    assert all(math.isfinite(v) for v in curve.losses + curve.accuracies)
    # at alpha 0 and 1 the targets are the endpoint's own statistics: nothing to correct
    for index, model in ((0, models[0]), (-1, models[1])):
        reference = gm.evaluation.evaluate(model, data.test)
        assert curve.losses[index] == pytest.approx(reference["loss"], abs=1e-4)
        assert curve.accuracies[index] == pytest.approx(reference["accuracy"], abs=1e-6)
    middle = merger.merge("permute", weights=0.5, normalize="repair", loader=fixed).model
    assert curve.losses[1] == pytest.approx(
        gm.evaluation.evaluate(middle, data.test)["loss"], abs=1e-6
    )
    assert curve.losses[1] < plain.losses[1], (curve, plain)


def test_curve_errors(trained):
    data, _, merger, _ = trained
    with pytest.raises(ValueError, match="alphas must start at 0 and end at 1"):
        interpolation_curve(merger, data.test, alphas=[0.2, 1])
    with pytest.raises(ValueError, match="alphas must start at 0 and end at 1"):
        interpolation_curve(merger, data.test, alphas=[0, 0.5])
    with pytest.raises(ValueError, match="alphas must ascend"):
        interpolation_curve(merger, data.test, alphas=[0, 0.7, 0.3, 1])
    with pytest.raises(ValueError, match="needs points >= 2"):
        interpolation_curve(merger, data.test, points=1)
    with pytest.raises(ValueError, match="normalize='repair' needs data: pass loader="):
        interpolation_curve(merger, data.test, "permute", normalize="repair")
    three = [gm.models.build("mlp", hidden=(8,), seed=s) for s in range(3)]
    trio = gm.Merger(three, example_input=torch.randn(4, 64), progress=False)
    with pytest.raises(ValueError, match="runs between 2 models, this merger holds 3"):
        interpolation_curve(trio, data.test)


# Merger.reweight: the same matching folded with other model weights


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_reweight_is_a_merge_with_those_weights(trained, method):
    _, _, merger, _ = trained
    aligned = merger.merge(method)
    before = state_hash(aligned.model)
    again = merger.reweight(aligned, 0.3)
    assert_same_state(again.model, merger.merge(method, weights=0.3).model)
    assert torch.equal(again.weights, torch.tensor([0.7, 0.3], dtype=torch.float64))
    assert again.method == method and again.merged == aligned.merged
    assert again.model is not aligned.model
    assert state_hash(aligned.model) == before and aligned.weights is None  # untouched
    assert_same_state(merger.reweight(again, None).model, aligned.model)
    assert_same_state(
        merger.reweight(aligned, [0.25, 0.75]).model,
        merger.merge(method, weights=[0.25, 0.75]).model,
    )


def test_reweight_with_repair_equals_a_repaired_merge(trained):
    _, _, merger, fixed = trained
    aligned = merger.merge("permute")
    again = merger.reweight(aligned, 0.3, normalize="repair", loader=fixed)
    direct = merger.merge("permute", weights=0.3, normalize="repair", loader=fixed)
    assert again.normalize == "repair" and "normalization" not in aligned.details
    assert isinstance(again.details["normalization"], gm.normalization.Renormalized)
    plain = merger.reweight(aligned, 0.3).model.state_dict()
    ours, theirs = again.model.state_dict(), direct.model.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6, rtol=0), key
    assert any(not torch.allclose(ours[key], plain[key]) for key in ours)  # REPAIR changed it
    with pytest.raises(ValueError, match="normalize='repair' needs data"):
        merger.reweight(aligned, 0.3, normalize="repair")
    with pytest.raises(ValueError, match="unknown normalization 'repiar'"):
        merger.reweight(aligned, 0.3, normalize="repiar", loader=fixed)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        merger.reweight(aligned, 1.5)
