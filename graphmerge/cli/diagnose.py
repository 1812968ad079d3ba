"""``graphmerge diagnose``: the Vanishing Feature diagnostics of a merge, per normalization."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphmerge import diagnostics, plots
from graphmerge._atomic import atomic_files
from graphmerge.cli.common import HelpFormatter, check_output_file, checked_device
from graphmerge.cli.merging import (
    _add_method_options,
    _collect,
    _hparams,
    _method,
    _normalization,
    _output,
    _space,
    _split,
)
from graphmerge.cli.sources import add_source_options, load_sources, loaders_for
from graphmerge.comparison import Scope

DEFAULT_NORMALIZE = ("none", "repair", "rescale", "reset")


def add_diagnose(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "diagnose",
        help="variance ratio (merged / sources) by depth, per normalization: table, CSV, PNG",
        description=(
            "Merge the checkpoints once with --method, normalize the merge each way, and "
            "measure at every layer output and residual sum of the merged spaces (in depth "
            "order) the merged model's feature variance and RMS against its source units' "
            "(Vanishing Feature diagnostics). Prints the table; --csv and --plot write it."
        ),
        epilog="example: graphmerge diagnose a.pt b.pt --method permute --normalize none "
        "repair --plot ratios.png --csv ratios.csv",
        formatter_class=HelpFormatter,
    )
    add_source_options(parser)
    _add_method_options(parser)
    parser.add_argument("--method", default="permute", help="matching function")
    parser.add_argument(
        "--normalize",
        nargs="+",
        metavar="NAME",
        help="normalizations to compare: none, reset, repair, rescale (spaces or commas; "
        f"default: {' '.join(DEFAULT_NORMALIZE)})",
    )
    parser.add_argument("--start-at", help="first merged space (index or name)")
    parser.add_argument("--stop-at", help="first space kept unmerged (index or name)")
    parser.add_argument(
        "--reference",
        choices=diagnostics.REFERENCES,
        default="std",
        help="source variance: std = REPAIR's target (squared merge of the source stds), "
        "variance = the merge-weighted average of the source variances",
    )
    parser.add_argument("--plot", type=Path, help="PNG: variance ratio against depth")
    parser.add_argument("--csv", type=Path, help="CSV of the table")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda or cuda:N")
    parser.set_defaults(handler=run_diagnose)


def run_diagnose(args: argparse.Namespace) -> int:
    outputs = [path for path in (args.csv, args.plot) if path is not None]
    for path in outputs:
        check_output_file(path, args.checkpoints)
    if args.csv is not None and args.plot is not None and args.csv.resolve() == args.plot.resolve():
        raise ValueError(f"--csv and --plot are the same file ({args.csv}): give two paths")
    device = checked_device(args.device)
    method = _method(args.method)
    normalizations = _normalizations(args.normalize or list(DEFAULT_NORMALIZE))
    hparams = _hparams(args.set)
    scope = Scope(_space(args.start_at), _space(args.stop_at))
    sources = load_sources(args)
    loaders = loaders_for(sources.data_spec, sources.output_classes)
    merger = _collect(sources, loaders, args, [method], [scope], device)
    table = diagnostics.diagnose(
        merger, loaders.statistics, method, normalizations, start_at=scope.start_at,
        stop_at=scope.stop_at, output=_output(sources), reference=args.reference,
        max_samples=args.max_samples, progress=not args.quiet, **hparams,
    )  # fmt: skip
    print(table.format())
    print(_summary(table, normalizations))
    if outputs:
        with atomic_files(outputs) as written:
            paths = dict(zip(outputs, written, strict=True))
            if args.csv is not None:
                table.write_csv(paths[args.csv])
            if args.plot is not None:
                title = f"{method}: variance ratio by depth ({args.reference} reference)"
                plots.plot_variance_ratios(table.rows, paths[args.plot], title=title)
        print(f"wrote {', '.join(str(path) for path in outputs)}")
    return 0


def _normalizations(values: list[str]) -> list[str | None]:
    """``["none", "repair,rescale"]`` -> ``[None, "repair", "rescale"]``, checked, no repeats."""
    names = [name for value in values for name in _split(value)]
    if not names:
        raise ValueError("--normalize needs at least one name (none, reset, repair, rescale)")
    if len(set(names)) != len(names):
        raise ValueError(f"--normalize names one twice: {' '.join(names)}")
    return [_normalization(name) for name in names]


def _summary(table: diagnostics.VarianceTable, normalizations: list[str | None]) -> str:
    """The variance ratio at the first, middle and last point, per normalization."""
    lines = ["variance ratio at the first / middle / last point:"]
    for normalize in normalizations:
        ratios = table.ratios(normalize)
        picked = (ratios[0], ratios[len(ratios) // 2], ratios[-1])
        lines.append(f"  {normalize or 'none':<8} " + " / ".join(f"{r:.3f}" for r in picked))
    return "\n".join(lines)
