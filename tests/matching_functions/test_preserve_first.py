"""preserve_first: the PFM scope as a matching function, identical to start_at=k."""

import pytest
import torch
from conftest import assert_same_state, stats_of

import graphmerge as gm
from graphmerge.matching_functions import get, preserve_first


@pytest.mark.parametrize(("inner", "hparams"), [("zip", {"alpha": 0.5}), ("permute", {})])
def test_preserve_first_equals_start_at(inner, hparams):
    models = [gm.models.build("resnet20", norm="ln", seed=s) for s in (0, 1)]
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    merger = gm.Merger(models, example_input=x)
    merger.collect([x[:32], x[32:]], progress=False)
    for k in (0, 3, len(merger.spaces)):
        scoped = merger.merge("preserve_first", inner=inner, k=k, **hparams)
        started = merger.merge(inner, start_at=k, **hparams)
        assert_same_state(scoped.model, started.model)
        widths = [m.merged_width for m in scoped.matches.values()]
        assert widths[:k] == [2 * s.width for s in merger.spaces[:k]]


def test_preserve_first_as_a_function():
    stats = stats_of(torch.randn(40, 5), torch.randn(40, 5))
    merge, unmerge = preserve_first(stats, 2, position=0, k=1, inner="permute")
    assert torch.equal(merge, torch.eye(10, dtype=torch.float64)) and torch.equal(merge, unmerge)
    inner = get("zip")(stats, 2, alpha=0.2)
    outer = preserve_first(stats, 2, position=1, k=1, inner="zip", alpha=0.2)
    assert all(torch.equal(a, b) for a, b in zip(inner, outer, strict=True))


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"k": -1}, "integer k >= 0"),
        ({"k": 1.5}, "integer k >= 0"),
        ({"inner": "weight_matching"}, "start_at=1"),
        ({"inner": "zipp"}, "Did you mean 'zip'"),
        ({"inner": "permute", "alpha": 0.3}, "no hyper-parameter alpha"),
    ],
)
def test_preserve_first_bad_arguments(hparams, message):
    stats = stats_of(torch.randn(40, 5), torch.randn(40, 5))
    with pytest.raises(ValueError, match=message):
        preserve_first(stats, 2, position=0, **hparams)
