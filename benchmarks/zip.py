"""Benchmark: the fast ZipIt! greedy against the copying one of the published code.

Usage:
    python benchmarks/zip.py [--widths 256 512 1024 2048] [--models 2 3] [--json zip.json]

For each width d per model and number of models N (d' = d, alpha 0.3, beta 0.125) on
the correlation of random features: the seconds of ``greedy_clusters`` (best of
``--repeats``), the seconds of the naive oracle of the tests (which removes a row
and a column, copying the matrix, at every step like the published code) where
N * d <= --reference-max, and whether both give identical clusters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "matching_functions"))
from zip_oracle import oracle_clusters

from graphmerge.matching_functions.zipit import greedy_clusters


def correlation(total: int, seed: int = 0) -> torch.Tensor:
    """The correlation of 2*total samples of random features mixed by a random matrix."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2 * total, total, generator=generator, dtype=torch.float64)
    features = features @ torch.randn(total, total, generator=generator, dtype=torch.float64)
    return torch.corrcoef(features.T)


def measure(width: int, num_models: int, repeats: int, reference: bool) -> dict:
    matrix = correlation(num_models * width)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        labels = greedy_clusters(matrix.numpy(), num_models, width, 0.3, 0.125)
        times.append(time.perf_counter() - start)
    row = {"d": width, "N": num_models, "fast_s": min(times), "reference_s": None, "same": None}
    if reference:
        start = time.perf_counter()
        expected = oracle_clusters(matrix, num_models, width, 0.3, 0.125)
        row["reference_s"] = time.perf_counter() - start
        row["same"] = bool((torch.as_tensor(labels) == expected).all())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--models", type=int, nargs="+", default=[2, 3], help="values of N")
    parser.add_argument(
        "--reference-max", type=int, default=2048, help="largest N * d for the copying oracle"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'d':>6s} {'N':>3s} {'fast s':>8s} {'copying s':>10s} {'speed-up':>9s} {'same':>5s}")
    rows = []
    for count in args.models:
        for width in args.widths:
            row = measure(width, count, args.repeats, count * width <= args.reference_max)
            rows.append(row)
            reference = row["reference_s"]
            compared = (
                f"{reference:10.2f} {reference / row['fast_s']:8.0f}x {row['same']!s:>5s}"
                if reference
                else f"{'-':>10s} {'-':>9s} {'-':>5s}"
            )
            print(f"{width:6d} {count:3d} {row['fast_s']:8.3f} {compared}", flush=True)
    write_json(args.json, rows, threads=args.threads)


if __name__ == "__main__":
    main()
