"""What the ``graphmerge`` subcommands share: help formatting, architecture options,
class-list formatting and the errors a user can fix."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from graphmerge.checkpoints import is_hf_folder

DATASETS = ("digits", "cifar10", "cifar100")
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, FloatingPointError)


def check_output_file(out: Path, inputs: Sequence[Path] = ()) -> None:
    """``--out`` checked before any work: its folder exists, it is not a folder, not an input."""
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist")
    if out.is_dir() and not is_hf_folder(out):
        raise ValueError(
            f"--out {out} is a folder: give the file to write (a HuggingFace model is written "
            "as a folder to a path without a suffix)"
        )
    for path in inputs:
        if path.exists() and out.exists() and out.resolve() == path.resolve():
            raise ValueError(f"--out {out} is one of the input checkpoints: choose a new file")


def checked_device(name: str) -> str:
    """``--device name`` checked: a device torch knows, and CUDA only where it is available."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return name


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (else the usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def finite_number(positive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (``positive``) or >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    parse.__name__ = "positive number" if positive else "non-negative number"
    return parse


positive_int = at_least(1)
positive_number = finite_number(positive=True)
non_negative_number = finite_number(positive=False)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default only when it has a real one (not None, not a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def add_architecture_options(group: argparse._ActionsContainer) -> None:
    group.add_argument("--width", type=positive_number, default=1.0, help="width multiplier")
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
