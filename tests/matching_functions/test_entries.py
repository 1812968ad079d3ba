"""The matching protocol: the engine hands an entry a MatchingProblem and folds its Solution;
a new kind of method needs no edit in the engine or the harness."""

import pytest
import torch

import graphmerge as gm
from graphmerge.comparison import compare
from graphmerge.matching_functions import (
    Entry,
    MatchingProblem,
    Solution,
    permutation_match,
    register_entry,
    registry,
)


@pytest.fixture
def registered(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def flipped(problem: MatchingProblem, seed: int = 0) -> Solution:
    """Model 1's units reversed in every space: a joint method that reads no statistics."""
    matches = {}
    for space in problem.spaces:
        partners = [torch.arange(space.width), torch.arange(space.width).flip(0)]
        matches[space.name] = gm.Match(*permutation_match(partners))
    return Solution(matches, {"seed": seed, "spaces": [s.name for s in problem.spaces]})


class Joint(Entry):
    kind = "joint"
    needs_statistics = False
    provided = frozenset({"problem"})

    def solve(self, problem, hparams):
        return self.function(problem, **hparams)


class Recorder(Entry):
    """Needs statistics; records the problem it was handed, then matches by identity."""

    kind = "recorder"
    provided = frozenset({"problem"})

    def solve(self, problem, hparams):
        self.function(problem)
        identity = gm.matching_functions.get("identity")
        return Solution(
            {s.name: gm.Match(*identity(problem.statistics[s.name], 2)) for s in problem.spaces}
        )


def pair():
    return [gm.models.build("mlp", hidden=(16, 8), seed=seed) for seed in (0, 1)]


def test_a_joint_method_merges_by_name_without_statistics(registered):
    register_entry(Joint("flipped", flipped, paper="test"))
    models, x = pair(), torch.randn(32, 64)
    merger = gm.Merger(models, example_input=x, progress=False)
    result = merger.merge("flipped", seed=4, start_at=1)
    assert result.details == {"seed": 4, "spaces": ["layers.fc2"]}
    # the fold applied the reversal: merged unit k averages unit k of model 0 and d-1-k of 1
    fc2 = [model.layers.fc2 for model in models]
    expected = (fc2[0].bias + fc2[1].bias.flip(0)) / 2
    assert torch.allclose(result.model.layers.fc2.bias, expected)
    direct = gm.merge(models, None, "flipped", example_input=x, progress=False)
    assert direct.layers.fc1.weight.shape == (16, 64)
    with pytest.raises(ValueError, match="has no hyper-parameter problem"):
        merger.merge("flipped", problem=None)


def test_the_harness_compares_a_new_kind_of_method(registered, digits_flat):
    register_entry(Joint("flipped", flipped))
    models = pair()
    merger = gm.Merger(models, example_input=torch.randn(8, 64), progress=False)
    table = compare(merger, digits_flat.test, methods=["flipped", "weight_matching"],
                    progress=False)  # fmt: skip
    assert [row["method"] for row in table.merges()] == ["flipped", "weight_matching"]


def test_an_entry_gets_the_statistics_the_positions_and_the_data(registered):
    seen = []
    register_entry(Recorder("recorder", seen.append))
    models, x = pair(), torch.randn(32, 64)
    merger = gm.Merger(models, example_input=x, progress=False)
    with pytest.raises(ValueError, match="needs feature statistics: call collect"):
        merger.merge("recorder")
    merger.collect([x])
    loader = [x]
    result = merger.merge("recorder", start_at=1, normalize="repair", loader=loader)
    (problem,) = seen
    assert [s.name for s in problem.spaces] == ["layers.fc2"]
    assert problem.positions == {"layers.fc1": 0, "layers.fc2": 1} and problem.num_spaces == 2
    assert problem.statistics is merger.statistics and problem.loader is loader
    assert problem.num_models == 2 and list(problem.states[1]) == list(models[1].state_dict())
    assert result.merged == ["layers.fc2"]


def test_a_solution_missing_a_space_is_refused(registered):
    register_entry(Joint("nothing", lambda problem: Solution({})))
    merger = gm.Merger(pair(), example_input=torch.randn(8, 64), progress=False)
    with pytest.raises(ValueError, match=r"nothing returned no Match for space 'layers\.fc1'"):
        merger.merge("nothing")


def test_register_entry_refuses_what_is_not_an_entry(registered):
    with pytest.raises(TypeError, match="needs an Entry"):
        register_entry(flipped)
    with pytest.raises(ValueError, match="non-empty name"):
        register_entry(Joint("", flipped))
