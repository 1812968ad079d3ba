"""The demo: train small models on the bundled digits, merge them every way, report.

Three experiments, all on scikit-learn's digits (no download):

- ``same_task``: two MLPs (3 x 512) from seeds 0 and 1 on all ten classes; every
  matching method (``METHODS``: the harness's, pleas, ot_fusion and ste) with no
  normalization, REPAIR and RESCALE; interpolation curves
  and loss barriers.
- ``batchnorm``: the same with BatchNorm MLPs, where RESET applies too.
- ``disjoint``: one MLP on classes 0-4, one on 5-9, merged with joint logits
  (``output="concat"``), evaluated on all ten classes (joint and per-task accuracy);
  accuracy against merged width (partial merging: zip reduction, stop_at, start_at, and
  permute / zip / pleas under width budgets 1, 1.25, 1.5 and 2).

It writes ``comparison.csv``, ``curves.csv``, ``width.csv`` and PNG plots to the
output folder and returns the tables.

Example:
    >>> result = gm.demo.run_demo("demo-output")
    >>> result.curves["same_task"][0].barrier
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from graphmerge import comparison, data, models, plots, training
from graphmerge.comparison import Comparison
from graphmerge.evaluation import Curve, interpolation_curve
from graphmerge.merge import Merger
from graphmerge.recipes import recipe_for

STATISTICS_BATCH = 256
CURVE_METHODS = ("identity", "permute", "zip", "weight_matching")
# Every method of the comparison harness, and those that read the data themselves.
METHODS = (*comparison.DEFAULT_METHODS, "pleas", "ot_fusion", "ste")
BUDGETS = (1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes: ``quick()`` is the reduced version the tests run."""

    hidden: tuple[int, ...] = (512, 512, 512)
    epochs: int = recipe_for("mlp")["epochs"]
    lr: float = recipe_for("mlp")["lr"]
    points: int = 11
    seeds: tuple[int, int] = (0, 1)
    ste_steps: int = 20

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(hidden=(64, 64), epochs=4, points=5, ste_steps=2)

    @property
    def hparams(self) -> dict[str, dict[str, object]]:
        """The hyper-parameters the demo gives its methods."""
        return {"ste": {"steps": self.ste_steps}}


@dataclass
class DemoResult:
    """The demo's tables (``comparison.rows`` carry an ``experiment`` key), curves per
    experiment, the width sweep, the files written and the wall time."""

    comparison: Comparison = field(default_factory=Comparison)
    curves: dict[str, list[Curve]] = field(default_factory=dict)
    width: Comparison = field(default_factory=Comparison)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(
    out: str | os.PathLike,
    config: DemoConfig | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the three experiments, print their tables with ``echo``, write CSV and PNGs to
    ``out`` (created if missing; its parent must exist)."""
    config = config or DemoConfig()
    folder = Path(out)
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"--out {folder}: the folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    started = time.perf_counter()
    result = DemoResult()
    digits = data.digits(layout="flat")
    # Statistics and renormalization read the training set in a fixed order: every
    # pass sees the same samples, so REPAIR meets its targets exactly.
    fixed = DataLoader(digits.train.dataset, batch_size=STATISTICS_BATCH, shuffle=False)
    for name, norm, normalizations in (
        ("same_task", "none", (None, "repair", "rescale")),
        ("batchnorm", "bn", (None, "reset", "repair", "rescale")),
    ):
        pair = [_train(config, digits, norm, seed, progress) for seed in config.seeds]
        merger = _merger(pair, fixed, progress)
        table = comparison.compare(
            merger, digits.test, METHODS, normalizations=normalizations, loader=fixed,
            hparams=config.hparams, progress=progress,
        )  # fmt: skip
        _report(result, name, table, echo)
        curve_normalize = "reset" if norm == "bn" else "repair"
        result.curves[name] = [
            interpolation_curve(merger, digits.test, method, config.points, normalize, fixed)
            for method, normalize in [
                *((method, None) for method in CURVE_METHODS),
                ("identity", curve_normalize),
                ("permute", curve_normalize),
            ]
        ]
        _report_curves(result.curves[name], echo)
    _disjoint(result, config, fixed, progress, echo)
    result.files = _write(result, folder)
    result.seconds = time.perf_counter() - started
    echo(f"wrote {', '.join(str(path) for path in result.files)}")
    echo(f"demo finished in {result.seconds:.0f} s")
    return result


def _train(
    config: DemoConfig, splits: data.DataSplits, norm: str, seed: int, progress: bool
) -> torch.nn.Module:
    model = models.build(
        "mlp", hidden=config.hidden, num_classes=splits.num_classes, norm=norm, seed=seed
    )
    trained = training.train(
        model, splits.train, epochs=config.epochs, lr=config.lr, seed=seed, progress=progress
    )
    return trained.model


def _merger(pair: Sequence[torch.nn.Module], loader: DataLoader, progress: bool) -> Merger:
    merger = Merger(pair, example_input=next(iter(loader))[0], progress=progress)
    merger.collect(loader)
    return merger


def _disjoint(
    result: DemoResult, config: DemoConfig, fixed: DataLoader, progress: bool, echo
) -> None:
    """Models on classes 0-4 and 5-9; joint logits [0-4, 5-9] line up with the digit ids."""
    halves = [data.digits(layout="flat", classes=classes) for classes in ("0-4", "5-9")]
    pair = [
        _train(config, half, "none", seed, progress)
        for half, seed in zip(halves, config.seeds, strict=True)
    ]
    tasks = [list(range(5)), list(range(5, 10))]
    merger, test = _merger(pair, fixed, progress), data.digits(layout="flat").test
    same_task_only = ("ste",)  # its loss is the midpoint's: no common label set here
    methods = [method for method in METHODS if method not in same_task_only]
    table = comparison.compare(
        merger, test, methods, normalizations=(None, "repair", "rescale"), loader=fixed,
        output="concat", tasks=tasks, progress=progress,
    )  # fmt: skip
    _report(result, "disjoint", table, echo)
    result.width = comparison.width_sweep(
        merger, test, output="concat", tasks=tasks, loader=fixed, budgets=BUDGETS,
        progress=progress,
    )  # fmt: skip


def _report(result: DemoResult, name: str, table: Comparison, echo) -> None:
    titles = {
        "same_task": "same task: two MLPs 3x512, seeds 0 and 1, all ten digits",
        "batchnorm": "same task, BatchNorm MLPs (RESET applies)",
        "disjoint": "disjoint tasks: MLP on digits 0-4, MLP on 5-9, joint logits over 0-9",
    }
    echo(f"\n== {titles[name]} ==")
    echo(table.format())
    result.comparison.rows += [{"experiment": name, **row} for row in table.rows]


def _report_curves(curves: Sequence[Curve], echo) -> None:
    echo("loss barrier along the interpolation path (max loss above the endpoints' line):")
    for curve in curves:
        echo(f"  {curve.label:<24} {curve.barrier:.4f}")


def _write(result: DemoResult, folder: Path) -> list[Path]:
    files = []
    path = folder / "comparison.csv"
    result.comparison.write_csv(path)
    files.append(path)
    curve_rows = [
        {"experiment": name, **row}
        for name, curves in result.curves.items()
        for curve in curves
        for row in curve.rows()
    ]
    path = folder / "curves.csv"
    comparison.write_csv(curve_rows, path)
    files.append(path)
    path = folder / "width.csv"
    result.width.write_csv(path)
    files.append(path)
    for name, curves in result.curves.items():
        path = folder / f"curves_{name}.png"
        plots.plot_curves(curves, path, title=f"interpolation, {name.replace('_', ' ')}")
        files.append(path)
    for name in ("same_task", "batchnorm", "disjoint"):
        rows = [row for row in result.comparison.rows if row["experiment"] == name]
        path = folder / f"comparison_{name}.png"
        plots.plot_comparison(rows, path, title=name.replace("_", " "))
        files.append(path)
    path = folder / "width_disjoint.png"
    plots.plot_width(result.width.rows, path, title="partial merging (zip), disjoint tasks")
    files.append(path)
    return files
