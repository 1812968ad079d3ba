"""Benchmark: statistics throughput in 1 process against 2 processes (torch.distributed, gloo).

Usage:
    python benchmarks/distributed_statistics.py [--samples 2048] [--json distributed.json]

Two ResNet-20 x4 with random weights, synthetic 32x32 images. Each configuration
(processes x torch threads per process) runs ``collect_statistics`` over the same
samples; under torchrun every process reads its ``ShardSampler`` shard and the sums
are all_reduced at the end (included in the time). The time of a configuration is
its slowest process's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from common import in_fresh_process, write_json

BATCH = 64
CONFIGURATIONS = ((1, 1), (1, 2), (2, 1))  # (processes, threads per process)


def inside(samples: int, threads: int) -> dict:
    """One process's part; prints the configuration's result on rank 0."""
    import graphmerge as gm
    from graphmerge.graphs import trace
    from graphmerge.statistics import collect_statistics

    torch.set_num_threads(threads)
    joined = gm.distributed.init_from_environment("cpu")
    models = [gm.models.build("resnet20", width_multiplier=4, seed=s).eval() for s in (0, 1)]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 3, 32, 32, generator=generator)
    dataset = torch.utils.data.TensorDataset(images)
    loader = gm.distributed.shard_loader(dataset, BATCH)
    graph = trace(models[0], images[:2])
    with torch.no_grad():
        models[0](images[:2])  # warm-up
    if joined:
        torch.distributed.barrier()
    start = time.perf_counter()
    stats = collect_statistics(models, graph, loader, progress=False)
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    if joined:
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.destroy_process_group()
    counted = next(iter(stats.values())).count
    return {"seconds": float(seconds), "feature_samples": counted}


def configuration(processes: int, threads: int, samples: int) -> dict:
    launcher = () if processes == 1 else (
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"
    )  # fmt: skip
    arguments = ["--inside", "--samples", str(samples), "--threads", str(threads)]
    return in_fresh_process(__file__, arguments, launcher, {"OMP_NUM_THREADS": str(threads)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        found = inside(args.samples, args.threads)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(found))
        return
    print(f"{'processes':>9s} {'threads':>7s} {'seconds':>8s} {'samples/s':>10s} {'vs 1x1':>7s}")
    rows = []
    for processes, threads in CONFIGURATIONS:
        found = configuration(processes, threads, args.samples)
        rate = args.samples / found["seconds"]
        rows.append({"processes": processes, "threads": threads, "samples": args.samples,
                     "seconds": found["seconds"], "samples_per_s": rate,
                     "feature_samples": found["feature_samples"]})  # fmt: skip
        print(f"{processes:9d} {threads:7d} {found['seconds']:8.2f} {rate:10.1f} "
              f"{rate / rows[0]['samples_per_s']:6.2f}x", flush=True)  # fmt: skip
    if len({row["feature_samples"] for row in rows}) != 1:
        raise RuntimeError("the configurations counted different samples: sharding is broken")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
