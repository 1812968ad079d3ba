"""The comparison harness: a grid of methods x normalizations x scopes on one Merger.

Statistics are collected once (``Merger.collect``), each (method, scope) is matched
once, and each normalization is one fold plus its renormalization (REPAIR and RESCALE
share the source models' statistics through the merger's reference cache). The
result is a table: a list of dicts, one per row, with the endpoints and the ensemble
as baselines, writable as CSV and printable.

Example:
    >>> merger = gm.Merger([model_a, model_b], example_input=x)
    >>> merger.collect(train_loader)
    >>> table = gm.comparison.compare(merger, data.test, methods=["identity", "permute"],
    ...                               normalizations=[None, "repair"], loader=train_loader)
    >>> print(table.format()); table.write_csv("comparison.csv")
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from graphmerge import matching_functions, normalization
from graphmerge._atomic import atomic_write
from graphmerge.batches import labelled_batches
from graphmerge.evaluation import Ensemble, evaluate
from graphmerge.merge import OUTPUTS, Merger, MergeResult
from graphmerge.runtime import samples_at

DEFAULT_METHODS = ("identity", "permute", "zip", "cca", "weight_matching", "preserve_first")
COLUMNS = (
    "name", "kind", "method", "normalize", "start_at", "stop_at", "hparams", "merged_width",
    "accuracy", "loss", "mean_task_accuracy", "seconds_matching", "seconds_fold",
    "seconds_normalize", "seconds",
)  # fmt: skip


@dataclass(frozen=True)
class Scope:
    """Which mergeable spaces a grid entry merges: [start_at, stop_at) (None: the ends)."""

    start_at: int | str | None = None
    stop_at: int | str | None = None

    @property
    def label(self) -> str:
        parts = [f"{key}={value}" for key, value in vars(self).items() if value is not None]
        return ", ".join(parts)


@dataclass
class Comparison:
    """The rows of a comparison (dicts with the keys of ``COLUMNS`` and per-task accuracies)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def merges(self) -> list[dict[str, Any]]:
        """The rows of merged models (no endpoints, no ensemble)."""
        return [row for row in self.rows if row["kind"] == "merge"]

    def columns(self) -> list[str]:
        """COLUMNS in order, then any other key the rows hold (per-task accuracies)."""
        extra = [key for row in self.rows for key in row if key not in COLUMNS]
        return [*COLUMNS, *dict.fromkeys(extra)]

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write the rows as CSV, atomically (a temporary file, then a rename)."""
        write_csv(self.rows, path, self.columns())

    def format(self) -> str:
        """A plain-text table: name, accuracy (%), loss, mean task accuracy if any, seconds."""
        tasks = any(row.get("mean_task_accuracy") is not None for row in self.rows)
        header = ["name", "accuracy", "loss", *(["task avg"] if tasks else []), "merge s"]
        lines = [header]
        for row in self.rows:
            cells = [row["name"], f"{100 * row['accuracy']:.2f}%", f"{row['loss']:.4f}"]
            if tasks:
                cells.append(_percent(row.get("mean_task_accuracy")))
            cells.append("" if row["seconds"] is None else f"{row['seconds']:.2f}")
            lines.append(cells)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        formatted = [
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines
        ]  # fmt: skip
        formatted.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(formatted)


def write_csv(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    columns: Sequence[str] | None = None,
) -> None:
    """Write ``rows`` (dicts) as CSV with ``columns`` (default: every key, in first-seen
    order), atomically; missing values are left empty."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    unlisted = sorted({key for row in rows for key in row} - set(columns))
    if unlisted:
        raise ValueError(f"rows hold keys not among the columns: {', '.join(unlisted)}")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as handle:
        handle.write(text.getvalue())


def compare(
    merger: Merger,
    test_loader: Iterable,
    methods: Sequence[str] = DEFAULT_METHODS,
    normalizations: Sequence[str | None] = (None,),
    scopes: Sequence[Scope] = (Scope(),),
    loader: Iterable | None = None,
    output: str = "average",
    tasks: Sequence[Sequence[int]] | None = None,
    hparams: Mapping[str, Mapping[str, object]] | None = None,
    baselines: bool = True,
    progress: bool = True,
) -> Comparison:
    """Run every (method, scope, normalization) once and evaluate it on ``test_loader``.

    ``merger`` must hold statistics (``merger.collect``) unless every method is
    data-free (``weight_matching``); ``loader`` is the data for the normalizations
    (a fixed-order loader makes REPAIR exact). ``hparams`` maps a method to its
    hyper-parameters. ``tasks`` (output columns per task) adds per-task accuracies
    (joint-logit merges of models trained on different label sets: ``output="concat"``).
    ``baselines`` adds a row per source model and one for the ensemble.

    Example:
        >>> compare(merger, data.test, ["permute", "zip"], [None, "repair"],
        ...         scopes=[Scope(), Scope(stop_at=2)], loader=train_loader)
    """
    hparams = dict(hparams or {})
    _check_grid(merger, methods, normalizations, scopes, loader, output, hparams)
    table = Comparison()
    if baselines:
        table.rows.extend(_baselines(merger, test_loader, output, tasks))
    grid = [(method, scope) for method in methods for scope in scopes]
    bar = tqdm(total=len(grid) * len(normalizations), desc="compare", disable=not progress)
    with bar:
        for method, scope in grid:
            options = dict(hparams.get(method, {}))
            entry = matching_functions.entry(method)
            data = {"loader": loader} if entry.needs_loader else {}
            matched = merger.merge(
                method, start_at=scope.start_at, stop_at=scope.stop_at, output=output,
                **data, **options,
            )  # fmt: skip
            for normalize in normalizations:
                bar.set_postfix_str(_name(method, normalize, scope, options))
                if normalize is None:
                    result = matched
                elif entry.refits:  # a fold alone is not its model: normalize the model
                    result = merger.normalized(matched, normalize, loader)
                else:
                    result = merger.reweight(matched, matched.weights, normalize, loader)
                metrics = evaluate(result.model, test_loader, tasks=tasks)
                table.rows.append(_merge_row(result, scope, options, metrics))
                bar.update()
    return table


def _check_grid(
    merger: Merger,
    methods: Sequence[str],
    normalizations: Sequence[str | None],
    scopes: Sequence[Scope],
    loader: Iterable | None,
    output: str,
    hparams: dict[str, Mapping[str, object]],
) -> None:
    """Every name and hyper-parameter checked before the first merge runs."""
    if isinstance(methods, str) or not methods:
        raise ValueError("methods must be a non-empty list of method names")
    for method in methods:
        matching_functions.entry(method).check_hyperparameters(dict(hparams.get(method, {})))
    unknown = sorted(set(hparams) - set(methods))
    if unknown:
        raise ValueError(f"hparams given for methods not in the grid: {', '.join(unknown)}")
    if isinstance(normalizations, str) or not normalizations:
        raise ValueError("normalizations must be a non-empty list such as [None, 'repair']")
    for normalize in normalizations:
        normalization.check_name(normalize)
    if any(normalize is not None for normalize in normalizations) and loader is None:
        raise ValueError("normalizations need data: pass loader= (a fixed-order loader)")
    reading = [m for m in methods if matching_functions.entry(m).needs_loader]
    if reading and loader is None:
        raise ValueError(f"{', '.join(reading)} read the data themselves: pass loader=")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    for scope in scopes:
        if not isinstance(scope, Scope):
            raise TypeError(f"scopes must hold Scope objects, got a {type(scope).__name__}")
        merger.scope(scope.start_at, scope.stop_at)  # raises on an unknown space or index
    needs_data = any(matching_functions.entry(m).needs_statistics for m in methods)
    if needs_data and merger.statistics is None:
        raise ValueError("the merger holds no statistics: call merger.collect(loader) first")


def _baselines(
    merger: Merger, test_loader: Iterable, output: str, tasks: Sequence[Sequence[int]] | None
) -> list[dict[str, Any]]:
    rows = []
    for index, model in enumerate(merger.models):
        if output == "average":
            rows.append(_row(f"model {index}", "model", evaluate(model, test_loader)))
        elif tasks is not None:
            # A source model covers only its own label set: evaluated on its task alone.
            metrics = evaluate(model, TaskSubset(test_loader, tasks[index]))
            row = _row(f"model {index} (own task)", "model", metrics)
            row[f"task_{index}_accuracy"] = metrics["accuracy"]
            rows.append(row)
    ensemble = Ensemble(merger.models, output=output)
    rows.append(_row("ensemble", "ensemble", evaluate(ensemble, test_loader, tasks=tasks)))
    return rows


class TaskSubset:
    """The samples of one task from a loader of joint labels, relabelled 0..k-1 in the
    order of the task's columns (what a model trained on that task alone predicts)."""

    def __init__(self, loader: Iterable, columns: Sequence[int]) -> None:
        self.loader = loader
        self.columns = torch.as_tensor(list(columns), dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for inputs, targets in labelled_batches(self.loader):
            mine = torch.isin(targets, self.columns.to(targets.device))
            if mine.any():
                local = (targets[mine, None] == self.columns.to(targets.device)).int().argmax(1)
                yield samples_at(inputs, mine), local


def _name(
    method: str, normalize: str | None, scope: Scope, options: Mapping[str, object] | None = None
) -> str:
    """``"zip + repair (stop_at=2, alpha=0.5)"``: method, normalization, scope, hparams."""
    name = method if normalize is None else f"{method} + {normalize}"
    details = [scope.label] if scope.label else []
    details += [f"{key}={value}" for key, value in sorted((options or {}).items())]
    return f"{name} ({', '.join(details)})" if details else name


def _row(name: str, kind: str, metrics: dict[str, Any], **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(name=name, kind=kind, accuracy=metrics["accuracy"], loss=metrics["loss"], **fields)
    for index, accuracy in enumerate(metrics.get("task_accuracy", [])):
        row[f"task_{index}_accuracy"] = accuracy
    row["mean_task_accuracy"] = metrics.get("mean_task_accuracy")
    return row


def _merge_row(
    result: MergeResult, scope: Scope, options: dict[str, object], metrics: dict[str, Any]
) -> dict[str, Any]:
    seconds = {key: result.seconds.get(key, 0.0) for key in ("matching", "fold", "normalize")}
    return _row(
        _name(result.method, result.normalize, scope, options),
        "merge",
        metrics,
        method=result.method,
        normalize=result.normalize or "none",
        start_at=scope.start_at,
        stop_at=scope.stop_at,
        hparams=" ".join(f"{key}={value}" for key, value in sorted(options.items())),
        merged_width=sum(match.merged_width for match in result.matches.values()),
        seconds_matching=seconds["matching"],
        seconds_fold=seconds["fold"],
        seconds_normalize=seconds["normalize"] if result.normalize else None,
        seconds=sum(seconds.values()),
    )


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def width_sweep(
    merger: Merger,
    test_loader: Iterable,
    method: str = "zip",
    reductions: Sequence[float] = (0.0, 0.125, 0.25, 0.375, 0.5),
    normalize: str | None = None,
    loader: Iterable | None = None,
    output: str = "average",
    tasks: Sequence[Sequence[int]] | None = None,
    progress: bool = True,
    budgets: Sequence[float] = (),
) -> Comparison:
    """Accuracy against merged width: partial merging in three ways, as rows with a ``series``.

    - ``"zip reduction r"``: every space zipped to d' = (1 - r) N d (``method="zip"`` only;
      r = 1 - 1/N is the full merge, r = 0 the ensemble width);
    - ``"stop_at"``: spaces k.. kept unmerged (per-model heads), k = 0..S;
    - ``"start_at"``: the first k spaces kept unmerged (preserve-first), k = 0..S.
    ``budgets`` (merged width / d, in [1, N]) add, per budget b, the series
    ``"permute budget"`` (permute's least correlated pairs kept apart: ``pleas`` with
    steps=0), ``"zip budget"`` (d' = b d) and ``"pleas budget"`` (with its least squares,
    on ``loader``). ``merged_width`` is the sum of the merged widths over all mergeable
    spaces. The ensemble is the first row (``plot_width`` draws it as a line).
    """
    count = len(merger.spaces)
    sweep = compare(
        merger, test_loader, [method], [normalize],
        scopes=[Scope(stop_at=k) for k in range(count + 1)], loader=loader, output=output,
        tasks=tasks, progress=progress,
    )  # fmt: skip
    sweep.rows = [row for row in sweep.rows if row["kind"] == "ensemble"] + [
        {**row, "series": "stop_at"} for row in sweep.merges()
    ]
    starts = compare(
        merger, test_loader, [method], [normalize],
        scopes=[Scope(start_at=k) for k in range(count + 1)], loader=loader, output=output,
        tasks=tasks, baselines=False, progress=progress,
    )  # fmt: skip
    sweep.rows += [{**row, "series": "start_at"} for row in starts.rows]
    if method == "zip":
        for reduction in reductions:
            zipped = compare(
                merger, test_loader, ["zip"], [normalize], loader=loader, output=output,
                tasks=tasks, hparams={"zip": {"reduction": reduction}}, baselines=False,
                progress=progress,
            )  # fmt: skip
            sweep.rows += [{**row, "series": "zip reduction"} for row in zipped.rows]
    count_models = len(merger.models)
    for budget in budgets:
        for series, name, options in (
            ("permute budget", "pleas", {"budget": budget, "steps": 0}),
            ("zip budget", "zip", {"reduction": 1 - budget / count_models}),
            ("pleas budget", "pleas", {"budget": budget}),
        ):
            found = compare(
                merger, test_loader, [name], [normalize], loader=loader, output=output,
                tasks=tasks, hparams={name: options}, baselines=False, progress=progress,
            )  # fmt: skip
            sweep.rows += [{**row, "series": series, "budget": budget} for row in found.rows]
    return sweep
