"""Benchmark: trace + self-check of every supported architecture (time, spaces, coverage).

Usage:
    python benchmarks/graphs.py [--image-size 224] [--batch 2] [--hf] [--json graphs.json]

Prints one row per model: trace time, check time (3 random permutations of every
mergeable space), the relative output change (exact graphs: ~1e-7), the number of
spaces, the mergeable ones, and the coverage (fraction of hidden channels mergeable),
then the reasons for every frozen space, grouped. ``--hf`` adds HuggingFace models at
their published sizes, random weights from configs (BERT-base and GPT-2 on 128 tokens,
ViT-B/16 at 224 px), which torch.export traces.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter

import torch
from common import write_json

import graphmerge as gm
from graphmerge.graphs import randomize_statistics, trace

MODELS = [
    ("mlp", {"hidden": (512, 512, 512)}, (64,)),
    ("vgg11", {"norm": "none"}, (3, 32, 32)),
    ("vgg11", {"norm": "bn"}, (3, 32, 32)),
    ("vgg11", {"norm": "ln"}, (3, 32, 32)),
    ("resnet20", {"norm": "bn"}, (3, 32, 32)),
    ("resnet20", {"norm": "ln"}, (3, 32, 32)),
    ("resnet20", {"norm": "none"}, (3, 32, 32)),
    ("resnet20", {"norm": "bn", "width_multiplier": 4}, (3, 32, 32)),
    ("resnet20", {"norm": "ln", "width_multiplier": 4}, (3, 32, 32)),
    ("resnet20", {"norm": "none", "width_multiplier": 4}, (3, 32, 32)),
]
TORCHVISION = [
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "densenet121",
    "mobilenet_v2",
    "efficientnet_b0",
    "googlenet",
    "squeezenet1_0",
    "regnet_x_400mf",
    "mobilenet_v3_small",
    "convnext_tiny",
    "shufflenet_v2_x1_0",
]


def huggingface(name: str, batch: int) -> tuple[torch.nn.Module, dict]:
    """A HuggingFace model at its published size (random weights) and an example batch."""
    import transformers

    generator = torch.Generator().manual_seed(0)
    if name == "vit-b/16":
        config = transformers.ViTConfig()
        pixels = torch.randn(batch, 3, 224, 224, generator=generator)
        return transformers.ViTForImageClassification(config), {"pixel_values": pixels}
    if name == "bert-base":
        model = transformers.BertForSequenceClassification(transformers.BertConfig())
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False))
    ids = torch.randint(0, 1000, (batch, 128), generator=generator)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


HUGGINGFACE = ["bert-base", "gpt2", "vit-b/16"]


def measure(label: str, model: torch.nn.Module, example: object) -> dict:
    model = randomize_statistics(model)
    start = time.perf_counter()
    graph = trace(model, example)
    traced = time.perf_counter()
    change = graph.check_symmetries(example, trials=3, seed=0)
    checked = time.perf_counter()
    inputs = gm.runtime.example_inputs(example)
    with torch.no_grad():
        scale = gm.runtime.logits_of(gm.runtime.call_model(model.eval(), inputs)).abs().max()
    reasons = Counter(_kind(space.reason.split(";")[0]) for space in graph.frozen_spaces)
    return {
        "model": label,
        "tracer": graph.tracer,
        "input": inputs.describe(),
        "trace_s": round(traced - start, 3),
        "check_s": round(checked - traced, 3),
        "relative_change": change / scale.item(),
        "spaces": sum(space.role == "hidden" for space in graph.spaces),
        "mergeable": len(graph.mergeable_spaces),
        "coverage": graph.coverage,
        "frozen_reasons": dict(reasons),
    }


def _kind(reason: str) -> str:
    """A reason with layer names and counts blanked, so that alike reasons group."""
    return re.sub(r"\S*[\d.]\S*", "*", reason)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224, help="torchvision input side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="torchvision names to run (default: all)")
    parser.add_argument("--hf", action="store_true", help="also the HuggingFace models")
    parser.add_argument("--hf-only", action="store_true", help="only the HuggingFace models")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    generator = torch.Generator().manual_seed(0)
    if not args.only and not args.hf_only:
        for name, kwargs, shape in MODELS:
            label = name + "".join(f" {k}={v}" for k, v in kwargs.items() if k != "hidden")
            x = torch.randn(args.batch, *shape, generator=generator)
            rows.append(measure(label, gm.models.build(name, seed=0, **kwargs), x))
            print_row(rows[-1])
    for name in [] if args.hf_only else args.only or TORCHVISION:
        model = gm.models.build(f"torchvision:{name}", num_classes=1000, seed=0)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
        rows.append(measure(f"torchvision {name}", model, x))
        print_row(rows[-1])
    for name in HUGGINGFACE if args.hf or args.hf_only else []:
        rows.append(measure(f"huggingface {name}", *huggingface(name, args.batch)))
        print_row(rows[-1])
    print()
    for row in rows:
        for reason, count in row["frozen_reasons"].items():
            print(f"{row['model']}: {count} spaces frozen: {reason}")
    write_json(args.json, rows, threads=args.threads, image_size=args.image_size)


def print_row(row: dict) -> None:
    if print_row.first:
        print(f"{'model':34s} {'tracer':>6s} {'trace s':>8s} {'check s':>8s} "
              f"{'rel change':>10s} {'spaces':>6s} {'merge':>6s} {'coverage':>8s}")  # fmt: skip
        print_row.first = False
    print(
        f"{row['model']:34s} {row['tracer']:>6s} {row['trace_s']:8.2f} {row['check_s']:8.2f} "
        f"{row['relative_change']:10.1e} {row['spaces']:6d} {row['mergeable']:6d} "
        f"{row['coverage']:8.1%}",
        flush=True,
    )


print_row.first = True

if __name__ == "__main__":
    main()
