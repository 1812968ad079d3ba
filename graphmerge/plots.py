"""Plots (matplotlib, PNG): interpolation curves, comparison bar charts, accuracy vs width.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no
display needed) and written atomically. Each function returns the figure, so a
notebook can show or restyle it.

Example:
    >>> gm.plots.plot_curves([identity_curve, permute_curve], "curves.png")
    >>> gm.plots.plot_comparison(table.rows, "comparison.png")
    >>> gm.plots.plot_width(sweep.rows, "width.png")
    >>> gm.plots.plot_barriers(gm.connectivity.train_with_barriers(...).rows, "barriers.png")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from graphmerge._atomic import atomic_write
from graphmerge.evaluation import Curve

METRICS = {
    "accuracy": "test accuracy (%)",
    "loss": "test loss",
    "mean_task_accuracy": "mean task accuracy (%)",
}
PERCENT_METRICS = ("accuracy", "mean_task_accuracy")


def _figure(columns: int = 1) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "plots need matplotlib: pip install 'graphmerge[plots]' (or matplotlib)"
        ) from error
    figure = Figure(figsize=(5.5 * columns, 4.2), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _save(figure: Any, path: str | os.PathLike | None) -> None:
    if path is not None:
        with atomic_write(path) as handle:
            figure.savefig(handle, format="png", dpi=120)


def _value(row: Mapping[str, Any], metric: str) -> float:
    value = row.get(metric)
    if value is None:
        raise ValueError(f"a row ({row.get('name', '?')}) has no {metric!r} value to plot")
    return 100 * value if metric in PERCENT_METRICS else value


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def plot_curves(
    curves: Sequence[Curve], path: str | os.PathLike | None = None, title: str | None = None
) -> Any:
    """Test loss and accuracy against alpha, one line per curve (barrier in the legend)."""
    if not curves:
        raise ValueError("plot_curves needs at least one Curve")
    figure, (loss_axes, accuracy_axes) = _figure(columns=2)
    for curve in curves:
        label = f"{curve.label} (barrier {curve.barrier:.3f})"
        loss_axes.plot(curve.alphas, curve.losses, marker="o", markersize=3, label=label)
        accuracy_axes.plot(
            curve.alphas, [100 * a for a in curve.accuracies], marker="o", markersize=3,
            label=curve.label,
        )  # fmt: skip
    panels = ((loss_axes, METRICS["loss"]), (accuracy_axes, METRICS["accuracy"]))
    return _finish_panels(figure, panels, "alpha (weight of model 1)", title, path)


def plot_comparison(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    metric: str = "accuracy",
    title: str | None = None,
) -> Any:
    """Grouped bars: one group per method (and scope), one bar per normalization; the
    endpoints and the ensemble (rows of kind "model" / "ensemble") as horizontal lines."""
    _check_metric(metric)
    merges = [row for row in rows if row.get("kind") == "merge"]
    if not merges:
        raise ValueError("plot_comparison needs rows of merged models (kind 'merge')")
    groups = list(dict.fromkeys(_group(row) for row in merges))
    normalizations = list(dict.fromkeys(row["normalize"] for row in merges))
    figure, (axes,) = _figure()
    figure.set_size_inches(max(6.5, 0.9 * len(groups) + 3.5), 4.2)
    width = 0.8 / len(normalizations)
    for offset, normalize in enumerate(normalizations):
        chosen = {_group(row): row for row in merges if row["normalize"] == normalize}
        positions = [i for i, group in enumerate(groups) if group in chosen]
        values = [_value(chosen[groups[i]], metric) for i in positions]
        axes.bar(
            [i - 0.4 + width * (offset + 0.5) for i in positions], values, width,
            label=f"normalize: {normalize}",
        )  # fmt: skip
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))] * 4)
    for row in rows:
        if row.get("kind") in ("model", "ensemble") and row.get(metric) is not None:
            axes.axhline(_value(row, metric), color="gray", linestyle=next(styles),
                         linewidth=1, label=row["name"])  # fmt: skip
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes.set_ylabel(METRICS[metric])
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        axes.set_title(title)
    _save(figure, path)
    return figure


def _group(row: Mapping[str, Any]) -> str:
    scope = ", ".join(
        f"{key}={row[key]}" for key in ("start_at", "stop_at") if row.get(key) is not None
    )
    return f"{row['method']} ({scope})" if scope else str(row["method"])


def plot_width(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    metric: str = "accuracy",
    title: str | None = None,
) -> Any:
    """Accuracy (or ``metric``) against the merged model's total width, one line per
    ``series`` (rows of ``gm.comparison.width_sweep``); baselines as horizontal lines."""
    _check_metric(metric)
    points = [row for row in rows if row.get("kind") == "merge"]
    if not points:
        raise ValueError("plot_width needs rows of merged models (kind 'merge')")
    figure, (axes,) = _figure()
    for series in dict.fromkeys(row.get("series") or row["method"] for row in points):
        chosen = sorted(
            (row for row in points if (row.get("series") or row["method"]) == series),
            key=lambda row: row["merged_width"],
        )
        axes.plot([row["merged_width"] for row in chosen], [_value(r, metric) for r in chosen],
                  marker="o", markersize=4, label=series)  # fmt: skip
    for row in rows:
        if row.get("kind") == "ensemble":
            axes.axhline(_value(row, metric), color="gray", linestyle="--", linewidth=1,
                         label="ensemble")  # fmt: skip
    axes.set_xlabel("merged width (hidden units over all mergeable spaces)")
    axes.set_ylabel(METRICS[metric])
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title)
    _save(figure, path)
    return figure


def plot_barriers(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Any:
    """Loss and accuracy barrier against training progress, one line per alignment
    (rows of ``gm.connectivity.train_with_barriers``)."""
    if not rows:
        raise ValueError("plot_barriers needs rows (gm.connectivity.train_with_barriers(...).rows)")
    missing = {"progress", "align", "barrier_loss", "barrier_accuracy"} - set(rows[0])
    if missing:
        raise ValueError(f"plot_barriers needs rows with {sorted(missing)}: rows of "
                         "gm.connectivity.train_with_barriers")  # fmt: skip
    figure, (loss_axes, accuracy_axes) = _figure(columns=2)
    for align in dict.fromkeys(row["align"] for row in rows):
        chosen = sorted((row for row in rows if row["align"] == align), key=lambda r: r["progress"])
        progress = [100 * row["progress"] for row in chosen]
        label = "unaligned" if align == "identity" else f"{align}-aligned"
        loss_axes.plot(progress, [row["barrier_loss"] for row in chosen], marker="o",
                       markersize=3, label=label)  # fmt: skip
        accuracy_axes.plot(progress, [100 * row["barrier_accuracy"] for row in chosen],
                           marker="o", markersize=3, label=label)  # fmt: skip
    panels = ((loss_axes, "loss barrier"), (accuracy_axes, "accuracy barrier (points)"))
    return _finish_panels(figure, panels, "training progress (%)", title, path)


def _finish_panels(
    figure: Any,
    panels: Sequence[tuple[Any, str]],
    xlabel: str,
    title: str | None,
    path: str | os.PathLike | None,
) -> Any:
    """Labels and grids of side-by-side panels, the legend on the first, then save."""
    for axes, ylabel in panels:
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    _save(figure, path)
    return figure


def plot_variance_ratios(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    column: str = "var_ratio",
    title: str | None = None,
) -> Any:
    """Variance ratio (merged / source, or ``column``: ``rms_ratio``) against depth, one line
    per method and normalization (rows of ``gm.diagnostics``); a dotted line at 1.

    Example:
        >>> gm.plots.plot_variance_ratios(gm.diagnostics.diagnose([a, b], loader).rows, "v.png")
    """
    if column not in ("var_ratio", "rms_ratio"):
        raise ValueError(f"column must be 'var_ratio' or 'rms_ratio', got {column!r}")
    if not rows:
        raise ValueError("plot_variance_ratios needs rows (from gm.diagnostics)")
    figure, (axes,) = _figure()
    labels = {}
    for row in rows:
        labels.setdefault(_variant(row), []).append(row)
    for label, chosen in labels.items():
        chosen = sorted(chosen, key=lambda row: row["depth"])
        axes.plot([row["depth"] for row in chosen], [row[column] for row in chosen],
                  marker="o", markersize=3, label=label)  # fmt: skip
    first = next(iter(labels.values()))
    names = [row["point"] for row in sorted(first, key=lambda row: row["depth"])]
    axes.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes.set_xlabel("depth (merge point)")
    axes.set_ylabel("variance ratio (merged / sources)" if column == "var_ratio"
                    else "RMS ratio (merged / sources)")  # fmt: skip
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title)
    _save(figure, path)
    return figure


def _variant(row: Mapping[str, Any]) -> str:
    """``"permute"``, ``"permute + repair"``; the normalization alone without a method."""
    normalize, method = row.get("normalize") or "none", row.get("method")
    if method is None:
        return normalize
    return method if normalize == "none" else f"{method} + {normalize}"
