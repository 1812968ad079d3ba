"""``graphmerge train``: train a model on a data set and write a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import graphmerge
from graphmerge import data as gm_data
from graphmerge import models, training
from graphmerge.checkpoints import save_checkpoint
from graphmerge.cli.common import (
    DATASETS,
    HelpFormatter,
    add_architecture_options,
    check_output_file,
    checked_device,
    format_classes,
    non_negative_number,
    parse_widths,
    positive_int,
    positive_number,
)
from graphmerge.recipes import recipe_for


def add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train a model on a data set and write a checkpoint",
        description=(
            "Train a model (deterministically: the same seed gives the same weights) and write a "
            "checkpoint that rebuilds the model from the file alone. Data layout, image size, "
            "epochs and learning rate default to a per-architecture recipe for the digits."
        ),
        epilog="example: graphmerge train --model resnet20 --width 2 --data digits "
        "--classes 0-4 --seed 1 --out a.pt",
        formatter_class=HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        help="architecture: mlp, vgg11/13/16/19, resnet20, vit or torchvision:<name> "
        "(see `graphmerge models`)",
    )
    add_architecture_options(model)
    dataset = parser.add_argument_group("data")
    dataset.add_argument(
        "--data",
        choices=DATASETS,
        default="digits",
        help="data set; digits is bundled, CIFAR is read from --data-root",
    )
    dataset.add_argument(
        "--data-root", help="folder holding cifar-10-batches-py / cifar-100-python"
    )
    dataset.add_argument(
        "--classes",
        help="class subset such as 0-4 or 0,2,7-9 (labels renumbered 0..k-1); default: all classes",
    )
    dataset.add_argument(
        "--image-size", type=positive_int, help="digits image side (default: recipe)"
    )
    dataset.add_argument(
        "--channels", type=int, choices=(1, 3), help="digits image channels (default: recipe)"
    )
    dataset.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch")
    optimisation = parser.add_argument_group("training")
    optimisation.add_argument("--epochs", type=positive_int, help="epochs (default: recipe)")
    optimisation.add_argument(
        "--optimizer",
        choices=training.OPTIMIZERS,
        help="SGD with Nesterov momentum 0.9, or Adam (default: recipe, sgd for CNNs)",
    )
    optimisation.add_argument(
        "--lr", type=positive_number, help="peak learning rate (default: recipe)"
    )
    optimisation.add_argument(
        "--weight-decay", type=non_negative_number, default=5e-4, help="L2 penalty"
    )
    optimisation.add_argument(
        "--warmup-epochs",
        type=non_negative_number,
        default=1.0,
        help="linear warm-up before the cosine schedule",
    )
    optimisation.add_argument(
        "--seed", type=int, default=0, help="seeds the initialisation and the data order"
    )
    optimisation.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    optimisation.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    checked_device(args.device)
    check_output_file(args.out)
    architecture = models.architecture_of(args.model)
    recipe = recipe_for(architecture)
    splits = _load_training_data(args, recipe)
    model_kwargs = _model_kwargs(args, architecture, splits)
    model = models.build(args.model, seed=args.seed, **model_kwargs)
    hyper = dict(
        epochs=recipe["epochs"] if args.epochs is None else args.epochs,
        optimizer=args.optimizer or recipe.get("optimizer", "sgd"),
        lr=recipe["lr"] if args.lr is None else args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
    )
    result = training.train(
        model, splits.train, splits.test, device=args.device, progress=not args.quiet, **hyper
    )
    metadata = {
        "data": splits.spec,
        "classes": list(splits.classes),
        "seed": args.seed,
        "training": hyper,
        "metrics": {key: result.metrics[key] for key in ("accuracy", "loss", "num_samples")},
        "graphmerge_version": graphmerge.__version__,
    }
    result.model.to("cpu")
    save_checkpoint(result.model, args.out, metadata=metadata)
    print(
        f"test accuracy {100 * result.metrics['accuracy']:.2f}% "
        f"(loss {result.metrics['loss']:.4f}) "
        f"on {result.metrics['num_samples']} {args.data} test samples, classes "
        f"{format_classes(splits.classes)}"
    )
    print(f"wrote {args.out}")
    return 0


def _load_training_data(args: argparse.Namespace, recipe: dict[str, Any]) -> gm_data.DataSplits:
    if args.data == "digits":
        image = recipe["layout"] == "image"
        if not image and (args.image_size is not None or args.channels is not None):
            raise ValueError(
                f"--image-size and --channels apply to image models, not to {args.model}"
            )
        return gm_data.digits(
            layout=recipe["layout"],
            image_size=recipe["image_size"] if args.image_size is None else args.image_size,
            channels=recipe["channels"] if args.channels is None else args.channels,
            classes=args.classes,
            batch_size=args.batch_size,
        )
    if args.data_root is None:
        raise ValueError(f"--data {args.data} needs --data-root (a folder with the data set)")
    return gm_data.cifar(
        args.data_root, args.data, classes=args.classes, batch_size=args.batch_size
    )


def _model_kwargs(
    args: argparse.Namespace, architecture: str, splits: gm_data.DataSplits
) -> dict[str, Any]:
    kwargs = models.data_kwargs(architecture, splits.input_shape, splits.num_classes)
    kwargs["width_multiplier"] = args.width
    if args.hidden:
        if architecture != "mlp":
            raise ValueError("--hidden applies to --model mlp only")
        kwargs["hidden"] = parse_widths(args.hidden)
    if args.norm is not None:
        kwargs["norm"] = args.norm
    return kwargs
