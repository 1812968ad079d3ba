"""Model weights: validation, reweighted merge matrices, and interpolation along a merge."""

import pytest
import torch
from conftest import calibrated, state_hash

import graphmerge as gm
from graphmerge.matching_functions import membership_match, permutation_match
from graphmerge.weighting import model_weights, reweighted


def test_model_weights_from_alpha_or_a_list():
    assert model_weights(0.25, 2).tolist() == [0.75, 0.25]
    assert model_weights([0.2, 0.3, 0.5], 3).tolist() == [0.2, 0.3, 0.5]
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        model_weights(1.5, 2)
    with pytest.raises(ValueError, match="between 2 models, but there are 3"):
        model_weights(0.5, 3)
    with pytest.raises(ValueError, match="got 2 weights for 3 models"):
        model_weights([0.5, 0.5], 3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        model_weights([1.5, -0.5], 2)
    with pytest.raises(ValueError, match="sum to 1"):
        model_weights([0.5, 0.4], 2)


def test_reweighted_permutation_gives_the_alpha_weighted_pairs():
    partners = [torch.arange(4), torch.tensor([2, 0, 3, 1])]
    merge, _ = permutation_match(partners)
    weighted = reweighted(merge, model_weights(0.25, 2))
    assert torch.allclose(weighted[:, :4], 0.75 * torch.eye(4, dtype=torch.float64))
    assert weighted[0, 4 + 2] == 0.25 and weighted[3, 4 + 1] == 0.25


def test_reweighted_zip_clusters_stay_averages_of_their_members():
    # units 0, 1 of model 0 fused together; unit 2 of model 0 with unit 0 of model 1; ...
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # model 0: units 0-2, model 1: units 3-5
    merge, _ = membership_match(labels, 3)
    weighted = reweighted(merge, model_weights([0.9, 0.1], 2))
    assert torch.allclose(weighted.sum(dim=1), merge.sum(dim=1))  # rows still average
    assert torch.allclose(weighted[0, :2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(weighted[1, [2, 3]], torch.tensor([0.9, 0.1], dtype=torch.float64))
    only_zero_weight = reweighted(merge, model_weights([0.0, 1.0], 2))
    assert torch.allclose(only_zero_weight[0], merge[0])  # nobody of weight > 0: plain average


def test_reweighted_leaves_units_kept_side_by_side_exactly_alone():
    eye = torch.eye(6, dtype=torch.float64)  # a space kept unmerged (N*d wide)
    for weights in ([0.013, 0.987], [0.3, 0.7], [1.0, 0.0]):  # 0.013: 1/(2w) * 2w != 1
        assert torch.equal(reweighted(eye, model_weights(weights, 2)), eye)


def test_reweighted_signed_maps_scale_per_model():
    merge = torch.tensor([[0.5, -0.2, 0.3, 0.4]], dtype=torch.float64)  # a cca-like row
    weighted = reweighted(merge, model_weights(0.25, 2))
    expected = torch.tensor([[0.75, -0.3, 0.15, 0.2]], dtype=torch.float64)
    assert torch.allclose(weighted, expected)


def test_interpolation_endpoints_are_the_models_and_the_midpoint_the_merge():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    models = [calibrated(gm.models.build("mlp", hidden=(16, 8), norm="bn", seed=s), x, seed=s)
              for s in (0, 1)]  # fmt: skip
    merger = gm.Merger(models, example_input=x, progress=False)
    merger.collect([x])
    with torch.no_grad():
        outputs = [m.eval()(x) for m in models]
        for alpha, expected in ((0.0, outputs[0]), (1.0, outputs[1])):
            model = merger.merge("permute", weights=alpha).model.eval()
            assert torch.allclose(model(x), expected, atol=1e-5)
    assert state_hash(merger.merge("permute", weights=0.5).model) == state_hash(
        merger.merge("permute").model
    )
    interpolated = gm.interpolate(models, 0.0, [x], method="identity", progress=False)
    with torch.no_grad():
        assert torch.allclose(interpolated.eval()(x), outputs[0], atol=1e-5)
