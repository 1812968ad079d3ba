"""Benchmark: end-to-end merge of two torchvision ResNet-50s, time per stage and peak memory.

Usage:
    python benchmarks/merge_resnet50.py [--samples 256 512] [--image-size 64]
        [--method permute] [--normalize reset] [--json merge_resnet50.json]

Two ResNet-50s with random weights (seeds 0, 1) and synthetic images (normal noise,
generated batch by batch, so the data take no memory): trace (with the models'
checks), statistics over ``--samples`` samples, matching, fold, and normalization
on the same samples. Each sample count runs in a fresh process that reports its peak
resident memory, to show that memory does not grow with the number of samples.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch
from common import in_fresh_process, peak_rss_mib, write_json

BATCH = 64
STAGES = ("trace", "statistics", "matching", "fold", "normalize")


class SyntheticImages:
    """``samples`` normal-noise images in batches, the same ones at every pass."""

    def __init__(self, samples: int, image_size: int, seed: int = 0) -> None:
        self.samples, self.image_size, self.seed = samples, image_size, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.samples, BATCH):
            size = min(BATCH, self.samples - start)
            yield torch.randn(size, 3, self.image_size, self.image_size, generator=generator)

    def __len__(self) -> int:
        return -(-self.samples // BATCH)


def run(samples: int, image_size: int, method: str, normalize: str, threads: int) -> dict:
    import graphmerge as gm

    torch.set_num_threads(threads)
    models = [gm.models.build("torchvision:resnet50", seed=seed) for seed in (0, 1)]
    data = SyntheticImages(samples, image_size)
    seconds = {}
    start = time.perf_counter()
    merger = gm.Merger(models, example_input=next(iter(data)), progress=False)
    seconds["trace"] = time.perf_counter() - start
    start = time.perf_counter()
    merger.collect(data)
    seconds["statistics"] = time.perf_counter() - start
    result = merger.merge(method, normalize=None if normalize == "none" else normalize,
                          loader=data)  # fmt: skip
    for stage in ("matching", "fold", "normalize"):
        seconds[stage] = result.seconds.get(stage, 0.0)
    return {
        "samples": samples,
        "image_size": image_size,
        "method": method,
        "normalize": normalize,
        "seconds": seconds,
        "total_s": sum(seconds.values()),
        "peak_rss_mib": peak_rss_mib(),
        "spaces": len(merger.spaces),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--method", default="permute")
    parser.add_argument("--normalize", default="reset", choices=("none", "reset", "repair"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        row = run(args.samples[0], args.image_size, args.method, args.normalize, args.threads)
        print(json.dumps(row))
        return
    print(f"{'samples':>7s} {'px':>4s} " + " ".join(f"{stage:>10s}" for stage in STAGES)
          + f" {'total s':>8s} {'peak MiB':>9s}")  # fmt: skip
    rows = []
    for samples in args.samples:
        row = in_fresh_process(__file__, [
            "--inside", "--samples", str(samples), "--image-size", str(args.image_size),
            "--method", args.method, "--normalize", args.normalize, "--threads",
            str(args.threads),
        ])  # fmt: skip
        rows.append(row)
        times = " ".join(f"{row['seconds'][stage]:10.2f}" for stage in STAGES)
        print(f"{samples:7d} {args.image_size:4d} {times} {row['total_s']:8.2f} "
              f"{row['peak_rss_mib']:9.0f}", flush=True)  # fmt: skip
    write_json(args.json, rows, threads=args.threads)


if __name__ == "__main__":
    main()
