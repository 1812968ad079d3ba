"""The ``graphmerge`` command line.

Example:
    graphmerge demo --out demo-output
    graphmerge train --model resnet20 --width 2 --data digits --classes 0-4 --seed 1 --out a.pt
    graphmerge merge a.pt b.pt --method zip --normalize repair --out merged.pt
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import graphmerge
from graphmerge.cli.common import USER_ERRORS, format_classes
from graphmerge.cli.demo import add_demo
from graphmerge.cli.diagnose import add_diagnose
from graphmerge.cli.inspect import add_graph, add_matchers, add_models
from graphmerge.cli.merging import add_merging
from graphmerge.cli.train import add_train

__all__ = ["build_parser", "format_classes", "main"]

# Commands that run under torchrun (several processes sharing the statistics pass).
DISTRIBUTED = ("merge",)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graphmerge`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error argparse printed
        return done.code if isinstance(done.code, int) else 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in DISTRIBUTED:
        print(
            f"graphmerge {args.command}: error: only `graphmerge merge` runs under torchrun "
            f"(WORLD_SIZE={os.environ['WORLD_SIZE']}); run {args.command} in one process",
            file=sys.stderr,
        )
        return 2
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"graphmerge {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngraphmerge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`graphmerge models | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphmerge",
        description="Merge separately trained neural networks into one, without retraining.",
    )
    parser.add_argument(
        "--version", action="version", version=f"graphmerge {graphmerge.__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo(commands)
    add_train(commands)
    add_merging(commands)
    add_graph(commands)
    add_models(commands)
    add_matchers(commands)
    add_diagnose(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
