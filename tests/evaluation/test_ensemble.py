"""Ensemble: averaged (optionally weighted) or concatenated logits of its members."""

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.evaluation import Ensemble


def members(count=3, classes=4):
    torch.manual_seed(0)
    return [nn.Linear(6, classes) for _ in range(count)]


def test_average_is_the_mean_of_the_members_logits():
    models = members()
    x = torch.randn(10, 6)
    with torch.no_grad():
        logits = [m(x) for m in models]
        out = Ensemble(models)(x)
    assert out.shape == (10, 4)
    assert torch.allclose(out, (logits[0] + logits[1] + logits[2]) / 3, atol=1e-6)


def test_weighted_average():
    models = members()
    x = torch.randn(10, 6)
    with torch.no_grad():
        logits = [m(x) for m in models]
        out = Ensemble(models, weights=[0.2, 0.3, 0.5])(x)
    expected = 0.2 * logits[0] + 0.3 * logits[1] + 0.5 * logits[2]
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, sum(logits) / 3, atol=1e-3)


def test_concat_puts_model_0_first():
    models = [nn.Linear(6, 3), nn.Linear(6, 5)]
    x = torch.randn(7, 6)
    with torch.no_grad():
        out = Ensemble(models, output="concat")(x)
        assert torch.equal(out, torch.cat([models[0](x), models[1](x)], dim=1))


def test_members_are_submodules_and_evaluate_runs_them():
    models = members(count=2)
    ensemble = Ensemble(models)
    assert [id(p) for p in ensemble.parameters()] == [id(p) for m in models for p in m.parameters()]
    x, y = torch.randn(30, 6), torch.randint(0, 4, (30,))
    with torch.no_grad():
        average = (models[0](x) + models[1](x)) / 2
    metrics = gm.evaluation.evaluate(ensemble, [(x, y)])
    assert metrics["accuracy"] == pytest.approx((average.argmax(1) == y).double().mean().item())
    assert metrics["loss"] == pytest.approx(
        nn.functional.cross_entropy(average, y).item(), rel=1e-5
    )


def test_bad_arguments_get_clear_errors():
    models = members(count=2)
    with pytest.raises(ValueError, match=r"needs a list of at least one nn\.Module"):
        Ensemble([])
    with pytest.raises(ValueError, match=r"needs a list of at least one nn\.Module"):
        Ensemble(models[0])
    with pytest.raises(ValueError, match="output must be one of average, concat, got 'sum'"):
        Ensemble(models, output="sum")
    with pytest.raises(ValueError, match="weights need output='average' and one weight per"):
        Ensemble(models, weights=[1.0])
    with pytest.raises(ValueError, match="weights need output='average'"):
        Ensemble(models, output="concat", weights=[0.5, 0.5])
