"""identity and permute, and the registry."""

import pytest
import torch
from conftest import stats_of

import graphmerge as gm
from graphmerge.matching_functions import available, get, register, registry


def test_identity_matrices():
    merge, unmerge = get("identity")(stats_of(torch.randn(10, 3), torch.randn(10, 3)), 2)
    assert torch.equal(merge, torch.cat([torch.eye(3) / 2] * 2, dim=1).double())
    assert torch.equal(unmerge, torch.cat([torch.eye(3)] * 2).double())


@pytest.mark.parametrize("num_models", [2, 3])
def test_permute_recovers_permutations_of_noisy_copies(num_models):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 12, generator=generator)
    perms = [torch.arange(12)] + [
        torch.randperm(12, generator=generator) for _ in range(num_models - 1)
    ]
    blocks = [features[:, p] + 0.05 * torch.randn(500, 12, generator=generator) for p in perms]
    merge, unmerge = get("permute")(stats_of(*blocks), num_models)
    assert merge.shape == (12, 12 * num_models) and unmerge.shape == (12 * num_models, 12)
    assert torch.allclose(merge.sum(dim=1), torch.ones(12, dtype=torch.float64))
    for model, perm in enumerate(perms):
        block = unmerge[model * 12 : (model + 1) * 12]
        expected = torch.zeros(12, 12, dtype=torch.float64)
        expected[torch.arange(12), perm] = 1.0  # this model's unit j is model 0's unit perm[j]
        assert torch.equal(block, expected), model


def test_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert {"identity", "permute"} <= set(available())
    with pytest.raises(ValueError, match="unknown matching function 'zipp'"):
        get("zipp")

    @register("halves")
    def halves(stats, num_models):
        return get("identity")(stats, num_models)

    assert get("halves") is halves and "halves" in available()
    models = [gm.models.build("mlp", hidden=(8,), seed=s) for s in (0, 1)]
    x = torch.randn(16, 64)
    merged = gm.merge(models, [x], method="halves", progress=False)
    reference = gm.merge(models, [x], method="identity", progress=False)
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in reference.state_dict().items())
    with pytest.raises(ValueError, match="non-empty name"):
        register("")


def constant_copies(width=10, constants=4, seed=0):
    """Model 0's features and a permuted copy; the first ``constants`` units are constant on
    the data with distinct values (a zeroed row with its bias)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(200, width, generator=generator, dtype=torch.float64)
    features[:, :constants] = torch.linspace(-1.0, 2.0, constants, dtype=torch.float64)
    perm = torch.randperm(width, generator=generator)
    return features, features[:, perm], perm


def test_constant_units_are_told_apart_by_their_values():
    features, copy, perm = constant_copies()
    stats = stats_of(features, copy)
    similarity = gm.matching_functions.common.unit_similarity(stats)
    assert torch.allclose(stats.correlation[0, 10:], torch.zeros(10, dtype=torch.float64))
    partner = int(torch.argsort(perm)[0])  # the copy's unit holding model 0's unit 0
    assert similarity[0, 10 + partner] == 1.0
    assert (similarity[0, 10:].topk(2).values[1] < 0.9).item()  # the others are further
    varying = torch.cat([torch.arange(10) >= 4, perm >= 4])  # the copy's unit k is unit perm[k]
    torch.testing.assert_close(  # pairs of varying units keep their correlation
        similarity[varying][:, varying], stats.correlation[varying][:, varying]
    )


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_permute_and_zip_match_constant_units_to_their_copies(method):
    features, copy, _ = constant_copies()
    kwargs = {"beta": 0.0} if method == "zip" else {}
    merge, unmerge = get(method)(stats_of(features, copy), 2, **kwargs)
    merged = torch.cat([features, copy], dim=1) @ merge.T  # the merged features
    torch.testing.assert_close(merged @ unmerge[:10].T, features)  # each unit recovered
