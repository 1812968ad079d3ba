"""zip: identical clusters to the naive oracle, recovery of permutations, bad arguments."""

import warnings

import numpy as np
import pytest
import torch
from conftest import permuted_copies, stats_of
from zip_oracle import oracle_clusters

from graphmerge.matching_functions import get, permute
from graphmerge.matching_functions.zipit import greedy_clusters


def random_correlation(total: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3 * total, total, generator=generator, dtype=torch.float64)
    features = features @ torch.randn(total, total, generator=generator, dtype=torch.float64)
    return torch.corrcoef(features.T)


CASES = [
    # (d, N, merged width, alpha, beta)
    (8, 2, 8, 0.3, 0.125),
    (8, 3, 8, 0.0, 0.0),
    (16, 2, 16, 1.0, 0.5),
    (16, 3, 24, 0.3, 0.125),
    (32, 2, 40, 0.0, 0.125),
    (32, 3, 32, 0.5, 0.0),
    (64, 2, 64, 0.3, 0.125),
    (64, 3, 100, 0.0, 1.0),
    (128, 2, 128, 0.1, 0.25),
    (256, 2, 256, 0.3, 0.125),
    (256, 3, 256, 0.0, 0.125),
]


@pytest.mark.filterwarnings("ignore:zip. the within-model budgets:RuntimeWarning")
@pytest.mark.parametrize(("width", "num_models", "merged", "alpha", "beta"), CASES)
def test_fast_greedy_equals_oracle(width, num_models, merged, alpha, beta):
    for seed in range(2 if width <= 64 else 1):
        correlation = random_correlation(num_models * width, seed)
        try:
            expected = oracle_clusters(correlation, num_models, merged, alpha, beta)
        except ValueError:
            with pytest.raises(ValueError, match="no admissible pair"):
                greedy_clusters(correlation.numpy(), num_models, merged, alpha, beta)
            continue
        labels = greedy_clusters(correlation.numpy(), num_models, merged, alpha, beta)
        assert np.array_equal(labels, expected.numpy()), (seed, alpha, beta)
        assert labels.max() == merged - 1


def test_zip_matrices_follow_clusters():
    blocks = [torch.randn(200, 12, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    stats = stats_of(*blocks)
    merge, unmerge = get("zip")(stats, 2, merged_width=15)
    labels = oracle_clusters(stats.correlation, 2, 15, 0.3, 0.125)
    assert unmerge.shape == (24, 15) and merge.shape == (15, 24)
    assert torch.equal(unmerge, torch.nn.functional.one_hot(labels, 15).double())
    sizes = unmerge.sum(dim=0)
    assert torch.equal(merge, (unmerge / sizes).T)
    assert torch.allclose(merge @ unmerge, torch.eye(15, dtype=torch.float64))


@pytest.mark.parametrize(("num_models", "alpha"), [(2, 0.01), (3, 1.0)])
def test_zip_recovers_permutations_like_permute(num_models, alpha):
    # N = 3 needs alpha near 1: a matched pair must still attract its third unit
    blocks, _ = permuted_copies(400, 24, num_models, seed=num_models)
    stats = stats_of(*blocks)
    merge, unmerge = get("zip")(stats, num_models, alpha=alpha, beta=0.0)
    expected_merge, expected_unmerge = permute(stats, num_models)
    assert torch.equal(unmerge, expected_unmerge)
    assert torch.allclose(merge, expected_merge)


def test_zip_within_model_fusions_obey_the_budget():
    # two nearly duplicated units inside each model: the only within-model fusions
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    model = torch.cat([base, base[:, :1] + 0.01 * torch.randn(500, 1, generator=generator)], 1)
    stats = stats_of(model, model.flip(1) + 0.3 * torch.randn(500, 7, generator=generator))
    _, unmerge = get("zip")(stats, 2, beta=2.0)
    within = unmerge[:7].sum(dim=0).max()
    assert within == 2  # units 0 and 6 of model 0 were fused
    _, strict = get("zip")(stats, 2, merged_width=14)
    assert torch.equal(strict, torch.eye(14, dtype=torch.float64))


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"alpha": -0.1}, "0 <= alpha <= 1"),
        ({"alpha": 1.5}, "0 <= alpha <= 1"),
        ({"beta": -1.0}, "beta >= 0"),
        ({"beta": float("nan")}, "beta >= 0"),
        ({"merged_width": 5}, r"outside \[6, 12\]"),
        ({"merged_width": 13}, r"outside \[6, 12\]"),
        ({"merged_width": 6.5}, "must be an integer"),
        ({"reduction": 1.0}, "0 <= reduction < 1"),
        ({"reduction": 0.5, "merged_width": 6}, "not both"),
    ],
)
def test_zip_rejects_bad_hyperparameters(hparams, message):
    stats = stats_of(torch.randn(50, 6), torch.randn(50, 6))
    with pytest.raises(ValueError, match=message):
        get("zip")(stats, 2, **hparams)


def test_zip_reduction_sets_width():
    stats = stats_of(torch.randn(50, 6), torch.randn(50, 6), torch.randn(50, 6))
    merge, _ = get("zip")(stats, 3, reduction=0.5)
    assert merge.shape == (9, 18)


def test_spent_budgets_are_lifted_with_a_warning_when_no_pair_is_left():
    """N = 3 on the defaults: once every model's within-model budget is spent and the clusters
    left share representatives' models, the budgets are lifted (a warning names them) rather
    than failing; a larger beta never needs it. alpha = 0 blocks for good: a clear error."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(384, 192, generator=generator, dtype=torch.float64)
    features = features @ torch.randn(192, 192, generator=generator, dtype=torch.float64)
    similarity = torch.corrcoef(features.T)
    with pytest.warns(RuntimeWarning, match=r"budgets \(5 fusions per model, beta=0.125\)"):
        labels = greedy_clusters(similarity.numpy(), 3, 64, 0.3, 0.125)
    assert labels.max() == 63 and np.bincount(labels).min() >= 1
    assert np.array_equal(labels, oracle_clusters(similarity, 3, 64, 0.3, 0.125).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert greedy_clusters(similarity.numpy(), 3, 64, 0.3, 0.5).max() == 63
    with pytest.raises(ValueError, match="with alpha=0 a cluster never fuses again"):
        greedy_clusters(similarity.numpy()[:128, :128], 2, 16, 0.0, 0.0)
