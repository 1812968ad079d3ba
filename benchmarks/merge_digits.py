"""Merging trained digit models: endpoints, ensemble and every matching function.

Usage:
    python benchmarks/merge_digits.py [--quick] [--only "resnet20 bn x4"] [--json out.json]

Trains pairs of models on the bundled digits from different seeds (same task), and
pairs trained on disjoint class halves (0-4 and 5-9, merged with joint logits,
output="concat"), merges them with each method and prints test accuracy and loss.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json

import graphmerge as gm
from graphmerge.recipes import recipe_for

PAIRS = [
    ("mlp", {}),
    ("resnet20", {"norm": "ln", "width_multiplier": 1}),
    ("resnet20", {"norm": "bn", "width_multiplier": 1}),
    ("resnet20", {"norm": "bn", "width_multiplier": 4}),
    ("resnet20", {"norm": "ln", "width_multiplier": 4}),
    ("resnet20", {"norm": "none", "width_multiplier": 4}),
]
DISJOINT = [PAIRS[0], PAIRS[1], PAIRS[3]]
METHODS = ("identity", "permute", "zip", "cca", "weight_matching")


def splits_for(architecture: str, classes: str | None = None) -> gm.data.DataSplits:
    recipe = recipe_for(architecture)
    if recipe["layout"] == "flat":
        return gm.data.digits(layout="flat", classes=classes)
    return gm.data.digits(
        layout="image", image_size=recipe["image_size"], channels=recipe["channels"],
        classes=classes,
    )  # fmt: skip


def trained(architecture: str, kwargs: dict, data: gm.data.DataSplits, seed: int, epochs: int):
    recipe = recipe_for(architecture)
    fixed = gm.models.data_kwargs(architecture, data.input_shape, data.num_classes)
    model = gm.models.build(architecture, seed=seed, **kwargs, **fixed)
    result = gm.training.train(
        model, data.train, epochs=epochs or recipe["epochs"], lr=recipe["lr"], seed=seed,
        progress=False,
    )  # fmt: skip
    return result.model


def label_of(architecture: str, kwargs: dict) -> str:
    norm = f" {kwargs['norm']}" if "norm" in kwargs else ""
    return f"{architecture}{norm} x{kwargs.get('width_multiplier', 1)}"


def fixed_order(data: gm.data.DataSplits) -> torch.utils.data.DataLoader:
    """The training set in a fixed order: statistics and RESET then see the same batches
    whatever ran before (the shuffling loader draws from torch's global random state)."""
    return torch.utils.data.DataLoader(data.train.dataset, batch_size=data.train.batch_size)


def with_reset(rows: list[dict], setting: str, label: str, model, data) -> None:
    """BatchNorm models: also the merged model after RESET (statistics recomputed)."""
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        reset = gm.normalization.reset_bn(model, fixed_order(data))
        rows.append(row(setting, f"{label} + reset_bn", reset, data.test))


def row(setting: str, label: str, model: torch.nn.Module, test, seconds: float = 0.0) -> dict:
    metrics = gm.evaluation.evaluate(model, test)
    return {
        "setting": setting,
        "model": label,
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "seconds": round(seconds, 3),
    }


def same_task(architecture: str, kwargs: dict, epochs: int, methods) -> list[dict]:
    data = splits_for(architecture)
    models = [trained(architecture, kwargs, data, seed, epochs) for seed in (0, 1)]
    setting = f"{label_of(architecture, kwargs)} same task"
    rows = [row(setting, f"model {i}", m, data.test) for i, m in enumerate(models)]
    merger = gm.Merger(models, example_input=next(iter(data.train))[0])
    merger.collect(fixed_order(data), progress=False)
    ensemble = merger.merge("identity", stop_at=0).model
    rows.append(row(setting, "ensemble", ensemble, data.test))
    for method in methods:
        start = time.perf_counter()
        merged = merger.merge(method).model
        rows.append(row(setting, method, merged, data.test, time.perf_counter() - start))
        with_reset(rows, setting, method, merged, data)
    return rows


def disjoint(architecture: str, kwargs: dict, epochs: int, methods) -> list[dict]:
    halves = [splits_for(architecture, "0-4"), splits_for(architecture, "5-9")]
    models = [trained(architecture, kwargs, d, seed, epochs) for seed, d in enumerate(halves)]
    full = splits_for(architecture)
    setting = f"{label_of(architecture, kwargs)} disjoint 0-4 / 5-9"
    merger = gm.Merger(models, example_input=next(iter(full.train))[0])
    merger.collect(fixed_order(full), progress=False)  # statistics on both tasks' data
    rows = [row(setting, "ensemble (joint logits)", merger.merge("identity", stop_at=0,
                output="concat").model, full.test)]  # fmt: skip
    for method in methods:
        start = time.perf_counter()
        merged = merger.merge(method, output="concat").model
        rows.append(row(setting, method, merged, full.test, time.perf_counter() - start))
        with_reset(rows, setting, method, merged, full)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, mlp and resnet20 ln x1")
    parser.add_argument("--only", help="run the pairs whose label contains this text")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--skip-disjoint", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = 3 if args.quick else 0
    pairs = PAIRS[:2] if args.quick else PAIRS
    disjoint_pairs = [] if args.skip_disjoint else DISJOINT[:2] if args.quick else DISJOINT
    if args.only:
        pairs = [pair for pair in pairs if args.only in label_of(*pair)]
        disjoint_pairs = [pair for pair in disjoint_pairs if args.only in label_of(*pair)]
    rows: list[dict] = []
    for architecture, kwargs in pairs:
        new = same_task(architecture, kwargs, epochs, args.methods)
        print_rows(new)
        rows += new
    for architecture, kwargs in disjoint_pairs:
        new = disjoint(architecture, kwargs, epochs, args.methods)
        print_rows(new)
        rows += new
    write_json(args.json, rows, threads=args.threads)


def print_rows(rows: list[dict]) -> None:
    for item in rows:
        print(
            f"{item['setting']:36s} {item['model']:26s} acc {100 * item['accuracy']:6.2f}%  "
            f"loss {item['loss']:.4f}  merge {item['seconds']:.2f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
