"""Normalization after merging and after pruning, on the bundled digits.

Usage:
    python benchmarks/normalization_digits.py [--quick] [--only "vgg11"] [--json out.json]

Merging: pairs of models trained from seeds 0 and 1 (same task), merged with
permute at the midpoint, then evaluated with no normalization, RESET (BatchNorm
statistics recomputed), REPAIR and RESCALE; an interpolation curve along the aligned
path with and without REPAIR. Pruning: 50% magnitude pruning (L1, unstructured, every
conv and linear weight) of model 0, then RESET / REPAIR / RESCALE toward the
unpruned model (``match_statistics``). Statistics use the training set in a fixed
order; accuracy and loss are on the 359 test digits.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import write_json
from merge_digits import label_of, splits_for, trained
from torch import nn
from torch.nn.utils import prune

import graphmerge as gm

PAIRS = [
    ("vgg11", {"norm": "none", "width_multiplier": 0.5}),
    ("resnet20", {"norm": "none", "width_multiplier": 4}),
    ("resnet20", {"norm": "bn", "width_multiplier": 4}),
]
QUICK_PAIRS = [("vgg11", {"norm": "none", "width_multiplier": 0.25}), ("resnet20", {"norm": "bn"})]
PRUNED = [PAIRS[0], PAIRS[2]]
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def row(setting: str, label: str, model: nn.Module, test, seconds: float = 0.0) -> dict:
    metrics = gm.evaluation.evaluate(model, test)
    return {"setting": setting, "model": label, "accuracy": metrics["accuracy"],
            "loss": metrics["loss"], "seconds": round(seconds, 3)}  # fmt: skip


def normalizations(model: nn.Module) -> list[str | None]:
    """RESET only where there is BatchNorm to reset."""
    return [None, "reset", "repair", "rescale"] if has_batch_norm(model) else [None, "repair",
                                                                             "rescale"]  # fmt: skip


def merging(architecture: str, kwargs: dict, epochs: int, curve: bool) -> list[dict]:
    data = splits_for(architecture)
    fixed = fixed_order(data)
    models = [trained(architecture, kwargs, data, seed, epochs) for seed in (0, 1)]
    setting = f"{label_of(architecture, kwargs)} permute"
    rows = [row(setting, f"model {i}", m, data.test) for i, m in enumerate(models)]
    merger = gm.Merger(models, example_input=next(iter(fixed))[0], progress=False)
    merger.collect(fixed)
    for normalize in normalizations(models[0]):
        start = time.perf_counter()
        result = merger.merge("permute", normalize=normalize, loader=fixed)
        label = f"midpoint + {normalize or 'nothing'}"
        rows.append(row(setting, label, result.model, data.test, time.perf_counter() - start))
    if curve:
        for normalize in (None, "repair"):
            for alpha in ALPHAS:
                result = merger.merge("permute", weights=alpha, normalize=normalize, loader=fixed)
                label = f"alpha {alpha:.2f} + {normalize or 'nothing'}"
                rows.append(row(f"{setting} curve", label, result.model, data.test))
    return rows


def pruned_half(model: nn.Module) -> nn.Module:
    """A copy with 50% of every conv and linear weight zeroed by magnitude (mask kept)."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(module, "weight", amount=0.5)
    return copied


def pruning(architecture: str, kwargs: dict, epochs: int) -> list[dict]:
    data = splits_for(architecture)
    fixed = fixed_order(data)
    model = trained(architecture, kwargs, data, 0, epochs)
    pruned = pruned_half(model)
    setting = f"{label_of(architecture, kwargs)} pruned 50%"
    rows = [row(setting, "unpruned", model, data.test), row(setting, "pruned", pruned, data.test)]
    if has_batch_norm(model):
        start = time.perf_counter()
        reset = gm.normalization.reset_bn(pruned, fixed)
        rows.append(row(setting, "pruned + reset", reset, data.test, time.perf_counter() - start))
    for mode in ("repair", "rescale"):
        start = time.perf_counter()
        fixed_model = gm.normalization.match_statistics(pruned, model, fixed, mode=mode,
                                                        progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        rows.append(row(setting, f"pruned + {mode}", fixed_model, data.test, seconds))
    return rows


def fixed_order(data: gm.data.DataSplits):
    """The training set in a fixed order (statistics passes must see the same samples)."""
    return torch.utils.data.DataLoader(data.train.dataset, batch_size=128, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, small models")
    parser.add_argument("--only", help="run the pairs whose label contains this text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = 3 if args.quick else 0
    pairs, pruned = (QUICK_PAIRS, QUICK_PAIRS) if args.quick else (PAIRS, PRUNED)
    if args.only:
        pairs = [pair for pair in pairs if args.only in label_of(*pair)]
        pruned = [pair for pair in pruned if args.only in label_of(*pair)]
    rows: list[dict] = []
    for index, (architecture, kwargs) in enumerate(pairs):
        new = merging(architecture, kwargs, epochs, curve=index == 0)
        print_rows(new)
        rows += new
    for architecture, kwargs in pruned:
        new = pruning(architecture, kwargs, epochs)
        print_rows(new)
        rows += new
    write_json(args.json, rows, threads=args.threads)


def print_rows(rows: list[dict]) -> None:
    for item in rows:
        print(
            f"{item['setting']:34s} {item['model']:26s} acc {100 * item['accuracy']:6.2f}%  "
            f"loss {item['loss']:.4f}  {item['seconds']:.2f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
