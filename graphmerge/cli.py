"""The ``graphmerge`` command line.

Example:
    graphmerge train --model resnet20 --width 2 --data digits --classes 0-4 --seed 1 --out a.pt
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import graphmerge
from graphmerge import data as gm_data
from graphmerge import matching_functions, models, training
from graphmerge._atomic import atomic_write
from graphmerge.checkpoints import load_checkpoint, save_checkpoint
from graphmerge.recipes import recipe_for

DATASETS = ("digits", "cifar10", "cifar100")
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, FloatingPointError)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default only when it has a real one (not None, not a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graphmerge`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"graphmerge {args.command}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphmerge",
        description="Merge separately trained neural networks into one, without retraining.",
    )
    parser.add_argument(
        "--version", action="version", version=f"graphmerge {graphmerge.__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_graph(commands)
    _add_models(commands)
    _add_matchers(commands)
    return parser


def _add_train(commands: argparse._SubParsersAction) -> None:
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
        formatter_class=_HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        help="architecture: mlp, vgg11/13/16/19, resnet20 or torchvision:<name> "
        "(see `graphmerge models`)",
    )
    _add_architecture_options(model)
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
    dataset.add_argument("--image-size", type=int, help="digits image side (default: recipe)")
    dataset.add_argument(
        "--channels", type=int, choices=(1, 3), help="digits image channels (default: recipe)"
    )
    dataset.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    optimisation = parser.add_argument_group("training")
    optimisation.add_argument("--epochs", type=int, help="epochs (default: recipe)")
    optimisation.add_argument(
        "--optimizer",
        choices=training.OPTIMIZERS,
        default="sgd",
        help="SGD with Nesterov momentum 0.9, or Adam",
    )
    optimisation.add_argument("--lr", type=float, help="peak learning rate (default: recipe)")
    optimisation.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty")
    optimisation.add_argument(
        "--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine schedule"
    )
    optimisation.add_argument(
        "--seed", type=int, default=0, help="seeds the initialisation and the data order"
    )
    optimisation.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    optimisation.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    parser.set_defaults(handler=run_train)


def _add_architecture_options(group: argparse._ActionsContainer) -> None:
    group.add_argument("--width", type=float, default=1.0, help="width multiplier")
    group.add_argument(
        "--norm",
        choices=("none", "bn", "ln"),
        help="normalization layers (mlp, vgg, resnet20); default: the "
        "architecture's own (none for mlp/vgg, bn for resnet20)",
    )
    group.add_argument("--hidden", help="mlp hidden widths before --width, e.g. 512,512,512")


def _add_graph(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "graph",
        help="trace a model's graph, print its spaces, prove it, draw it",
        description=(
            "Trace a model (or the model in a checkpoint) with torch.fx, print its spaces and "
            "coverage, prove the graph with random permutations of every space "
            "(check_symmetries), and optionally draw it (PNG) or write Graphviz DOT."
        ),
        epilog="example: graphmerge graph --model resnet20 --out resnet20.png",
        formatter_class=_HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="architecture (see `graphmerge models`)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint from `graphmerge train`")
    _add_architecture_options(parser)
    parser.add_argument("--num-classes", type=int, default=10, help="outputs (--model)")
    parser.add_argument("--image-size", type=int, help="input image side (default: recipe)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="input channels")
    parser.add_argument(
        "--hand-written",
        action="store_true",
        help="use graphmerge's hand-written graph (mlp, vgg, resnet20) instead of tracing",
    )
    parser.add_argument("--trials", type=int, default=3, help="random permutations to check")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the check")
    parser.add_argument("--out", type=Path, help="PNG picture of the graph")
    parser.add_argument("--dot", type=Path, help="Graphviz DOT file of the graph")
    parser.set_defaults(handler=run_graph)


def run_graph(args: argparse.Namespace) -> int:
    from graphmerge import graphs

    for path in (args.out, args.dot):
        if path is not None and not path.parent.is_dir():
            raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    model, shape = _graph_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn((4, *shape), generator=generator)
    graph = graphs.reference_graph(model) if args.hand_written else graphs.trace(model, example)
    print(graph.summary())
    change = graph.check_symmetries(example, trials=args.trials, seed=args.seed)
    with torch.no_grad():
        scale = model.eval()(example).abs().max().item()
    relative = change / max(scale, 1e-12)
    verdict = "exact" if relative < 1e-4 else "NOT EXACT: the graph is wrong"
    print(
        f"symmetry check: max output change {change:.2e} (relative {relative:.2e}) under "
        f"{args.trials} random permutations of every mergeable space: {verdict}"
    )
    if args.out is not None:
        graph.draw(args.out)
        print(f"wrote {args.out}")
    if args.dot is not None:
        with atomic_write(args.dot, "w") as handle:
            handle.write(graph.to_dot())
        print(f"wrote {args.dot}")
    return 0 if relative < 1e-4 else 1


def _graph_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The model to draw and the shape of one input sample."""
    from graphmerge.graphs import randomize_statistics

    if args.checkpoint is not None:
        checkpoint = load_checkpoint(args.checkpoint)
        spec = checkpoint.metadata.get("data")
        if isinstance(spec, dict):
            return checkpoint.model, gm_data.input_shape(spec)
        return checkpoint.model, _recipe_shape(args, checkpoint.architecture, checkpoint.kwargs)
    architecture = models.architecture_of(args.model)
    kwargs: dict[str, Any] = {"num_classes": args.num_classes, "width_multiplier": args.width}
    if args.norm is not None:
        kwargs["norm"] = args.norm
    if args.hidden:
        if architecture != "mlp":
            raise ValueError("--hidden applies to --model mlp only")
        kwargs["hidden"] = _parse_widths(args.hidden)
    shape = _recipe_shape(args, architecture, kwargs)
    kwargs.update(models.data_kwargs(architecture, shape, args.num_classes))
    model = models.build(args.model, seed=args.seed, **kwargs)
    # Fresh norm layers hold permutation-invariant values; random ones make the check strict.
    return randomize_statistics(model, seed=args.seed), shape


def _recipe_shape(
    args: argparse.Namespace, architecture: str, kwargs: dict[str, Any]
) -> tuple[int, ...]:
    recipe = recipe_for(architecture)
    if recipe["layout"] == "flat":
        return (kwargs.get("input_dim", 64),)
    size = recipe["image_size"] if args.image_size is None else args.image_size
    channels = kwargs.get("in_channels", recipe["channels"])
    channels = channels if args.channels is None else args.channels
    return (channels, size, size)


def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="list the architectures graphmerge can build")
    parser.set_defaults(handler=run_models)


def run_models(args: argparse.Namespace) -> int:
    for name in models.available():
        print(name)
    return 0


def _add_matchers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "matchers", help="list the matching functions with their papers and hyper-parameters"
    )
    parser.set_defaults(handler=run_matchers)


def run_matchers(args: argparse.Namespace) -> int:
    for name in matching_functions.available():
        entry = matching_functions.entry(name)
        hparams = ", ".join(
            name if default is inspect.Parameter.empty else f"{name}={default!r}"
            for name, default in entry.hyperparameters.items()
        )
        print(f"{name} ({entry.kind}): {entry.summary}")
        print(f"    hyper-parameters: {hparams or 'none'}")
        print(f"    paper: {entry.paper}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    if not math.isfinite(args.width) or args.width <= 0:
        raise ValueError(f"--width must be a finite number > 0, got {args.width}")
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: the folder {args.out.parent} does not exist")
    architecture = models.architecture_of(args.model)
    recipe = recipe_for(architecture)
    splits = _load_training_data(args, recipe)
    model_kwargs = _model_kwargs(args, architecture, splits)
    model = models.build(args.model, seed=args.seed, **model_kwargs)
    hyper = dict(
        epochs=recipe["epochs"] if args.epochs is None else args.epochs,
        optimizer=args.optimizer,
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
            raise ValueError("--image-size and --channels apply to image models, not to mlp")
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
        kwargs["hidden"] = _parse_widths(args.hidden)
    if args.norm is not None:
        kwargs["norm"] = args.norm
    return kwargs


def _parse_widths(text: str) -> tuple[int, ...]:
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


if __name__ == "__main__":
    sys.exit(main())
