"""PLeaS against permute and zip under a width budget, on the bundled digits, and its speed.

Usage:
    python benchmarks/pleas.py [--quick] [--budgets 1.0 1.25 1.5 2.0] [--json out.json]

Pairs of ResNet-20 (BatchNorm, width x2 by default) trained from seeds 0 and 1: on the same task
(all ten digits, logits averaged) and on disjoint tasks (digits 0-4 / 5-9, joint
logits over 0-9, per-task accuracy on each half's test digits). For each budget b (the
merged width over the models' width, in [1, 2]):
- "permute (partial)": permute's pairs, the least correlated kept unmerged (pleas with
  steps=0), so that the merged width is b * d in every space;
- "zip": ZipIt! to merged width b * d (reduction 1 - b / 2);
- "pleas": the same partial permute, then the least-squares refit of every layer;
each with no normalization and with REPAIR. Statistics and the least squares read the
1438 training digits in a fixed order; accuracies are on the 359 test digits. The speed
rows (a ResNet-20 x4 pair, best of ``--repeats``) time pleas's least squares against
permute + REPAIR.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json
from merge_digits import fixed_order, splits_for, trained

import graphmerge as gm

ARCHITECTURE = "resnet20"
BUDGETS = (1.0, 1.25, 1.5, 2.0)
TASKS = [list(range(5)), list(range(5, 10))]


def variants(budget: float) -> list[tuple[str, str, dict]]:
    return [
        ("permute (partial)", "pleas", {"budget": budget, "steps": 0}),
        ("zip", "zip", {"reduction": 1 - budget / 2}),
        ("pleas", "pleas", {"budget": budget}),
    ]


def accuracies(model, test, tasks) -> dict:
    """Accuracy on ``test``, and on each task's digits with the task's own logits."""
    metrics = gm.evaluation.evaluate(model, test, tasks=tasks)
    found = {"accuracy": metrics["accuracy"]}
    for index, value in enumerate(metrics.get("task_accuracy", []) if tasks else []):
        found[f"task {index}"] = value
    return found


def budget_rows(setting, merger, loader, test, tasks, budgets, output) -> list[dict]:
    rows = []
    for budget in budgets:
        for label, method, hparams in variants(budget):
            if method == "pleas":
                hparams = {**hparams, "loader": loader, "max_samples": None}
            for normalize in (None, "repair"):
                start = time.perf_counter()
                extra = {"normalize": normalize}
                if normalize and "loader" not in hparams:
                    extra["loader"] = loader
                result = merger.merge(method, output=output, **hparams, **extra)
                seconds = time.perf_counter() - start
                width = sum(m.merged_width for m in result.matches.values()) / sum(
                    space.width for space in merger.spaces
                )
                rows.append({
                    "setting": setting, "budget": budget, "width": round(width, 3),
                    "method": label, "normalize": normalize or "none",
                    **accuracies(result.model, test, tasks), "seconds": round(seconds, 2),
                })  # fmt: skip
                print_row(rows[-1])
    return rows


def speed_rows(setting, merger, loader, repeats: int) -> list[dict]:
    """Best of ``repeats``: permute + REPAIR, and pleas (budget 1) with its least squares."""
    timings = {"permute + repair": [], "pleas least squares": [], "pleas total": []}
    for _ in range(repeats):
        start = time.perf_counter()
        merger.merge("permute", normalize="repair", loader=loader)
        timings["permute + repair"].append(time.perf_counter() - start)
        start = time.perf_counter()
        result = merger.merge("pleas", budget=1.0, loader=loader, max_samples=None)
        timings["pleas total"].append(time.perf_counter() - start)
        timings["pleas least squares"].append(result.seconds["refit"])
    base = min(timings["permute + repair"])
    rows = [
        {"setting": setting, "method": name, "seconds": round(min(values), 2),
         "ratio": round(min(values) / base, 2)}
        for name, values in timings.items()
    ]  # fmt: skip
    for item in rows:
        print(f"{item['setting']:28s} {item['method']:22s} {item['seconds']:7.2f}s "
              f"{item['ratio']:5.2f}x", flush=True)  # fmt: skip
    return rows


def print_row(item: dict) -> None:
    tasks = "  ".join(
        f"{key} {100 * item[key]:6.2f}%" for key in ("task 0", "task 1") if key in item
    )
    print(
        f"{item['setting']:28s} b={item['budget']:<5} {item['method']:18s} "
        f"{item['normalize']:7s} acc {100 * item['accuracy']:6.2f}%  {tasks}  "
        f"{item['seconds']:.1f}s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, width x1")
    parser.add_argument("--width", type=float, default=2, help="ResNet-20 width multiplier")
    parser.add_argument("--speed-width", type=float, default=4,
                        help="width of the pair the speed rows time (0: none)")  # fmt: skip
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--skip-disjoint", action="store_true")
    parser.add_argument("--skip-same-task", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="speed: best of this many")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width = 1 if args.quick else args.width
    kwargs, epochs = {"norm": "bn", "width_multiplier": width}, 3 if args.quick else 0
    label = f"resnet20 bn x{width:g}"
    full = splits_for(ARCHITECTURE)
    loader = fixed_order(full)
    rows: list[dict] = []
    if args.speed_width:
        speed_kwargs = {"norm": "bn", "width_multiplier": args.speed_width}
        models = [trained(ARCHITECTURE, speed_kwargs, full, seed, epochs) for seed in (0, 1)]
        merger = gm.Merger(models, example_input=next(iter(loader))[0], progress=False)
        merger.collect(loader)
        rows += speed_rows(f"resnet20 bn x{args.speed_width:g}", merger, loader, args.repeats)
    if not args.skip_same_task:
        models = [trained(ARCHITECTURE, kwargs, full, seed, epochs) for seed in (0, 1)]
        for index, model in enumerate(models):
            accuracy = accuracies(model, full.test, None)["accuracy"]
            print(f"{label} same task: model {index} {100 * accuracy:.2f}%")
        merger = gm.Merger(models, example_input=next(iter(loader))[0], progress=False)
        merger.collect(loader)
        rows += budget_rows(f"{label} same task", merger, loader, full.test, None,
                            args.budgets, "average")  # fmt: skip
    if not args.skip_disjoint:
        halves = [splits_for(ARCHITECTURE, "0-4"), splits_for(ARCHITECTURE, "5-9")]
        models = [trained(ARCHITECTURE, kwargs, half, seed, epochs) for seed, half in
                  enumerate(halves)]  # fmt: skip
        merger = gm.Merger(models, example_input=next(iter(loader))[0], progress=False)
        merger.collect(loader)  # statistics on both tasks' data
        rows += budget_rows(f"{label} disjoint", merger, loader, full.test, TASKS,
                            args.budgets, "concat")  # fmt: skip
    write_json(args.json, rows, threads=args.threads, architecture=label)


if __name__ == "__main__":
    main()
