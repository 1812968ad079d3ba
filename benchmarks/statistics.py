"""Benchmark: cost of feature statistics relative to plain forward passes of the N models.

Usage:
    python benchmarks/statistics.py [--json statistics.json] [--only resnet20x4]

For each model pair (random weights, synthetic data) it times (a) the plain forward
passes of both models over the data and (b) ``collect_statistics`` over the same
data (which runs both models and accumulates the N*d x N*d moments), each the best of
3 runs in a fresh process that also reports its peak resident memory. Two sample counts show that
memory does not grow with the number of samples.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import in_fresh_process, peak_rss_mib, write_json

REPEATS = 3
# name: (architecture, kwargs, input shape, batch size, sample counts)
CASES = {
    "resnet20x4": ("resnet20", {"width_multiplier": 4}, (3, 32, 32), 64, (512, 1024)),
    "resnet50 64px": ("torchvision:resnet50", {}, (3, 64, 64), 64, (256, 512)),
    "resnet50 224px": ("torchvision:resnet50", {}, (3, 224, 224), 16, (32, 64)),
}


def run_stage(case: str, stage: str, samples: int, threads: int) -> dict:
    import graphmerge as gm
    from graphmerge.graphs import trace
    from graphmerge.statistics import collect_statistics

    torch.set_num_threads(threads)
    name, kwargs, shape, batch, _ = CASES[case]
    models = [gm.models.build(name, seed=s, **kwargs).eval() for s in (0, 1)]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, *shape, generator=generator) for _ in range(samples // batch)]
    graph = trace(models[0], batches[0][:2])
    with torch.no_grad():  # warm-up: the first call of each kernel is slower
        for model in models:
            model(batches[0][:2])
    times = []
    for _ in range(REPEATS):  # the best of a few: this shared machine's timings are noisy
        start = time.perf_counter()
        with torch.no_grad():
            if stage == "forward":
                for x in batches:
                    for model in models:
                        model(x)
            else:
                collect_statistics(models, graph, batches, progress=False)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_rss_mib": peak_rss_mib()}


def measure(case: str, stage: str, samples: int, threads: int) -> dict:
    return in_fresh_process(__file__, ["--stage", stage, "--case", case, "--samples",
                                       str(samples), "--threads", str(threads)])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="cases to run")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.case, args.stage, args.samples, args.threads)))
        return
    rows = []
    print(f"{'model pair':15s} {'samples':>7s} {'forward s':>9s} {'stats s':>8s} {'ratio':>6s} "
          f"{'fwd MiB':>8s} {'stats MiB':>9s}")  # fmt: skip
    for case in args.only or list(CASES):
        for samples in CASES[case][4]:
            forward = measure(case, "forward", samples, args.threads)
            stats = measure(case, "statistics", samples, args.threads)
            row = {
                "pair": case,
                "samples": samples,
                "forward_s": forward["seconds"],
                "statistics_s": stats["seconds"],
                "ratio": stats["seconds"] / forward["seconds"],
                "forward_peak_rss_mib": forward["peak_rss_mib"],
                "statistics_peak_rss_mib": stats["peak_rss_mib"],
            }
            rows.append(row)
            print(
                f"{case:15s} {samples:7d} {row['forward_s']:9.2f} {row['statistics_s']:8.2f} "
                f"{row['ratio']:6.2f} {row['forward_peak_rss_mib']:8.0f} "
                f"{row['statistics_peak_rss_mib']:9.0f}",
                flush=True,
            )
    write_json(args.json, rows, threads=args.threads)


if __name__ == "__main__":
    main()
