"""``graphmerge graph``, ``models`` and ``matchers``: look at graphs, architectures and
matching functions."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import torch

from graphmerge import data as gm_data
from graphmerge import matching_functions, models
from graphmerge._atomic import atomic_write
from graphmerge.checkpoints import load_checkpoint
from graphmerge.cli.common import (
    HelpFormatter,
    add_architecture_options,
    parse_widths,
    positive_int,
)
from graphmerge.recipes import recipe_for


def add_graph(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "graph",
        help="trace a model's graph, print its spaces, prove it, draw it",
        description=(
            "Trace a model (or the model in a checkpoint) with torch.fx, print its spaces and "
            "coverage, prove the graph with random permutations of every space "
            "(check_symmetries), and optionally draw it (PNG) or write Graphviz DOT."
        ),
        epilog="example: graphmerge graph --model resnet20 --out resnet20.png",
        formatter_class=HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="architecture (see `graphmerge models`)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint from `graphmerge train`")
    add_architecture_options(parser)
    parser.add_argument("--num-classes", type=positive_int, default=10, help="outputs (--model)")
    parser.add_argument(
        "--image-size", type=positive_int, help="input image side (default: recipe)"
    )
    parser.add_argument("--channels", type=int, choices=(1, 3), help="input channels")
    parser.add_argument(
        "--hand-written",
        action="store_true",
        help="use graphmerge's hand-written graph (mlp, vgg, resnet20) instead of tracing",
    )
    parser.add_argument(
        "--trials", type=positive_int, default=3, help="random permutations to check"
    )
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
    # The check runs on a copy with every parameter random: values no permutation changes
    # (fresh norm layers, layer scales at 1e-6, zero heads) would hide a wrong graph.
    model = graphs.randomize_statistics(model, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn((4, *shape), generator=generator)
    graph = models.reference_graph(model) if args.hand_written else graphs.trace(model, example)
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
        kwargs["hidden"] = parse_widths(args.hidden)
    shape = _recipe_shape(args, architecture, kwargs)
    kwargs.update(models.data_kwargs(architecture, shape, args.num_classes))
    return models.build(args.model, seed=args.seed, **kwargs), shape


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


def add_models(commands: argparse._SubParsersAction) -> None:
    _add_listing(
        commands, "models", run_models, "list the architectures graphmerge can build",
        "List every architecture name `graphmerge train --model` accepts.",
    )  # fmt: skip


def _add_listing(
    commands: argparse._SubParsersAction, name: str, handler, help: str, description: str
) -> None:
    """A command without arguments that prints a list."""
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"example: graphmerge {name}",
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(handler=handler)


def run_models(args: argparse.Namespace) -> int:
    for name in models.available():
        print(name)
    return 0


def add_matchers(commands: argparse._SubParsersAction) -> None:
    _add_listing(
        commands, "matchers", run_matchers,
        "list the matching functions with their papers and hyper-parameters",
        "List the matching functions, their hyper-parameters and their papers.",
    )  # fmt: skip


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
