"""OT fusion (exact EMD and Sinkhorn plans) against permute on two digit MLPs.

Usage:
    python benchmarks/ot_fusion.py [--hidden 512 512 512] [--epochs 0] [--json out.json]

Two MLPs trained on the bundled digits from seeds 0 and 1 (the ``mlp`` recipe unless
``--epochs``), statistics on the training set in a fixed order, each method with no
normalization and with REPAIR; accuracy and loss on the 359 test digits, and the
seconds of each merge.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json
from merge_digits import fixed_order, splits_for, trained

import graphmerge as gm

SETTINGS = [
    ("identity", {}),
    ("permute", {}),
    ("ot_fusion", {"solver": "emd"}),
    ("ot_fusion", {"solver": "sinkhorn", "reg": 0.1}),
    ("ot_fusion", {"solver": "sinkhorn", "reg": 0.01}),
    ("ot_fusion", {"solver": "sinkhorn", "reg": 0.001}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512, 512])
    parser.add_argument("--epochs", type=int, default=0, help="0: the recipe's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = splits_for("mlp")
    models = [trained("mlp", {"hidden": tuple(args.hidden)}, data, s, args.epochs) for s in (0, 1)]
    rows = []
    for index, model in enumerate(models):
        metrics = gm.evaluation.evaluate(model, data.test)
        rows.append({"method": f"model {index}", "normalize": "none", **metrics, "seconds": 0.0})
    fixed = fixed_order(data)
    merger = gm.Merger(models, example_input=next(iter(data.train))[0], progress=False)
    merger.collect(fixed, progress=False)
    for method, options in SETTINGS:
        for normalize in (None, "repair"):
            start = time.perf_counter()
            merged = merger.merge(method, normalize=normalize, loader=fixed, **options).model
            seconds = time.perf_counter() - start
            metrics = gm.evaluation.evaluate(merged, data.test)
            label = " ".join([method, *(f"{k}={v}" for k, v in options.items())])
            rows.append({"method": label, "normalize": normalize or "none", **metrics,
                         "seconds": round(seconds, 2)})  # fmt: skip
    for item in rows:
        print(f"{item['method']:34s} {item['normalize']:7s} acc {100 * item['accuracy']:6.2f}%  "
              f"loss {item['loss']:.4f}  {item['seconds']:.2f}s", flush=True)  # fmt: skip
    write_json(args.json, rows, threads=args.threads, hidden=args.hidden)


if __name__ == "__main__":
    main()
