"""``graphmerge demo``: the main job, on the bundled digits, with no download."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from graphmerge.cli.common import HelpFormatter, positive_int
from graphmerge.demo import DemoConfig, run_demo


def add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="train small models on the bundled digits and merge them every way (no download)",
        description=(
            "Train two MLPs on the bundled digits (same task, different seeds; BatchNorm "
            "MLPs; and a disjoint 0-4 / 5-9 split), merge them with every matching function "
            "and normalization, print the tables and loss barriers, and write CSV files and "
            "PNG plots to --out. About 1 minute on 2 CPU cores."
        ),
        epilog="example: graphmerge demo --out demo-output",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    parser.add_argument(
        "--quick", action="store_true", help="small models and few epochs (seconds, for tests)"
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    run_demo(args.out, config, progress=not args.quiet)
    return 0
