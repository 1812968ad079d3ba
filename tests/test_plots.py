"""Plots: each writes a PNG atomically and returns the Figure with the expected artists."""

import os

import numpy as np
import pytest
from matplotlib.figure import Figure

import graphmerge as gm
from graphmerge.evaluation import Curve
from graphmerge.plots import plot_comparison, plot_curves, plot_width

PNG = b"\x89PNG\r\n\x1a\n"

CURVES = [
    Curve("identity", None, [0, 0.5, 1], [0.9, 0.5, 0.8], [0.3, 1.2, 0.4]),
    Curve("permute", "repair", [0, 0.25, 0.5, 1], [0.9, 0.85, 0.8, 0.8], [0.3, 0.4, 0.5, 0.4]),
]


def baseline(name, kind, accuracy, loss):
    return {"name": name, "kind": kind, "accuracy": accuracy, "loss": loss,
            "mean_task_accuracy": None}  # fmt: skip


def merge_row(method, normalize, accuracy, loss, **extra):
    row = {"name": method if normalize == "none" else f"{method} + {normalize}", "kind": "merge",
           "method": method, "normalize": normalize, "start_at": None, "stop_at": None,
           "accuracy": accuracy, "loss": loss, "mean_task_accuracy": None}  # fmt: skip
    row.update(extra)
    return row


COMPARISON = [
    baseline("model 0", "model", 0.95, 0.2),
    baseline("model 1", "model", 0.93, 0.25),
    baseline("ensemble", "ensemble", 0.96, 0.15),
    merge_row("identity", "none", 0.40, 1.5),
    merge_row("identity", "repair", 0.60, 1.1),
    merge_row("permute", "none", 0.80, 0.7),
    merge_row("permute", "repair", 0.90, 0.4),
    merge_row("zip", "none", 0.85, 0.5, stop_at=1),  # a group with one normalization only
]


def width_rows():
    rows = [baseline("ensemble", "ensemble", 0.96, 0.15)]
    for series, widths, accuracies in (
        ("stop_at", [64, 48, 32], [0.96, 0.9, 0.8]),
        ("start_at", [32, 48, 64], [0.8, 0.88, 0.96]),
        ("zip reduction", [48, 64, 32], [0.91, 0.96, 0.82]),  # unsorted widths
    ):
        for width, accuracy in zip(widths, accuracies, strict=True):
            rows.append(merge_row("zip", "none", accuracy, 1 - accuracy, series=series,
                                  merged_width=width))  # fmt: skip
    return rows


def check_png(path):
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 1000
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_plot_curves(tmp_path):
    path = tmp_path / "curves.png"
    figure = plot_curves(CURVES, path, title="two curves")
    assert isinstance(figure, Figure)
    check_png(path)
    loss_axes, accuracy_axes = figure.axes
    assert len(loss_axes.lines) == len(accuracy_axes.lines) == 2
    assert list(loss_axes.lines[1].get_xdata()) == [0, 0.25, 0.5, 1]
    assert list(loss_axes.lines[0].get_ydata()) == [0.3, 1.2, 0.4]
    assert np.allclose(accuracy_axes.lines[0].get_ydata(), [90, 50, 80])  # percent
    labels = [text.get_text() for text in loss_axes.get_legend().get_texts()]
    # identity: the line at 0.5 is 0.35, the barrier 1.2 - 0.35; permute: 0.5 - 0.35
    assert labels == ["identity (barrier 0.850)", "permute + repair (barrier 0.150)"]
    assert figure.get_suptitle() == "two curves"
    assert len(plot_curves(CURVES[:1]).axes[0].lines) == 1  # no path: nothing written
    with pytest.raises(ValueError, match="needs at least one Curve"):
        plot_curves([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_plot_comparison(tmp_path):
    path = tmp_path / "comparison.png"
    figure = plot_comparison(COMPARISON, path)
    assert isinstance(figure, Figure)
    check_png(path)
    (axes,) = figure.axes
    bars = [patch for container in axes.containers for patch in container]
    assert len(axes.containers) == 2  # one bar series per normalization
    assert len(bars) == 5  # identity, permute, zip (stop_at=1) without; identity, permute with
    heights = sorted(round(bar.get_height(), 6) for bar in bars)
    assert heights == [40.0, 60.0, 80.0, 85.0, 90.0]
    assert len(axes.lines) == 3  # model 0, model 1, ensemble as horizontal lines
    assert sorted(line.get_ydata()[0] for line in axes.lines) == pytest.approx([93, 95, 96])
    ticks = [label.get_text() for label in axes.get_xticklabels()]
    assert ticks == ["identity", "permute", "zip (stop_at=1)"]
    losses = plot_comparison(COMPARISON, tmp_path / "loss.png", metric="loss").axes[0]
    loss_bars = sorted(round(p.get_height(), 6) for c in losses.containers for p in c)
    assert loss_bars == [0.4, 0.5, 0.7, 1.1, 1.5]  # losses are not percentages


def test_plot_comparison_errors(tmp_path):
    with pytest.raises(ValueError, match="metric must be one of accuracy, loss, mean_task_acc"):
        plot_comparison(COMPARISON, tmp_path / "x.png", metric="f1")
    with pytest.raises(ValueError, match="needs rows of merged models"):
        plot_comparison(COMPARISON[:3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="needs rows of merged models"):
        plot_comparison([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"a row \(identity\) has no 'mean_task_accuracy'"):
        plot_comparison(COMPARISON, tmp_path / "x.png", metric="mean_task_accuracy")
    assert os.listdir(tmp_path) == []


def test_plot_width(tmp_path):
    path = tmp_path / "width.png"
    figure = plot_width(width_rows(), path)
    assert isinstance(figure, Figure)
    check_png(path)
    (axes,) = figure.axes
    assert len(axes.lines) == 4  # three series and the ensemble line
    series = {line.get_label(): line for line in axes.lines}
    assert set(series) == {"stop_at", "start_at", "zip reduction", "ensemble"}
    zipped = series["zip reduction"]
    assert list(zipped.get_xdata()) == [32, 48, 64]  # sorted by width
    assert np.allclose(zipped.get_ydata(), [82, 91, 96])
    assert np.allclose(series["ensemble"].get_ydata(), [96, 96])
    plain = [{**row, "series": None} for row in width_rows()]  # no series: one per method
    assert len(plot_width(plain).axes[0].lines) == 2


def test_plot_width_errors(tmp_path):
    with pytest.raises(ValueError, match="metric must be one of"):
        plot_width(width_rows(), tmp_path / "x.png", metric="width")
    with pytest.raises(ValueError, match="needs rows of merged models"):
        plot_width([], tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_plots_of_a_real_comparison(tmp_path, digits_flat):
    models = [gm.models.build("mlp", hidden=(8,), seed=seed) for seed in (0, 1)]  # untrained
    merger = gm.Merger(models, example_input=next(iter(digits_flat.test))[0], progress=False)
    merger.collect(digits_flat.test)
    table = gm.comparison.compare(merger, digits_flat.test, ["identity", "permute"],
                                  progress=False)  # fmt: skip
    figure = plot_comparison(table.rows, tmp_path / "table.png")
    assert len([p for c in figure.axes[0].containers for p in c]) == 2
    assert len(figure.axes[0].lines) == 3
    sweep = gm.comparison.width_sweep(merger, digits_flat.test, "permute", progress=False)
    lines = plot_width(sweep.rows, tmp_path / "sweep.png").axes[0].lines
    assert [line.get_label() for line in lines] == ["stop_at", "start_at", "ensemble"]
    assert sorted(os.listdir(tmp_path)) == ["sweep.png", "table.png"]
    assert all((tmp_path / name).read_bytes().startswith(PNG) for name in os.listdir(tmp_path))
