"""Merging HuggingFace text transformers trained on the digits as tokens.

Usage:
    python benchmarks/merge_text.py [--quick] [--models hf:bert hf:gpt2] [--json out.json]

Trains two small models (2 layers, width 64, 4 heads; ``graphmerge.recipes``: Adam,
lr 3e-3, 30 epochs) of each architecture from seeds 0 and 1 on the digits read as 65
tokens (a [CLS] token, then each pixel's intensity 0..16), merges them with every method
x normalization of the comparison harness, and prints test accuracy, loss and the loss
barrier (merged loss minus the mean of the endpoints' losses). Batches are HuggingFace
dicts (input_ids, attention_mask, labels); the models are traced by torch.export.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json

import graphmerge as gm
from graphmerge.recipes import recipe_for

METHODS = ("identity", "permute", "zip", "weight_matching")
NORMALIZATIONS = (None, "repair", "rescale")


def trained(architecture: str, data: gm.data.DataSplits, seed: int, epochs: int | None):
    recipe = recipe_for(architecture)
    fixed = gm.models.data_kwargs(architecture, data.input_shape, data.num_classes)
    model = gm.models.build(architecture, seed=seed, **fixed)
    result = gm.training.train(
        model, data.train, epochs=epochs or recipe["epochs"], optimizer=recipe["optimizer"],
        lr=recipe["lr"], seed=seed, progress=False,
    )  # fmt: skip
    return result.model


def compare(architecture: str, epochs: int | None, methods, normalizations) -> list[dict]:
    data = gm.data.digits(layout="tokens")
    started = time.perf_counter()
    models = [trained(architecture, data, seed, epochs) for seed in (0, 1)]
    training = time.perf_counter() - started
    ordered = torch.utils.data.DataLoader(data.train.dataset, batch_size=256)
    example = {k: v for k, v in next(iter(ordered)).items() if k != "labels"}
    merger = gm.Merger(models, example_input=example, progress=False)
    merger.collect(ordered, progress=False)
    table = gm.comparison.compare(
        merger, data.test, methods, normalizations, loader=ordered, progress=False
    )
    endpoints = [row["loss"] for row in table.rows if row["kind"] == "model"]
    rows = []
    for row in table.rows:
        rows.append(
            {
                "model": architecture,
                "name": row["name"],
                "kind": row["kind"],
                "accuracy": row["accuracy"],
                "loss": row["loss"],
                "barrier": row["loss"] - sum(endpoints) / len(endpoints),
                "seconds": row["seconds"],
                "training_seconds": round(training, 1),
            }
        )
    return rows


def print_rows(rows: list[dict]) -> None:
    for item in rows:
        seconds = "" if item["seconds"] is None else f"{item['seconds']:6.2f}s"
        print(
            f"{item['model']:10s} {item['name']:26s} acc {100 * item['accuracy']:6.2f}%  "
            f"loss {item['loss']:.4f}  barrier {item['barrier']:+.4f}  {seconds}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, hf:bert only")
    parser.add_argument("--models", nargs="+", default=["hf:bert", "hf:gpt2"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    architectures = ["hf:bert"] if args.quick else args.models
    rows: list[dict] = []
    for architecture in architectures:
        new = compare(architecture, 3 if args.quick else None, args.methods, NORMALIZATIONS)
        print_rows(new)
        rows += new
    write_json(args.json, rows, threads=args.threads)


if __name__ == "__main__":
    main()
