"""Barriers during training: train_with_barriers trains as gm.training.train does, and
measures the barrier of the models it holds at each progress point."""

import inspect
import math

import pytest
import torch
from conftest import assert_same_state, state_hash

import graphmerge as gm
from graphmerge import connectivity
from graphmerge.evaluation import interpolation_curve, loss_barrier

EPOCHS, LR, POINTS = 3, 0.1, 5


def mlps(data, seeds=(0, 1), hidden=(32, 32)):
    fixed = gm.models.data_kwargs("mlp", data.input_shape, data.num_classes)
    return [gm.models.build("mlp", hidden=hidden, seed=seed, **fixed) for seed in seeds]


@pytest.fixture(scope="module")
def fixed_order(digits_flat):
    """The training set in a fixed order: statistics that do not depend on a shuffle."""
    return torch.utils.data.DataLoader(digits_flat.train.dataset, batch_size=256, shuffle=False)


@pytest.fixture(scope="module")
def run(digits_flat, fixed_order):
    """Two digit MLPs (seeds 0, 1) trained 3 epochs, barriers every quarter, both ways."""
    models = mlps(digits_flat)
    hashes = [state_hash(model) for model in models]
    result = gm.connectivity.train_with_barriers(
        models, digits_flat.train, digits_flat.test, epochs=EPOCHS, lr=LR, every=0.25,
        align=[None, "permute"], loader=fixed_order, points=POINTS, progress=False,
    )  # fmt: skip
    return models, hashes, result


def test_rows_at_the_requested_progress_points(digits_flat, run):
    _, _, result = run
    per_epoch = len(digits_flat.train)
    total = EPOCHS * per_epoch
    assert result.alignments == ["identity", "permute"]
    assert len(result.rows) == len(result.curves) == 10
    for align in (None, "permute"):
        rows = result.series(align)
        assert [row["progress"] for row in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert [row["step"] for row in rows] == [round(p * total) for p in (0, 0.25, 0.5, 0.75, 1)]
        assert [row["epoch"] for row in rows] == [row["step"] / per_epoch for row in rows]
        assert rows[-1]["epoch"] == EPOCHS
    for row, curve in zip(result.rows, result.curves, strict=True):
        assert curve.method == row["align"] and curve.alphas == [0, 0.25, 0.5, 0.75, 1]
        for key in ("barrier_loss", "barrier_accuracy", "loss_0", "loss_1", "loss_mid"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        # the barrier is the curve's, measured above the line between the endpoints
        line = [(1 - a) * curve.losses[0] + a * curve.losses[-1] for a in curve.alphas]
        excess = max(loss - y for loss, y in zip(curve.losses, line, strict=True))
        assert row["barrier_loss"] == pytest.approx(max(0.0, excess), abs=1e-12)
        assert row["loss_mid"] == curve.losses[2]
        # the curve runs between the endpoints evaluated on their own
        assert curve.losses[0] == pytest.approx(row["loss_0"], abs=1e-5)
        assert curve.losses[-1] == pytest.approx(row["loss_1"], abs=1e-5)
    assert len(result.histories) == 2 and [h["epoch"] for h in result.histories[0]] == [1, 2, 3]


def test_the_first_row_measures_the_initial_models(digits_flat, run):
    models, _, result = run
    first = result.rows[0]
    for index in (0, 1):
        reference = gm.evaluation.evaluate(models[index], digits_flat.test)
        assert first[f"loss_{index}"] == reference["loss"]
        assert first[f"accuracy_{index}"] == reference["accuracy"]


def test_the_last_row_is_the_barrier_of_the_trained_models(digits_flat, fixed_order, run):
    _, _, result = run
    merger = gm.Merger(result.models, example_input=next(iter(fixed_order))[0], progress=False)
    merger.collect(fixed_order)
    for align, method in ((None, "identity"), ("permute", "permute")):
        curve = interpolation_curve(merger, digits_flat.test, method, points=POINTS)
        last = result.series(align)[-1]
        assert last["barrier_loss"] == pytest.approx(loss_barrier(curve.alphas, curve.losses))
        assert last["barrier_accuracy"] == pytest.approx(curve.accuracy_barrier)
        assert (
            last["accuracy_0"]
            == gm.evaluation.evaluate(result.models[0], digits_flat.test)["accuracy"]
        )


def test_aligned_barrier_ends_below_the_unaligned_one(run):
    _, _, result = run
    plain, permuted = result.series(None)[-1], result.series("permute")[-1]
    assert plain["barrier_loss"] > 0.3, plain  # measured 0.65: a real barrier
    assert permuted["barrier_loss"] < 0.5 * plain["barrier_loss"], (plain, permuted)  # 0.15
    assert permuted["loss_mid"] < plain["loss_mid"]
    # the unaligned barrier grows out of nothing as the runs part
    series = [row["barrier_loss"] for row in result.series(None)]
    assert series[0] < 0.05 and series[-1] > series[1]


def test_the_runs_train_as_gm_training_train_and_leave_the_callers_models_alone(digits_flat, run):
    models, hashes, result = run
    assert [state_hash(model) for model in models] == hashes
    for index, (model, seed) in enumerate(zip(models, (0, 1), strict=True)):
        assert result.models[index] is not model and not result.models[index].training
        alone = gm.training.train(
            model, digits_flat.train, epochs=EPOCHS, lr=LR, seed=seed, progress=False
        )
        assert_same_state(result.models[index], alone.model)  # bit for bit
        assert result.histories[index] == alone.history


def test_a_checkpoint_inside_training_holds_the_model_trained_so_far(digits_flat):
    # with a constant rate and no warm-up, the first epoch of a 2-epoch run is a 1-epoch run
    models = mlps(digits_flat, hidden=(16,))
    options = {"lr": LR, "schedule": "constant", "warmup_epochs": 0, "progress": False}
    result = gm.connectivity.train_with_barriers(
        models, digits_flat.train, digits_flat.test, epochs=2, every=0.5, points=2, **options
    )
    middle = result.rows[1]
    assert middle["progress"] == 0.5 and middle["epoch"] == 1.0
    for index, seed in ((0, 0), (1, 1)):
        one_epoch = gm.training.train(models[index], digits_flat.train, epochs=1, seed=seed,
                                      **options).model  # fmt: skip
        assert (
            middle[f"loss_{index}"] == gm.evaluation.evaluate(one_epoch, digits_flat.test)["loss"]
        )
    assert result.rows[1]["loss_0"] != result.rows[2]["loss_0"]


def test_deterministic_for_given_seeds_and_different_for_others(digits_flat):
    models = mlps(digits_flat, hidden=(16,))
    options = {"epochs": 1, "lr": LR, "every": 0.5, "points": 3, "align": "weight_matching",
               "progress": False}  # fmt: skip
    first = gm.connectivity.train_with_barriers(
        models, digits_flat.train, digits_flat.test, **options
    )
    again = gm.connectivity.train_with_barriers(
        models, digits_flat.train, digits_flat.test, **options
    )
    assert first.rows == again.rows
    for ours, theirs in zip(first.models, again.models, strict=True):
        assert_same_state(ours, theirs)
    other = gm.connectivity.train_with_barriers(
        models, digits_flat.train, digits_flat.test, seeds=(0, 2), **options
    )
    assert other.rows[0] == first.rows[0]  # same initial models
    assert other.rows[-1]["loss_1"] != first.rows[-1]["loss_1"]
    assert other.rows[-1]["loss_0"] == first.rows[-1]["loss_0"]  # run 0 did not change


def test_one_initial_model_starts_both_runs_on_a_zero_barrier(digits_flat):
    (model,) = mlps(digits_flat, seeds=(0,), hidden=(16,))
    before = torch.get_rng_state()
    result = gm.connectivity.train_with_barriers(
        model, digits_flat.train, digits_flat.test, epochs=1, lr=LR, every=1, points=3,
        progress=False,
    )  # fmt: skip
    assert torch.equal(torch.get_rng_state(), before)  # each run draws from its own stream
    start, end = result.rows
    assert start["barrier_loss"] == 0 and start["loss_0"] == start["loss_1"]
    assert end["loss_0"] != end["loss_1"]  # different data order: different models


def test_interleaved_training_runs_train_as_train_does(digits_flat):
    # the step-by-step runs train_with_barriers drives: stopped mid-epoch, interleaved with
    # each other and with draws from the global RNG, each still trains train()'s weights
    models = mlps(digits_flat, hidden=(8,))
    subset = torch.utils.data.Subset(digits_flat.train.dataset, range(256))
    shuffled = torch.utils.data.DataLoader(subset, batch_size=64, shuffle=True)  # 4 steps
    options = {"epochs": 2, "lr": LR, "progress": False}
    runs = [gm.training.TrainingRun(m, shuffled, seed=s, **options)
            for m, s in zip(models, (0, 1), strict=True)]  # fmt: skip
    for step in (1, 3, 4, 7):
        for run in runs:
            torch.rand(5)
            run.advance(step)
            assert run.steps_done == step and not run.finished
    runs[0].advance(2)  # already there: nothing to do
    assert runs[0].steps_done == runs[0].total_steps - 1 and len(runs[0].history) == 1
    for run, model, seed in zip(runs, models, (0, 1), strict=True):
        alone = gm.training.train(model, shuffled, seed=seed, **options)
        trained = run.finish()
        assert run.finished and not trained.training and run.history == alone.history
        assert_same_state(trained, alone.model)


def test_a_training_run_checks_its_steps_and_stops_after_an_error(digits_flat):
    (model,) = mlps(digits_flat, seeds=(0,), hidden=(8,))
    run = gm.training.TrainingRun(model, digits_flat.train, epochs=1, progress=False)
    with pytest.raises(ValueError, match=rf"until_step must be in \[0, {run.total_steps}\]"):
        run.advance(run.total_steps + 1)
    with pytest.raises(TypeError, match="until_step must be a whole number"):
        run.advance(1.5)
    wild = gm.training.TrainingRun(model, digits_flat.train, lr=1e12, warmup_epochs=0,
                                   epochs=3, progress=False)  # fmt: skip
    with pytest.raises(FloatingPointError, match="training diverged"):
        wild.advance(wild.total_steps)
    with pytest.raises(RuntimeError, match="stopped with an error: start a new TrainingRun"):
        wild.finish()


def test_progress_points():
    points = connectivity._progress_points
    assert points(0.1, None) == [i / 10 for i in range(11)]
    assert points(1, None) == [0.0, 1.0]
    assert points(0.3, None) == [0.0, 0.3, 0.6, 0.9, 1.0]
    assert points(0.5, [0.05, 0.5]) == [0.0, 0.05, 0.5, 1.0]  # `at` wins; 0 and 1 added


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"every": 0}, ValueError, r"every must be a fraction of training in \(0, 1\]"),
        ({"every": 1.5}, ValueError, r"every must be a fraction"),
        ({"at": [0.5, 1.2]}, ValueError, r"at must hold fractions of training in \[0, 1\]"),
        ({"every": 0.01}, ValueError, r"two progress points fall on the same step: .*23 steps"),
        ({"align": "permutee"}, ValueError, r"permutee"),
        ({"align": ["permute", "permute"]}, ValueError, r"align names a method twice"),
        ({"align": []}, ValueError, r"align is empty"),
        ({"seeds": (0,)}, ValueError, r"seeds must be two whole numbers"),
        ({"epochs": 0}, ValueError, r"epochs must be a whole number >= 1"),
        ({"optimizer": "lion"}, ValueError, r"unknown optimizer 'lion'"),
        ({"lr": -1.0}, ValueError, r"lr must be a finite number > 0"),
    ],
)
def test_errors(digits_flat, options, error, message):
    models = mlps(digits_flat, hidden=(8,))
    with pytest.raises(error, match=message):
        gm.connectivity.train_with_barriers(
            models, digits_flat.train, digits_flat.test, **{"epochs": 1, **options}
        )


def test_needs_two_models(digits_flat):
    three = mlps(digits_flat, seeds=(0, 1, 2), hidden=(8,))
    with pytest.raises(ValueError, match=r"trains 2 models: pass two initial models.*got 3"):
        gm.connectivity.train_with_barriers(three, digits_flat.train, digits_flat.test)


def test_the_recipe_is_gm_training_trains():
    ours = inspect.signature(gm.connectivity.train_with_barriers).parameters
    theirs = inspect.signature(gm.training.train).parameters
    shared = set(ours) & set(theirs)
    assert set(theirs) - shared == {"model", "seed"}  # seeds= holds one seed per run
    for name in shared - {"train_loader", "test_loader"}:  # ours needs test data
        assert ours[name].default == theirs[name].default, name


def test_plot_barriers_writes_a_png_with_one_line_per_alignment(run, tmp_path):
    _, _, result = run
    path = tmp_path / "barriers.png"
    figure = gm.plots.plot_barriers(result.rows, path, title="digits MLP")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss_axes, accuracy_axes = figure.axes
    lines = loss_axes.get_lines()
    assert [line.get_label() for line in lines] == ["unaligned", "permute-aligned"]
    assert list(lines[1].get_xdata()) == [0, 25, 50, 75, 100]
    assert list(lines[1].get_ydata()) == [row["barrier_loss"] for row in result.series("permute")]
    assert list(accuracy_axes.get_lines()[0].get_ydata()) == [
        100 * row["barrier_accuracy"] for row in result.series(None)
    ]
    with pytest.raises(ValueError, match="plot_barriers needs rows"):
        gm.plots.plot_barriers([])
    with pytest.raises(ValueError, match=r"needs rows with \['barrier_accuracy'"):
        gm.plots.plot_barriers([{"progress": 0, "align": "x", "barrier_loss": 0}])
