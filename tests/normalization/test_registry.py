"""The normalization registry: names checked in one place, your own normalization by name."""

import pytest
import torch

import graphmerge as gm
from graphmerge.comparison import compare
from graphmerge.normalization import registry
from graphmerge.runtime import copy_model


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_the_built_in_normalizations_are_registered_in_order():
    assert gm.normalization.available()[:3] == ["reset", "repair", "rescale"]
    assert gm.normalization.check_name(None) is None
    assert gm.normalization.check_name("repair") == "repair"
    with pytest.raises(ValueError, match=r"unknown normalization 'x': choose one of reset, rep"):
        gm.normalization.check_name("x")
    with pytest.raises(ValueError, match=r"\(or none\)"):
        gm.normalization.check_name("x", none="none")
    with pytest.raises(ValueError, match="normalize='reset' needs data"):
        gm.normalization.check_data("reset", None)


def test_a_registered_normalization_runs_by_name_in_merge_and_compare(registered, digits_flat):
    requests = []

    @gm.normalization.register("zero_bias")
    def zero_bias(request):
        requests.append(request)
        model = copy_model(request.model)
        with torch.no_grad():
            model.head.bias.zero_()
        return gm.normalization.Renormalized(model, "zero_bias")

    models = [gm.models.build("mlp", hidden=(16,), seed=seed) for seed in (0, 1)]
    x = torch.randn(32, 64)
    loader = [x]
    merger = gm.Merger(models, example_input=x, progress=False)
    merger.collect(loader)
    plain = merger.merge("permute")
    result = merger.merge("permute", normalize="zero_bias", loader=loader)
    assert torch.equal(result.model.head.bias, torch.zeros(10))
    assert torch.equal(plain.model.head.weight, result.model.head.weight)
    assert result.normalize == "zero_bias" and result.details["normalization"].mode == "zero_bias"
    (request,) = requests
    assert request.loader is loader and request.graph is merger.graph
    assert request.matches is result.matches and list(request.references) == models
    assert not torch.equal(plain.model.head.bias, torch.zeros(10))  # the input was not touched
    table = compare(merger, digits_flat.test, methods=["permute"],
                    normalizations=[None, "zero_bias"], loader=loader, progress=False)  # fmt: skip
    assert [row["normalize"] for row in table.merges()] == ["none", "zero_bias"]
