"""Input models and data for ``merge``, ``compare`` and ``interpolate``.

Inputs are checkpoints written by ``graphmerge train`` (they name their architecture
and data), or plain state_dicts with ``--model NAME`` and the architecture options.
The models must share one architecture; models trained on different class subsets
are merged with joint logits (their class lists concatenated, model 0's first).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from graphmerge import data as gm_data
from graphmerge import distributed, models
from graphmerge.checkpoints import (
    is_checkpoint,
    is_hf_folder,
    load_state_dict_strictly,
    read_file,
    rebuild,
)
from graphmerge.cli.common import add_architecture_options, parse_widths, positive_int
from graphmerge.recipes import recipe_for

STATISTICS_BATCH = 256


@dataclass
class Sources:
    """The loaded models, how to rebuild them, their classes, and the data to use."""

    paths: list[Path]
    models: list[nn.Module]
    spec: models.ModelSpec
    classes: list[list[int]]
    data_spec: dict[str, Any]

    @property
    def joint(self) -> bool:
        """Whether the models were trained on different class lists (joint logits)."""
        return any(classes != self.classes[0] for classes in self.classes)

    @property
    def output_classes(self) -> list[int]:
        """The class id of each output column of the merged model."""
        if self.joint:
            return [class_id for classes in self.classes for class_id in classes]
        return list(self.classes[0])

    @property
    def tasks(self) -> list[list[int]] | None:
        """Output columns per input model, for joint logits; None for a shared label set."""
        if not self.joint:
            return None
        columns, start = [], 0
        for classes in self.classes:
            columns.append(list(range(start, start + len(classes))))
            start += len(classes)
        return columns


def add_source_options(parser: argparse.ArgumentParser, count: int | None = None) -> None:
    """Positional checkpoints (exactly ``count``, or 2 or more), and options for plain
    state_dicts and the data."""
    how_many = "2 or more checkpoints" if count is None else f"{count} checkpoints"
    text = f"{how_many} of one architecture (from `graphmerge train`, or plain state_dicts"
    if count == 1:
        text = "a checkpoint (from `graphmerge train`, or a plain state_dict"
    parser.add_argument(
        "checkpoints",
        nargs="+" if count is None else count,
        type=Path,
        metavar="CHECKPOINT",
        help=f"{text} with --model)",
    )
    plain = parser.add_argument_group("plain state_dicts (files without architecture)")
    plain.add_argument("--model", help="architecture of plain state_dict files")
    add_architecture_options(plain)
    plain.add_argument(
        "--classes", help="class subset the plain state_dicts were trained on (default: all)"
    )
    dataset = parser.add_argument_group("data")
    dataset.add_argument(
        "--data", choices=("digits",), default="digits", help="data for statistics and tests"
    )
    dataset.add_argument(
        "--max-samples", type=positive_int, help="limit the samples of the statistics pass"
    )


def load_sources(args: argparse.Namespace, minimum: int = 2) -> Sources:
    """Load and check the input models; clear errors for missing or incompatible files."""
    paths = list(args.checkpoints)
    if len(paths) < minimum:
        raise ValueError(f"give at least {minimum} checkpoints, got {len(paths)}")
    for path in paths:
        if not path.is_file() and not is_hf_folder(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
    loaded = [load_one(path, args) for path in paths]
    first = loaded[0]
    for path, other in zip(paths[1:], loaded[1:], strict=True):
        if other.spec != first.spec:
            raise ValueError(
                f"{path} holds {_describe(other.spec)} but {paths[0]} holds "
                f"{_describe(first.spec)}: merge checkpoints of the same architecture and width"
            )
        if other.data_spec != first.data_spec:
            raise ValueError(
                f"{path} was trained on data {other.data_spec} but {paths[0]} on "
                f"{first.data_spec} (class lists aside): merge models of the same kind of input"
            )
    classes = [entry.classes for entry in loaded]
    joint = [class_id for group in classes for class_id in group]
    if any(group != classes[0] for group in classes) and len(set(joint)) != len(joint):
        listed = "; ".join(f"{path}: {group}" for path, group in zip(paths, classes, strict=True))
        raise ValueError(
            f"the checkpoints' output classes overlap but differ ({listed}): models of one "
            "label set must list the classes in the same order, and joint logits need "
            "disjoint class sets"
        )
    data_spec = dict(first.data_spec, classes=sorted({c for group in classes for c in group}))
    return Sources(paths, [entry.model for entry in loaded], first.spec, classes, data_spec)


@dataclass
class Loaded:
    """One input file: its model, how to rebuild it, classes, data (no classes), metadata."""

    model: nn.Module
    spec: models.ModelSpec
    classes: list[int]
    data_spec: dict[str, Any]
    metadata: dict[str, Any]


def load_one(path: Path, args: argparse.Namespace) -> Loaded:
    """(model, spec, classes, data spec without classes, metadata) of one input file."""
    payload = read_file(path)
    if is_checkpoint(payload):
        checkpoint = rebuild(payload, path)
        spec = models.ModelSpec(checkpoint.architecture, dict(checkpoint.kwargs))
        data_spec = checkpoint.metadata.get("data")
        if not isinstance(data_spec, dict):
            data_spec = _recipe_data(checkpoint.architecture, args)
        classes = checkpoint.metadata.get("classes", data_spec.get("classes"))
        if classes is None or data_spec.get("remap_labels") is False:
            classes = range(_num_classes(checkpoint.kwargs))
        return Loaded(
            checkpoint.model, spec, list(classes), _without_classes(data_spec),
            checkpoint.metadata,
        )  # fmt: skip
    if args.model is None:
        raise ValueError(
            f"{path} is a plain state_dict (no architecture stored): name it with --model NAME "
            "and the options it was built with (--width, --norm, --hidden, --classes)"
        )
    if not isinstance(payload, dict):
        raise ValueError(f"{path} holds a {type(payload).__name__}, not a state_dict")
    data_spec = _recipe_data(args.model, args)
    classes = list(data_spec["classes"])
    kwargs = models.data_kwargs(args.model, gm_data.input_shape(data_spec), len(classes))
    kwargs["width_multiplier"] = args.width
    if args.norm is not None:
        kwargs["norm"] = args.norm
    if args.hidden:
        kwargs["hidden"] = parse_widths(args.hidden)
    model = models.build(args.model, **kwargs)
    load_state_dict_strictly(model, payload, source=str(path))
    return Loaded(model, models.spec_of(model), classes, _without_classes(data_spec), {})


def _recipe_data(architecture: str, args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipe_for(models.architecture_of(architecture))
    classes = gm_data.parse_classes(getattr(args, "classes", None), gm_data.DIGITS_NUM_CLASSES)
    return {
        "name": "digits",
        "layout": recipe["layout"],
        "image_size": recipe["image_size"],
        "channels": recipe["channels"],
        "classes": list(classes),
        "remap_labels": True,
        "batch_size": 64,
    }


def _num_classes(kwargs: dict[str, Any]) -> int:
    """The outputs a checkpoint's architecture arguments give (a HuggingFace config's labels)."""
    config = kwargs.get("config")
    if isinstance(config, dict) and isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return kwargs.get("num_classes", gm_data.DIGITS_NUM_CLASSES)


def _without_classes(spec: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in spec.items() if key not in ("classes", "remap_labels")}


def _describe(spec: models.ModelSpec) -> str:
    kwargs = ", ".join(f"{key}={value}" for key, value in sorted(spec.kwargs.items()))
    return f"{spec.architecture}({kwargs})"


@dataclass
class Loaders:
    """Statistics loader (training split, fixed order) and test loader, labels as columns."""

    statistics: DataLoader
    test: gm_data.Relabelled


def loaders_for(data_spec: dict[str, Any], output_classes: list[int]) -> Loaders:
    """The data of ``data_spec`` with original class ids, test labels mapped to the merged
    model's output columns (``output_classes[column]`` is the class id). The statistics
    loader reads the training split in order: under torchrun, this process's shard."""
    splits = gm_data.load(**dict(data_spec, remap_labels=False))
    statistics = distributed.shard_loader(splits.train.dataset, STATISTICS_BATCH)
    return Loaders(statistics, gm_data.Relabelled(splits.test, output_classes))
