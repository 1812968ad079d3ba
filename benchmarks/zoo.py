"""Benchmark: trace and self-check every torchvision classification model and a timm zoo.

Usage:
    python benchmarks/zoo.py [--source torchvision timm] [--only NAME ...] [--json zoo.json]
    python benchmarks/zoo.py --acceptance   # the models of issue 20, nn.TransformerEncoder too

Each model is built with random weights (no download), every parameter and buffer
randomized (``gm.graphs.randomize_statistics``), traced on a small input and checked:
``check_symmetries`` permutes every mergeable space at random (2 trials) and reports the
largest output change relative to the largest output. One row per model: status, input,
parameters, trace and check seconds, hidden and mergeable spaces, coverage and the change.

Status: ``exact`` (change <= 1e-4 with spaces to merge), ``frozen`` (nothing mergeable: every
space frozen with its reason, the model is averaged as it is), ``WRONG`` (a larger change
with a space reported mergeable: a silently wrong graph), ``refused`` (GraphTraceError, a
clear error), ``CRASH`` (any other exception from graphmerge). WRONG and CRASH must be zero.
"""

from __future__ import annotations

import argparse
import gc
import re
import time
import traceback
from collections import Counter

import torch
from common import write_json

from graphmerge.graphs import GraphTraceError, randomize_statistics, trace

TOLERANCE = 1e-4
SMALL = (3, 64, 64)
# torchvision models that need more than SMALL, or an image size at construction.
TORCHVISION_INPUTS = {"inception_v3": (3, 75, 75), "maxvit_t": (3, 224, 224)}
# timm architectures from different families: (name, create_model kwargs, input shape).
TIMM = [
    ("resnet18", {}, SMALL),
    ("resnet50d", {}, SMALL),
    ("resnext26ts", {}, SMALL),
    ("seresnext26d_32x4d", {}, SMALL),
    ("skresnet18", {}, SMALL),
    ("res2net50_14w_8s", {}, SMALL),
    ("efficientnet_b0", {}, SMALL),
    ("mobilenetv2_050", {}, SMALL),
    ("mobilenetv3_small_050", {}, SMALL),
    ("lcnet_050", {}, SMALL),
    ("mnasnet_050", {}, SMALL),
    ("tinynet_e", {}, SMALL),
    ("ghostnet_050", {}, SMALL),
    ("mixnet_s", {}, SMALL),
    ("rexnet_100", {}, SMALL),
    ("densenet121", {}, SMALL),
    ("dla34", {}, SMALL),
    ("dpn68", {}, SMALL),
    ("regnetx_002", {}, SMALL),
    ("regnety_002", {}, SMALL),
    ("cspresnet50", {}, SMALL),
    ("ese_vovnet19b_dw", {}, SMALL),
    ("hrnet_w18_small", {}, SMALL),
    ("repvgg_a0", {}, SMALL),
    ("gernet_s", {}, SMALL),
    ("selecsls42b", {}, SMALL),
    ("nf_resnet26", {}, SMALL),
    ("vgg11_bn", {}, SMALL),
    ("inception_v3", {}, (3, 75, 75)),
    ("convnext_atto", {}, SMALL),
    ("convnextv2_atto", {}, SMALL),
    ("edgenext_xx_small", {}, SMALL),
    ("poolformer_s12", {}, SMALL),
    ("mobilevit_xxs", {}, (3, 256, 256)),
    ("efficientformer_l1", {}, (3, 224, 224)),
    ("fastvit_t8", {}, SMALL),
    ("levit_128s", {"img_size": 64}, SMALL),
    ("vit_tiny_patch16_224", {"img_size": 64}, SMALL),
    ("deit_tiny_patch16_224", {"img_size": 64}, SMALL),
    ("pit_ti_224", {"img_size": 64}, SMALL),
    ("cait_xxs24_224", {"img_size": 64}, SMALL),
    ("xcit_nano_12_p16_224", {"img_size": 64}, SMALL),
    ("resmlp_12_224", {"img_size": 64}, SMALL),
    ("mixer_s16_224", {"img_size": 64}, SMALL),
    ("swin_tiny_patch4_window7_224", {}, (3, 224, 224)),
]


# The models issue 20 names (structured spaces): `--acceptance` runs exactly these.
ACCEPTANCE = [
    ("torchvision", "vit_b_16", {"image_size": 64}, SMALL),
    ("torchvision", "swin_t", {}, SMALL),
    ("torchvision", "resnext50_32x4d", {}, SMALL),
    ("torchvision", "regnet_x_400mf", {}, SMALL),
    ("torchvision", "shufflenet_v2_x1_0", {}, SMALL),
    ("torchvision", "maxvit_t", {}, TORCHVISION_INPUTS["maxvit_t"]),
    ("torch", "transformer_encoder_post_norm", {"norm_first": False}, (16, 32)),
    ("torch", "transformer_encoder_pre_norm", {"norm_first": True}, (16, 32)),
    ("timm", "vit_tiny_patch16_224", {"img_size": 64}, SMALL),
    ("timm", "deit_tiny_patch16_224", {"img_size": 64}, SMALL),
    ("timm", "swin_tiny_patch4_window7_224", {}, (3, 224, 224)),
    ("timm", "efficientnet_b0", {}, SMALL),
    ("timm", "mobilenetv3_small_100", {}, SMALL),
    ("timm", "densenet121", {}, SMALL),
    ("timm", "regnetx_002", {}, SMALL),
    ("timm", "resnext26ts", {}, SMALL),
    ("timm", "cspresnet50", {}, SMALL),
    ("timm", "convnext_atto", {}, SMALL),
    ("timm", "poolformer_s12", {}, SMALL),
    ("timm", "ghostnet_100", {}, SMALL),
    ("timm", "mixnet_s", {}, SMALL),
]


def transformer_encoder(norm_first: bool) -> torch.nn.Module:
    """nn.TransformerEncoder (4 layers, width 128, 8 heads) between a Linear and a head."""
    layer = torch.nn.TransformerEncoderLayer(128, 8, 256, batch_first=True, norm_first=norm_first)
    encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), encoder, torch.nn.Linear(128, 10))


def torchvision_models(only: list[str] | None) -> list[tuple[str, dict, tuple[int, ...]]]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        if only and name not in only:
            continue
        kwargs: dict = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
        shape = TORCHVISION_INPUTS.get(name, SMALL)
        if name.startswith("vit_"):
            patch = int(re.search(r"_(\d+)$", name).group(1))
            kwargs["image_size"] = 4 * patch
            shape = (3, 4 * patch, 4 * patch)
        rows.append((name, kwargs, shape))
    return rows


def build(source: str, name: str, kwargs: dict) -> torch.nn.Module:
    if source == "torch":
        return transformer_encoder(**kwargs)
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def measure(source: str, name: str, kwargs: dict, shape: tuple[int, ...]) -> dict:
    row = {"source": source, "model": name, "input": list(shape), "status": "", "error": ""}
    try:
        model = randomize_statistics(build(source, name, kwargs)).eval()
    except Exception as error:  # the zoo's own problem, not graphmerge's
        return {**row, "status": "not built", "error": f"{type(error).__name__}: {error}"[:200]}
    row["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        start = time.perf_counter()
        graph = trace(model, x)
        traced = time.perf_counter()
        change = graph.check_symmetries(x, trials=2, seed=0, relative=True)
        checked = time.perf_counter()
    except GraphTraceError as error:
        return {**row, "status": "refused", "error": str(error).splitlines()[0][:300]}
    except Exception as error:
        detail = traceback.format_exc(limit=-3)
        return {**row, "status": "CRASH", "error": f"{type(error).__name__}: {error}"[:300],
                "traceback": detail}  # fmt: skip
    mergeable = len(graph.mergeable_spaces)
    reasons = Counter(_kind(s.reason.split(";")[0]) for s in graph.frozen_spaces)
    return {
        **row,
        "status": status(change, mergeable),
        "trace_s": round(traced - start, 2),
        "check_s": round(checked - traced, 2),
        "spaces": sum(space.role == "hidden" for space in graph.spaces),
        "mergeable": mergeable,
        "coverage": graph.coverage,
        "relative_change": change,
        "frozen_reasons": dict(reasons.most_common()),
    }


def status(change: float, mergeable: int) -> str:
    if not mergeable:
        return "frozen"
    return "WRONG" if change > TOLERANCE else "exact"


def _kind(reason: str) -> str:
    """A reason with layer names and counts blanked, so that alike reasons group."""
    return re.sub(r"\S*[\d.]\S*", "*", reason)


def print_row(row: dict) -> None:
    if print_row.first:
        print(f"{'source':11s} {'model':30s} {'status':9s} {'input':>7s} {'params M':>8s} "
              f"{'trace s':>7s} {'check s':>7s} {'spaces':>6s} {'merge':>5s} {'coverage':>8s} "
              f"{'rel change':>10s}")  # fmt: skip
        print_row.first = False
    head = f"{row['source']:11s} {row['model']:30s} {row['status']:9s} {row['input'][-1]:7d}"
    if "coverage" not in row:
        print(f"{head} {row.get('parameters_m', 0):8.1f}  {row['error'][:110]}", flush=True)
        return
    print(
        f"{head} {row['parameters_m']:8.1f} {row['trace_s']:7.2f} {row['check_s']:7.2f} "
        f"{row['spaces']:6d} {row['mergeable']:5d} {row['coverage']:8.1%} "
        f"{row['relative_change']:10.1e}",
        flush=True,
    )


print_row.first = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", nargs="*", default=["torchvision", "timm"])
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument(
        "--acceptance", action="store_true", help="only the models of issue 20 (structured spaces)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = []
    if args.acceptance:
        models = list(ACCEPTANCE)
        args.source = list(dict.fromkeys(source for source, *_ in ACCEPTANCE))
    elif "torchvision" in args.source:
        models += [("torchvision", *spec) for spec in torchvision_models(args.only)]
    if "timm" in args.source and not args.acceptance:
        models += [("timm", *spec) for spec in TIMM if not args.only or spec[0] in args.only]
    rows = []
    for source, name, kwargs, shape in models:
        rows.append(measure(source, name, kwargs, shape))
        print_row(rows[-1])
        gc.collect()
    print()
    for source in args.source:
        counts = Counter(row["status"] for row in rows if row["source"] == source)
        print(f"{source}: {sum(counts.values())} models, " + ", ".join(
            f"{counts.get(status, 0)} {status}"
            for status in ("exact", "frozen", "WRONG", "refused", "CRASH", "not built")
        ))  # fmt: skip
    for row in rows:
        if row["status"] in ("CRASH", "WRONG", "refused"):
            print(f"{row['source']} {row['model']} {row['status']}: {row['error']}")
            if "traceback" in row:
                print(row["traceback"])
    if args.markdown:
        print_markdown(rows)
    write_json(args.json, rows, tolerance=TOLERANCE, trials=2)


def print_markdown(rows: list[dict]) -> None:
    """The tables of the README: one per source, one row per model."""
    for source in dict.fromkeys(row["source"] for row in rows):
        print(f"\n{source}:\n")
        print("| model | status | input | params M | trace s | check s | mergeable | coverage "
              "| rel. change |")  # fmt: skip
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in rows:
            if row["source"] != source:
                continue
            if "coverage" not in row:
                print(f"| {row['model']} | {row['status']} | {row['input'][-1]} | "
                      f"{row.get('parameters_m', 0):.1f} | | | | | |")  # fmt: skip
                continue
            print(
                f"| {row['model']} | {row['status']} | {row['input'][-1]} | "
                f"{row['parameters_m']:.1f} | {row['trace_s']:.2f} | {row['check_s']:.2f} | "
                f"{row['mergeable']} / {row['spaces']} | {row['coverage']:.0%} | "
                f"{row['relative_change']:.1e} |"
            )


if __name__ == "__main__":
    main()
