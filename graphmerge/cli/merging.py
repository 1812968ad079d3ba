"""``graphmerge merge``, ``evaluate``, ``compare`` and ``interpolate``."""

from __future__ import annotations

import argparse
import ast
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import graphmerge
from graphmerge import comparison, distributed, matching_functions, normalization, plots
from graphmerge._atomic import atomic_files
from graphmerge.batches import batch_inputs
from graphmerge.checkpoints import save_checkpoint
from graphmerge.cli.common import (
    HelpFormatter,
    at_least,
    check_output_file,
    checked_device,
    format_classes,
)
from graphmerge.cli.sources import (
    Loaders,
    Sources,
    add_source_options,
    load_one,
    load_sources,
    loaders_for,
)
from graphmerge.comparison import Scope
from graphmerge.evaluation import evaluate, interpolation_curve
from graphmerge.merge import Merger

NONE = "none"


def add_merging(commands: argparse._SubParsersAction) -> None:
    _add_merge(commands)
    _add_evaluate(commands)
    _add_compare(commands)
    _add_interpolate(commands)


def _add_merge(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge",
        help="merge checkpoints into one model and write it",
        description=(
            "Merge N checkpoints of one architecture: feature statistics on the training "
            "split (fixed order), a matching per space, the fold, optional renormalization. "
            "Prints the merged model's test accuracy and writes a checkpoint that "
            "`graphmerge evaluate` and `graphmerge merge` read back. Models trained on "
            "different classes are merged with joint logits (model 0's classes first)."
        ),
        epilog="example: graphmerge merge a.pt b.pt --method zip --normalize repair "
        "--out merged.pt",
        formatter_class=HelpFormatter,
    )
    add_source_options(parser)
    _add_method_options(parser)
    parser.add_argument("--method", default="permute", help="matching function")
    parser.add_argument(
        "--normalize", default=NONE, help="none, reset, repair or rescale (after merging)"
    )
    parser.add_argument("--start-at", help="first merged space (index or name)")
    parser.add_argument("--stop-at", help="first space kept unmerged (index or name)")
    parser.add_argument("--out", type=Path, required=True, help="merged checkpoint to write")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the models run and statistics are kept: cpu, cuda or cuda:N (under "
        "torchrun, cuda means each process's cuda:LOCAL_RANK)",
    )
    parser.set_defaults(handler=run_merge)


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyper-parameter of the method, e.g. --set alpha=0.5 (repeatable; see "
        "`graphmerge matchers`)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_merge(args: argparse.Namespace) -> int:
    """Merge, evaluate and write; under torchrun every process takes a shard of the
    statistics and rank 0 evaluates and writes."""
    check_output_file(args.out, args.checkpoints)
    device = distributed.device_for_rank(checked_device(args.device))
    joined = distributed.init_from_environment(device)
    try:
        return _merge(args, device)
    finally:
        if joined:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _merge(args: argparse.Namespace, device: str) -> int:
    method = _method(args.method)
    normalize = _normalization(args.normalize)
    hparams = _hparams(args.set)
    sources = load_sources(args)
    loaders = loaders_for(sources.data_spec, sources.output_classes)
    scope = Scope(_space(args.start_at), _space(args.stop_at))
    started = time.perf_counter()
    merger = _collect(sources, loaders, args, [method], [scope], device)
    collected = time.perf_counter()
    result = merger.merge(
        method, start_at=scope.start_at, stop_at=scope.stop_at, output=_output(sources),
        normalize=normalize, loader=loaders.statistics, **hparams,
    )  # fmt: skip
    seconds = time.perf_counter() - collected
    if not distributed.is_main():
        return 0
    metrics = evaluate(result.model, loaders.test, tasks=sources.tasks)
    metadata = {
        "data": sources.data_spec,
        "classes": sources.output_classes,
        "tasks": sources.tasks,
        "merge": {
            "sources": [str(path) for path in sources.paths],
            "method": method,
            "hparams": hparams,
            "normalize": normalize,
            "start_at": args.start_at,
            "stop_at": args.stop_at,
            "output": result.output,
            "seconds": seconds,
        },
        "metrics": _plain(metrics),
        "graphmerge_version": graphmerge.__version__,
    }
    save_checkpoint(result.model, args.out, spec=sources.spec, metadata=metadata)
    processes = distributed.world_size()
    on = f" on {processes} processes" if processes > 1 else ""
    print(
        f"merged {len(sources.models)} models with {_label(method, normalize)}{on}: "
        f"statistics {collected - started:.2f} s, matching, fold and normalization "
        f"{seconds:.2f} s"
    )
    print(_metrics_line(metrics, sources.output_classes))
    print(f"wrote {args.out}")
    return 0


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="test accuracy and loss of a checkpoint (merged or trained)",
        description=(
            "Evaluate a checkpoint on the test split of the data it names (joint and "
            "per-task accuracy for a merge with joint logits)."
        ),
        epilog="example: graphmerge evaluate merged.pt",
        formatter_class=HelpFormatter,
    )
    add_source_options(parser, count=1)
    parser.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    loaded = load_one(args.checkpoints[0], args)
    data_spec = dict(loaded.data_spec, classes=sorted(set(loaded.classes)))
    test = loaders_for(data_spec, loaded.classes).test
    metrics = evaluate(loaded.model, test, tasks=loaded.metadata.get("tasks"))
    print(_metrics_line(metrics, loaded.classes))
    return 0


def _add_compare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="merge checkpoints with a grid of methods and normalizations; table, CSV, PNG",
        description=(
            "Run every method x normalization (x --stop-at / --start-at scope) on one pass of "
            "statistics, print a table with the endpoints and the ensemble, and write "
            "comparison.csv and comparison.png to --out."
        ),
        epilog="example: graphmerge compare a.pt b.pt --methods identity,permute,zip "
        "--normalize none,repair --out results",
        formatter_class=HelpFormatter,
    )
    add_source_options(parser)
    _add_method_options(parser)
    parser.add_argument(
        "--methods",
        default=",".join(comparison.DEFAULT_METHODS),
        help="comma-separated matching functions",
    )
    parser.add_argument("--normalize", default=NONE, help="comma-separated normalizations")
    parser.add_argument(
        "--stop-at", help="comma-separated stop_at values to add as scopes (partial zipping)"
    )
    parser.add_argument("--start-at", help="comma-separated start_at values to add as scopes")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    methods, normalizations, hparams = _grid(args)
    scopes = [Scope()]
    scopes += [Scope(stop_at=_space(value)) for value in _split(args.stop_at or "")]
    scopes += [Scope(start_at=_space(value)) for value in _split(args.start_at or "")]
    sources = load_sources(args)
    loaders = loaders_for(sources.data_spec, sources.output_classes)
    merger = _collect(sources, loaders, args, methods, scopes)
    table = comparison.compare(
        merger, loaders.test, methods, normalizations, scopes, loader=loaders.statistics,
        output=_output(sources), tasks=sources.tasks,
        hparams={methods[0]: hparams} if hparams else None, progress=not args.quiet,
    )  # fmt: skip
    print(table.format())
    args.out.mkdir(exist_ok=True)
    with atomic_files([args.out / "comparison.csv", args.out / "comparison.png"]) as (csv, png):
        table.write_csv(csv)
        plots.plot_comparison(table.rows, png)
    print(f"wrote {args.out / 'comparison.csv'}, {args.out / 'comparison.png'}")
    return 0


def _add_interpolate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "interpolate",
        help="interpolation curves and loss barriers between two checkpoints",
        description=(
            "Align two checkpoints with each method, evaluate the models at weights "
            "(1 - alpha, alpha) for --points alphas in [0, 1], print the loss barriers and "
            "write curves.csv and curves.png to --out."
        ),
        epilog="example: graphmerge interpolate a.pt b.pt --methods identity,permute "
        "--normalize none,repair --out curves",
        formatter_class=HelpFormatter,
    )
    add_source_options(parser, count=2)
    _add_method_options(parser)
    parser.add_argument(
        "--methods", default="identity,permute", help="comma-separated matching functions"
    )
    parser.add_argument("--normalize", default=NONE, help="comma-separated normalizations")
    parser.add_argument("--points", type=at_least(2), default=11, help="alphas from 0 to 1")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.set_defaults(handler=run_interpolate)


def run_interpolate(args: argparse.Namespace) -> int:
    methods, normalizations, hparams = _grid(args)
    sources = load_sources(args)
    if len(sources.models) != 2 or sources.joint:
        raise ValueError(
            "interpolate runs between 2 checkpoints trained on the same classes, got "
            f"{len(sources.models)} with classes {[format_classes(c) for c in sources.classes]}"
        )
    loaders = loaders_for(sources.data_spec, sources.output_classes)
    merger = _collect(sources, loaders, args, methods)
    curves = [
        interpolation_curve(
            merger, loaders.test, method, args.points, normalize, loaders.statistics, **hparams
        )
        for method in methods
        for normalize in normalizations
    ]
    print("loss barrier (max test loss above the straight line between the endpoints):")
    for curve in curves:
        losses = " ".join(f"{loss:.3f}" for loss in curve.losses)
        print(f"  {curve.label:<24} {curve.barrier:.4f}   losses: {losses}")
    args.out.mkdir(exist_ok=True)
    rows = [row for curve in curves for row in curve.rows()]
    with atomic_files([args.out / "curves.csv", args.out / "curves.png"]) as (csv, png):
        comparison.write_csv(rows, csv)
        plots.plot_curves(curves, png)
    print(f"wrote {args.out / 'curves.csv'}, {args.out / 'curves.png'}")
    return 0


def _grid(args: argparse.Namespace) -> tuple[list[str], list[str | None], dict[str, Any]]:
    """The checked --out folder, --methods, --normalize and --set of compare / interpolate."""
    _check_folder(args.out)
    methods = [_method(name) for name in _split(args.methods)]
    normalizations = [_normalization(name) for name in _split(args.normalize)]
    hparams = _hparams(args.set)
    if hparams and len(methods) != 1:
        raise ValueError("--set applies to a single method: give --methods with one name")
    return methods, normalizations, hparams


def _collect(
    sources: Sources,
    loaders: Loaders,
    args: argparse.Namespace,
    methods: list[str],
    scopes: Sequence[Scope] = (),
    device: str | None = None,
) -> Merger:
    """Trace, check the scopes, then one statistics pass if a method needs it."""
    example = batch_inputs(next(iter(loaders.statistics)))
    merger = Merger(sources.models, example_input=example, progress=not args.quiet,
                    device=device)  # fmt: skip
    for scope in scopes:
        merger.scope(scope.start_at, scope.stop_at)  # an unknown space fails before the pass
    if any(matching_functions.entry(method).needs_statistics for method in methods):
        merger.collect(loaders.statistics, max_samples=args.max_samples)
    return merger


def _output(sources: Sources) -> str:
    return "concat" if sources.joint else "average"


def _method(name: str) -> str:
    matching_functions.entry(name)  # an unknown name raises, listing the known ones
    return name


def _normalization(name: str) -> str | None:
    if name == NONE:
        return None
    return normalization.check_name(name, none=NONE)


def _hparams(pairs: list[str]) -> dict[str, Any]:
    """``["alpha=0.5", "inner=zip"]`` -> ``{"alpha": 0.5, "inner": "zip"}``."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sign, text = pair.partition("=")
        if not sign or not key:
            raise ValueError(f"--set needs KEY=VALUE, got {pair!r}")
        try:
            found[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            found[key] = text  # a bare word such as inner=zip
    return found


def _space(value: str | None) -> int | str | None:
    """A space index ("3") or name ("layer2.0.conv1")."""
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _check_folder(out: Path) -> None:
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")


def _label(method: str, normalize: str | None) -> str:
    return method if normalize is None else f"{method} + {normalize}"


def _metrics_line(metrics: dict[str, Any], classes: list[int]) -> str:
    line = (
        f"test accuracy {100 * metrics['accuracy']:.2f}% (loss {metrics['loss']:.4f}) on "
        f"{metrics['num_samples']} test samples, classes {format_classes(sorted(classes))}"
    )
    if "task_accuracy" in metrics:
        tasks = ", ".join(f"{100 * value:.2f}%" for value in metrics["task_accuracy"])
        line += f"; per task {tasks} (mean {100 * metrics['mean_task_accuracy']:.2f}%)"
    return line


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if value is not None}
