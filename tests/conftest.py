"""Shared fixtures: the digits data in both layouts, built once per session."""

import hashlib
import os

import pytest
import torch
from hypothesis import settings

import graphmerge as gm
from graphmerge.statistics import SpaceStatistics

# Property tests: no deadline (a model's first forward pass is slow), the same examples
# on every run (derandomized, so CI is reproducible); size bounds keep each one fast.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# graphmerge's reference models in every normalization (name, build kwargs, input shape)
REFERENCE_MODELS = [
    ("mlp", {"hidden": (32, 16)}, (64,)),
    ("mlp", {"hidden": (32, 16), "norm": "bn"}, (64,)),
    ("mlp", {"hidden": (32, 16), "norm": "ln"}, (64,)),
    ("vgg11", {"norm": "none", "width_multiplier": 0.25}, (3, 32, 32)),
    ("vgg11", {"norm": "bn", "width_multiplier": 0.25}, (3, 32, 32)),
    ("vgg11", {"norm": "ln", "width_multiplier": 0.25}, (3, 32, 32)),
    ("resnet20", {"norm": "bn"}, (3, 8, 8)),
    ("resnet20", {"norm": "ln"}, (3, 8, 8)),
    ("resnet20", {"norm": "none"}, (3, 8, 8)),
    ("resnet20", {"norm": "bn", "width_multiplier": 4}, (3, 8, 8)),
    ("resnet20", {"norm": "ln", "width_multiplier": 4}, (3, 8, 8)),
    ("resnet20", {"norm": "none", "width_multiplier": 4}, (3, 8, 8)),
]


@pytest.fixture(scope="session")
def digits_flat() -> gm.data.DataSplits:
    return gm.data.digits(layout="flat")


@pytest.fixture(scope="session")
def digits_image() -> gm.data.DataSplits:
    return gm.data.digits(layout="image")


def train_pair(architecture, kwargs, splits, epochs, lr):
    """One model per data split, trained from seeds 0, 1, ... with the given recipe."""
    models = []
    for seed, data in enumerate(splits):
        fixed = gm.models.data_kwargs(architecture, data.input_shape, data.num_classes)
        model = gm.models.build(architecture, seed=seed, **kwargs, **fixed)
        result = gm.training.train(
            model, data.train, epochs=epochs, lr=lr, seed=seed, progress=False
        )
        models.append(result.model)
    return models


def state_hash(model: torch.nn.Module) -> str:
    """A hash of every tensor in the model's state_dict (names, shapes and values)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def calibrated(model: torch.nn.Module, inputs: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """A copy with random norm affines and BatchNorm statistics measured on ``inputs``.

    Random weights plus data-matched running statistics: every unit carries a
    distinct, well-scaled signal (no unit constant on the data), and a fold that
    forgets a buffer changes the outputs.
    """
    model = gm.graphs.randomize_statistics(model, seed=seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(inputs)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other).abs().max() / reference.abs().max()).item()


def stats_of(*blocks: torch.Tensor) -> SpaceStatistics:
    """Statistics of the concatenated feature blocks (samples x d_i each)."""
    stats = SpaceStatistics.empty(sum(block.shape[1] for block in blocks))
    stats.update(torch.cat(blocks, dim=1))
    return stats


def permuted_copies(
    samples: int, width: int, num_models: int, noise: float = 0.05, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Features of model 0 and noisy permuted copies, with each copy's permutation.

    Copy i's unit perms[i][k] is model 0's unit k.
    """
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, width, generator=generator, dtype=torch.float64)
    base = base @ torch.randn(width, width, generator=generator, dtype=torch.float64) / width**0.5
    perms = [torch.arange(width)]
    perms += [torch.randperm(width, generator=generator) for _ in range(num_models - 1)]
    blocks = []
    for perm in perms:
        copy = torch.empty_like(base)
        copy[:, perm] = base
        blocks.append(copy + noise * torch.randn(samples, width, generator=generator))
    return blocks, perms
