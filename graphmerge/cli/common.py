"""What the ``graphmerge`` subcommands share: help formatting, architecture options,
class-list formatting and the errors a user can fix."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DATASETS = ("digits", "cifar10", "cifar100")
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, FloatingPointError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default only when it has a real one (not None, not a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def add_architecture_options(group: argparse._ActionsContainer) -> None:
    group.add_argument("--width", type=float, default=1.0, help="width multiplier")
    group.add_argument(
        "--norm",
        choices=("none", "bn", "ln"),
        help="normalization layers (mlp, vgg, resnet20); default: the "
        "architecture's own (none for mlp/vgg, bn for resnet20)",
    )
    group.add_argument("--hidden", help="mlp hidden widths before --width, e.g. 512,512,512")


def parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--hidden must be widths like 512,512,512, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise ValueError(f"--hidden widths must be >= 1, got {text!r}")
    return widths


def format_classes(classes: Sequence[int]) -> str:
    """Compact ranges: (0, 1, 2, 3, 7, 9) -> '0-3,7,9'."""
    parts: list[str] = []
    run: list[int] = []
    for class_id in [*classes, None]:
        if run and (class_id is None or class_id != run[-1] + 1):
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        if class_id is not None:
            run.append(class_id)
    return ",".join(parts)
