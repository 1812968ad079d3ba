"""cca: exact on permuted copies, stable on rank-deficient covariances, checked gamma."""

import pytest
import torch
from conftest import permuted_copies, stats_of

from graphmerge.matching_functions import cca


def permutation_blocks(perms, width):
    """Expected unmerge: copy i's unit perms[i][k] is merged unit k."""
    blocks = []
    for perm in perms:
        block = torch.zeros(width, width, dtype=torch.float64)
        block[perm, torch.arange(width)] = 1.0
        blocks.append(block)
    return torch.cat(blocks)


@pytest.mark.parametrize(("num_models", "gamma"), [(2, 0.0), (2, 0.1), (3, 1.0)])
def test_cca_recovers_permutations_exactly(num_models, gamma):
    blocks, perms = permuted_copies(300, 16, num_models, noise=0.0, seed=num_models)
    merge, unmerge = cca(stats_of(*blocks), num_models, gamma=gamma)
    expected = permutation_blocks(perms, 16)
    assert torch.allclose(unmerge, expected, atol=1e-8)
    assert torch.allclose(merge, expected.T / num_models, atol=1e-8)


def test_cca_with_noise_maps_onto_the_right_units():
    blocks, perms = permuted_copies(2000, 16, 2, noise=0.1, seed=7)
    merge, unmerge = cca(stats_of(*blocks), 2, gamma=0.01)
    assert torch.equal(merge[:, 16:].argmax(dim=1), perms[1])
    assert torch.equal(unmerge[16:].argmax(dim=0), perms[1])
    # every model's block is invertible: unmerge_i @ (N * merge_i) = I
    assert torch.allclose(unmerge[16:] @ merge[:, 16:] * 2, torch.eye(16, dtype=torch.float64))


def test_cca_rank_deficient_covariances_stay_finite():
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(100, 3, generator=generator) @ torch.randn(3, 10, generator=generator)
    dead = torch.cat([low_rank[:, :8], torch.zeros(100, 2)], dim=1)  # two constant units
    stats = stats_of(dead, low_rank.flip(1))
    for gamma in (0.0, 1e-3):
        merge, unmerge = cca(stats, 2, gamma=gamma)
        assert torch.isfinite(merge).all() and torch.isfinite(unmerge).all()
    merge, unmerge = cca(stats_of(torch.zeros(20, 4), torch.zeros(20, 4)), 2, gamma=0.0)
    assert torch.isfinite(merge).all() and torch.isfinite(unmerge).all()


@pytest.mark.parametrize("gamma", [-0.1, float("nan"), float("inf"), "0.1"])
def test_cca_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma >= 0"):
        cca(stats_of(torch.randn(30, 4), torch.randn(30, 4)), 2, gamma=gamma)
