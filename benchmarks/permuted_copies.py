"""Benchmark: a model merged with a randomly permuted copy of itself must come back exactly.

Usage:
    python benchmarks/permuted_copies.py [--only NAME ...] [--methods permute weight_matching]
                                         [--json copies.json]

Each model is built with random weights, every parameter randomized, traced, and permuted
at random in every mergeable space and block index (heads and within heads, groups and
within groups, the residual stream, the MLPs). ``permute`` (statistics on 64 random
inputs) and ``weight_matching`` (no data) then merge the model with its copy; the table
gives the largest output error relative to the largest output (< 1e-4 passes) and the
seconds of each merge (statistics, matching and fold); "identity error" is the error of
plain averaging (no alignment), to show what the alignment undoes.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json
from zoo import SMALL, build

import graphmerge as gm
from graphmerge.graphs import randomize_statistics, trace

TOLERANCE = 1e-4
SAMPLES = 64
MODELS = [  # (source, name, constructor kwargs, input shape)
    ("torchvision", "vit_b_16", {"image_size": 64}, SMALL),
    ("torchvision", "swin_t", {}, SMALL),
    ("torchvision", "resnext50_32x4d", {}, SMALL),
    ("torchvision", "maxvit_t", {}, (3, 224, 224)),
    ("torch", "transformer_encoder_post_norm", {"norm_first": False}, (16, 32)),
    ("torch", "transformer_encoder_pre_norm", {"norm_first": True}, (16, 32)),
    ("timm", "vit_tiny_patch16_224", {"img_size": 64}, SMALL),
    ("timm", "deit_tiny_patch16_224", {"img_size": 64}, SMALL),
    ("timm", "swin_tiny_patch4_window7_224", {}, (3, 224, 224)),
]


def measure(source: str, name: str, kwargs: dict, shape: tuple, methods: list[str]) -> dict:
    model = randomize_statistics(build(source, name, kwargs)).eval()
    batch = 8 if shape[-1] > 64 else SAMPLES
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    graph = trace(model, x[:2])
    copy = graph.permute(graph.random_permutations(seed=1))
    row = {"source": source, "model": name, "coverage": graph.coverage}
    with torch.no_grad():
        reference = model(x)
        scale = float(reference.abs().max())
        averaged = gm.merge([model, copy], [x], "identity", graph=graph, progress=False)
        row["identity_error"] = float((averaged(x) - reference).abs().max()) / scale
        for method in methods:
            start = time.perf_counter()
            data = None if method == "weight_matching" else [x]
            merged = gm.merge(
                [model, copy], data, method, graph=graph, example_input=x[:2], progress=False
            )
            row[f"{method}_s"] = round(time.perf_counter() - start, 2)
            row[f"{method}_error"] = float((merged(x) - reference).abs().max()) / scale
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--methods", nargs="*", default=["permute", "weight_matching"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | coverage | identity error | " + " | ".join(
        f"{m} error | {m} s" for m in args.methods
    ) + " |")  # fmt: skip
    print("| --- | ---: | ---: |" + " ---: | ---: |" * len(args.methods))
    for source, name, kwargs, shape in MODELS:
        if args.only and name not in args.only:
            continue
        row = measure(source, name, kwargs, shape, args.methods)
        rows.append(row)
        cells = " | ".join(f"{row[f'{m}_error']:.1e} | {row[f'{m}_s']:.1f}" for m in args.methods)
        print(
            f"| {source} {name} | {row['coverage']:.0%} | {row['identity_error']:.2f} | {cells} |",
            flush=True,
        )
    failed = [row["model"] for row in rows for m in args.methods if row[f"{m}_error"] > TOLERANCE]
    print(f"\n{len(rows)} models, {len(failed)} merges above {TOLERANCE:g}: {failed or 'none'}")
    write_json(args.json, rows, tolerance=TOLERANCE, samples=SAMPLES)


if __name__ == "__main__":
    main()
