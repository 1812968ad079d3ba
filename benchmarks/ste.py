"""Benchmark: the STE (Git Re-Basin) against weight matching on two digit MLPs.

Usage:
    python benchmarks/ste.py [--hidden 32,32,32] [--steps 50] [--lr 1e-2] [--json ste.json]

Two MLPs trained from seeds 0 and 1 on the digits' training split; their midpoint
(W_a + P(W_b)) / 2 is formed with P from identity (plain averaging), weight matching and
the STE (trained on the training split), then evaluated on the held-out test split.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json

import graphmerge as gm


def trained_pair(hidden: tuple[int, ...], data: gm.data.DataSplits) -> list[torch.nn.Module]:
    models = []
    for seed in (0, 1):
        model = gm.models.build("mlp", seed=seed, input_dim=64, num_classes=10, hidden=hidden)
        result = gm.training.train(model, data.train, epochs=10, lr=0.1, seed=seed, progress=False)
        models.append(result.model)
    return models


def measure(hidden: tuple[int, ...], steps: int, lr: float) -> list[dict]:
    data = gm.data.digits(layout="flat")
    models = trained_pair(hidden, data)
    merger = gm.Merger(models, example_input=next(iter(data.train))[0], progress=False)
    merger.collect(data.train)  # identity reads no statistics, but the engine asks for them
    runs = {
        "identity": {},
        "weight_matching": {},
        "ste": {"loader": data.train, "steps": steps, "lr": lr},
    }
    rows = []
    for method, options in runs.items():
        started = time.perf_counter()
        result = merger.merge(method, **options)
        seconds = time.perf_counter() - started
        test = gm.evaluation.evaluate(result.model, data.test)
        train = gm.evaluation.evaluate(result.model, data.train)
        rows.append({
            "hidden": "x".join(map(str, hidden)), "method": method, "seconds": seconds,
            "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "train_loss": train["loss"], "best_step": result.details.get("best_step"),
        })  # fmt: skip
    for index, model in enumerate(models):
        test = gm.evaluation.evaluate(model, data.test)
        rows.append({
            "hidden": "x".join(map(str, hidden)), "method": f"model {index}", "seconds": 0.0,
            "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "train_loss": gm.evaluation.evaluate(model, data.train)["loss"], "best_step": None,
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="32,32,32", help="hidden widths, comma-separated")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden = tuple(int(width) for width in args.hidden.split(","))
    rows = measure(hidden, args.steps, args.lr)
    print(f"{'mlp':12s} {'method':16s} {'test loss':>9s} {'test acc':>8s} {'train loss':>10s} "
          f"{'seconds':>7s} {'best step':>9s}")  # fmt: skip
    for row in rows:
        best = "-" if row["best_step"] is None else str(row["best_step"])
        print(
            f"{row['hidden']:12s} {row['method']:16s} {row['test_loss']:9.4f} "
            f"{row['test_accuracy']:8.4f} {row['train_loss']:10.4f} {row['seconds']:7.2f} "
            f"{best:>9s}"
        )
    if args.json:
        write_json(args.json, rows, steps=args.steps, lr=args.lr, hidden=list(hidden))


if __name__ == "__main__":
    main()
