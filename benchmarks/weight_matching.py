"""Benchmark: weight matching (Git Re-Basin) time and objective on ResNet-20 x4 and MLP 3x2048.

Usage:
    python benchmarks/weight_matching.py [--json weight_matching.json]

Two cases per architecture (random weights): a pair from seeds 0 and 1, where the
objective sum_params <W_0, P(W_1)> is printed before and after matching, and model 0
with a randomly permuted copy of itself, where matching must recover the permutation:
the objective then reaches sum_params |W_0|^2 (reported as "recovered").
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json

import graphmerge as gm
from graphmerge.graphs import trace
from graphmerge.matching_functions import weight_matching

CASES = {
    "resnet20 x4": ("resnet20", {"width_multiplier": 4}, (2, 3, 32, 32)),
    "mlp 3x2048": ("mlp", {"hidden": (2048, 2048, 2048)}, (2, 64)),
}


def objective(graph, a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Weight matching's objective at the identity: sum of <W_a, W_b> over the parameters
    that a mergeable space touches."""
    params = {block.param for space in graph.mergeable_spaces for block in space.param_axes}
    state_a, state_b = a.state_dict(), b.state_dict()
    return float(sum((state_a[p].double() * state_b[p].double()).sum() for p in params))


def measure(label: str, threads: int) -> list[dict]:
    name, kwargs, shape = CASES[label]
    torch.set_num_threads(threads)
    first, second = (gm.models.build(name, seed=seed, **kwargs) for seed in (0, 1))
    graph = trace(first, torch.randn(*shape))
    copy = graph.permute(graph.random_permutations(seed=1), first)
    rows = []
    for case, other in (("seeds 0, 1", second), ("permuted copy", copy)):
        start = time.perf_counter()
        found = weight_matching([first.state_dict(), other.state_dict()], graph)
        seconds = time.perf_counter() - start
        rows.append({
            "model": label,
            "case": case,
            "seconds": seconds,
            "sweeps": found.sweeps,
            "objective_before": objective(graph, first, other),
            "objective_after": found.objective[-1],
            "objective_self": objective(graph, first, first),
            "spaces": len(found.permutations),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    print(f"{'model':12s} {'case':14s} {'spaces':>6s} {'seconds':>8s} {'sweeps':>6s} "
          f"{'before':>12s} {'after':>12s} {'recovered':>9s}")  # fmt: skip
    rows = []
    for label in CASES:
        for row in measure(label, args.threads):
            rows.append(row)
            recovered = abs(row["objective_after"] - row["objective_self"]) <= 1e-6 * abs(
                row["objective_self"]
            )
            shown = str(recovered) if row["case"] == "permuted copy" else "-"
            print(
                f"{row['model']:12s} {row['case']:14s} {row['spaces']:6d} {row['seconds']:8.2f} "
                f"{row['sweeps']:6d} {row['objective_before']:12.1f} "
                f"{row['objective_after']:12.1f} {shown:>9s}",
                flush=True,
            )
    write_json(args.json, rows, threads=args.threads)


if __name__ == "__main__":
    main()
