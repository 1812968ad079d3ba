"""ot_fusion: the exact plan of a permuted copy is its permutation, sinkhorn tends to it,
the matrices' shapes and sums, and clear errors for bad input."""

import builtins
import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import calibrated, permuted_copies, relative_error, stats_of

import graphmerge as gm
from graphmerge.graphs import trace
from graphmerge.matching_functions import ot_fusion, permute
from graphmerge.matching_functions.ot_fusion import transport_plans


@pytest.fixture(scope="module")
def permuted_mlp():
    """An MLP, its permuted copy, the data and the statistics of the pair."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    model = calibrated(gm.models.build("mlp", hidden=(32, 16), seed=0, num_classes=10), x)
    graph = trace(model, x[:8])
    copy = graph.permute(graph.random_permutations(seed=7))
    merger = gm.Merger([model, copy], graph=graph, example_input=x)
    merger.collect([x[:128], x[128:]], progress=False)
    return SimpleNamespace(model=model, copy=copy, graph=graph, x=x, merger=merger)


def distance_to_permutation(plan: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean L1 distance of the rows of d * plan to those of d * exact (a permutation)."""
    return float((plan - exact).abs().sum())


def test_emd_plan_of_a_permuted_copy_is_its_permutation(permuted_mlp):
    pair = permuted_mlp
    for name, stats in pair.merger.statistics.items():
        width = stats.mean.shape[0] // 2
        plan = transport_plans(stats, 2)[0] * width
        ones = torch.ones(width, dtype=torch.float64)
        assert torch.allclose(plan, plan.round(), atol=1e-12), name  # 0/1 ...
        assert torch.equal(plan.round().sum(dim=0), ones)
        assert torch.equal(plan.round().sum(dim=1), ones)  # ... a permutation matrix
        # ... and the same permutation as permute's: the match is the hard one, bit for bit
        expected = permute(stats, 2)
        found = ot_fusion(stats, 2)
        assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1]), name


def test_emd_merges_a_model_with_its_permuted_copy_exactly(permuted_mlp):
    pair = permuted_mlp
    model, copy, graph, x = pair.model, pair.copy, pair.graph, pair.x
    with torch.no_grad():
        reference = model(x)
        assert relative_error(reference, copy(x)) < 1e-4  # the copy computes the same ...
        assert relative_error(model.layers.fc1.weight, copy.layers.fc1.weight) > 0.1  # ... anew
    merged = gm.merge([model, copy], [x], method="ot_fusion", graph=graph, progress=False)
    with torch.no_grad():
        assert relative_error(reference, merged.eval()(x)) < 1e-4
    averaged = gm.merge([model, copy], [x], method="identity", graph=graph, progress=False)
    with torch.no_grad():  # the control: without the alignment the outputs change
        assert relative_error(reference, averaged.eval()(x)) > 0.05


def test_emd_merges_three_permuted_copies_exactly(permuted_mlp):
    pair = permuted_mlp
    third = pair.graph.permute(pair.graph.random_permutations(seed=11))
    models = [pair.model, pair.copy, third]
    merged = gm.merge(models, [pair.x], method="ot_fusion", graph=pair.graph, progress=False)
    with torch.no_grad():
        assert relative_error(pair.model(pair.x), merged.eval()(pair.x)) < 1e-4


def test_sinkhorn_tends_to_the_permutation_as_reg_decreases(permuted_mlp):
    pair = permuted_mlp
    for name, stats in pair.merger.statistics.items():
        exact = transport_plans(stats, 2)[0]
        distances = [
            distance_to_permutation(transport_plans(stats, 2, "sinkhorn", reg)[0], exact)
            for reg in (0.3, 0.1, 0.03, 0.01)
        ]
        assert distances[0] > 0.1, (name, distances)  # reg 0.3 is soft
        assert all(a > b for a, b in itertools.pairwise(distances)), distances
    errors = []  # measured 0.50, 0.088, 2.6e-4, 0.0 (at 0.01 the plan rounds to hard)
    for reg in (0.3, 0.1, 0.03, 0.01):
        merged = pair.merger.merge("ot_fusion", solver="sinkhorn", reg=reg).model
        with torch.no_grad():
            errors.append(relative_error(pair.model(pair.x), merged.eval()(pair.x)))
    assert errors[0] > 0.1  # a soft plan blurs units: not exact ...
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-4  # ... a small reg is


def test_sinkhorn_distances_decrease_on_noisy_copies():
    blocks, perms = permuted_copies(500, 16, 2, noise=0.3, seed=3)
    stats = stats_of(*blocks)
    exact = transport_plans(stats, 2)[0]
    assert torch.equal(exact.argmax(dim=1), perms[1])  # emd finds the permutation
    distances = [
        distance_to_permutation(transport_plans(stats, 2, "sinkhorn", reg)[0], exact)
        for reg in (0.1, 0.01, 0.001)
    ]
    assert all(a > b for a, b in itertools.pairwise(distances)), distances
    assert distances[-1] < 1e-6 < distances[0]
    merge, _ = ot_fusion(stats, 2, solver="sinkhorn", reg=0.1)
    assert ((merge > 1e-6) & (merge < 0.5 - 1e-6)).any()  # soft


def test_shapes_sums_and_determinism_for_three_models():
    blocks, perms = permuted_copies(400, 12, 3, noise=0.5, seed=1)
    stats = stats_of(*blocks)
    for kwargs in ({"solver": "emd"}, {"solver": "sinkhorn", "reg": 0.2}):
        merge, unmerge = ot_fusion(stats, 3, **kwargs)
        assert merge.shape == (12, 36) and unmerge.shape == (36, 12)
        assert merge.dtype == unmerge.dtype == torch.float64
        torch.testing.assert_close(merge.sum(dim=1), torch.ones(12, dtype=torch.float64))
        eye = torch.eye(12, dtype=torch.float64)
        assert torch.equal(merge[:, :12], eye / 3) and torch.equal(unmerge[:12], eye)
        for model in (1, 2):  # U_i = (N M_i)^T, doubly stochastic
            block = unmerge[model * 12 : (model + 1) * 12]
            torch.testing.assert_close(block, 3 * merge[:, model * 12 : (model + 1) * 12].T)
            torch.testing.assert_close(block.sum(dim=0), torch.ones(12, dtype=torch.float64))
            torch.testing.assert_close(block.sum(dim=1), torch.ones(12, dtype=torch.float64))
        again = ot_fusion(stats, 3, **kwargs)
        assert torch.equal(again[0], merge) and torch.equal(again[1], unmerge)
    merge, _ = ot_fusion(stats, 3, solver="sinkhorn", reg=0.2)
    for model in (1, 2):  # the soft plan still puts most mass on the right partners
        block = merge[:, model * 12 : (model + 1) * 12]
        assert torch.equal(block.argmax(dim=1), perms[model])
        assert block.max() < 1 / 3 - 1e-3  # ... but not all of it


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "correlation"])
def test_every_metric_recovers_the_permutations(metric):
    blocks, perms = permuted_copies(400, 10, 3, noise=0.05, seed=2)
    if metric == "correlation":  # scale free: a copy read in other units matches too
        blocks[1] = 5 * blocks[1]
    stats = stats_of(*blocks)
    _, unmerge = ot_fusion(stats, 3, metric=metric)
    for model in (1, 2):
        expected = torch.zeros(10, 10, dtype=torch.float64)
        expected[perms[model], torch.arange(10)] = 1.0
        assert torch.equal(unmerge[model * 10 : (model + 1) * 10], expected), model


def test_constant_units_give_no_nan():
    features = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    features[:, :2] = 0.0  # dead units
    stats = stats_of(features, features.flip(1))
    for kwargs in ({}, {"solver": "sinkhorn", "reg": 1e-4}, {"metric": "correlation"}):
        merge, unmerge = ot_fusion(stats, 2, **kwargs)
        assert torch.isfinite(merge).all() and torch.isfinite(unmerge).all()
    merge, unmerge = ot_fusion(stats_of(torch.zeros(20, 4), torch.zeros(20, 4)), 2)
    assert torch.isfinite(merge).all() and torch.isfinite(unmerge).all()


@pytest.mark.parametrize("reg", [1e-3, 1e-5, 1e-8])
def test_sinkhorn_at_tiny_reg_stays_finite(reg):
    blocks, _ = permuted_copies(300, 16, 2, noise=0.5, seed=4)
    stats = stats_of(*blocks)
    plan = transport_plans(stats, 2, "sinkhorn", reg)[0]
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(dim=1), torch.full((16,), 1 / 16, dtype=torch.float64))


def test_bad_inputs_are_named():
    stats = stats_of(torch.randn(30, 4), torch.randn(30, 4))
    with pytest.raises(ValueError, match="solver must be one of emd, sinkhorn"):
        ot_fusion(stats, 2, solver="greenkhorn")
    with pytest.raises(ValueError, match="metric must be one of"):
        ot_fusion(stats, 2, metric="cosine")
    for reg in (0.0, -1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="finite reg > 0"):
            ot_fusion(stats, 2, solver="sinkhorn", reg=reg)
    ot_fusion(stats, 2, solver="emd", reg=0.0)  # reg is sinkhorn's only
    with pytest.raises(ValueError, match="num_models must be an integer >= 2"):
        ot_fusion(stats, 1)
    broken = stats_of(torch.randn(30, 4), torch.randn(30, 4))
    broken.total[1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf feature statistics"):
        ot_fusion(broken, 2)


def test_merge_reports_bad_solver_with_the_space(permuted_mlp):
    pair = permuted_mlp
    with pytest.raises(ValueError, match=r"ot_fusion on space .*solver must be one of"):
        pair.merger.merge("ot_fusion", solver="exact")
    with pytest.raises(ValueError, match="no hyper-parameter lam"):
        pair.merger.merge("ot_fusion", lam=0.1)


def test_missing_pot_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_pot(name, *args, **kwargs):
        if name == "ot" or name.startswith("ot."):
            raise ImportError("No module named 'ot'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pot)
    stats = stats_of(torch.randn(30, 4), torch.randn(30, 4))
    with pytest.raises(ImportError, match="pip install pot"):
        ot_fusion(stats, 2)


def test_registered_with_its_paper():
    found = gm.matching_functions.entry("ot_fusion")
    assert found.kind == "features" and "Singh & Jaggi 2020" in found.paper
    assert found.hyperparameters == {"solver": "emd", "reg": 0.01, "metric": "sqeuclidean"}
