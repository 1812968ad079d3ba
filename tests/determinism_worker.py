"""Merge two digits models by every method and normalization, and save the merged states.

Run as a script (``python tests/determinism_worker.py THREADS OUT``) by
test_determinism.py, so that two runs are two processes (other hash seeds, fresh
allocators): OUT gets {label: state_dict} and stdout {label: hash of the state}.
"""

from __future__ import annotations

import json
import sys

import torch
from conftest import calibrated, state_hash  # the script's folder is on sys.path

import graphmerge as gm

# (method, normalization, hyper-parameters): every matching function and normalization
MERGES = [
    ("identity", None, {}),
    ("permute", None, {}),
    ("permute", "reset", {}),
    ("permute", "repair", {}),
    ("permute", "rescale", {}),
    ("zip", None, {"alpha": 0.3, "beta": 0.125}),
    ("cca", "reset", {}),
    ("weight_matching", None, {"seed": 3}),
    ("preserve_first", None, {"inner": "zip", "k": 1}),
]


def merges(samples: int = 256) -> dict[str, torch.nn.Module]:
    """The merged models of two BatchNorm MLPs on the first ``samples`` digits, by label."""
    data = gm.data.digits(layout="flat")
    inputs = torch.stack([data.train.dataset[i][0] for i in range(samples)])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(data.train.dataset, range(samples)), batch_size=64
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same models whatever the thread count of the merges
    models = [
        calibrated(gm.models.build("mlp", hidden=(48, 32), norm="bn", seed=seed), inputs, seed)
        for seed in (0, 1)
    ]
    torch.set_num_threads(threads)
    merged = {}
    for method, normalize, options in MERGES:
        label = f"{method}+{normalize}" if normalize else method
        merged[label] = gm.merge(
            models, loader, method, normalize=normalize, progress=False, **options
        )
    return merged


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]))
    merged = merges()
    torch.save({label: model.state_dict() for label, model in merged.items()}, sys.argv[2])
    print(json.dumps({label: state_hash(model) for label, model in merged.items()}))
