"""weight_matching: exact recovery of random permutations, MergeMany, data-free merging."""

import pytest
import torch
from conftest import assert_same_state, relative_error

import graphmerge as gm
from graphmerge.graphs import randomize_statistics, trace
from graphmerge.matching_functions import merge_many, weight_matching

MODELS = [
    ("mlp", {"hidden": (32, 16)}, (64,)),
    ("resnet20", {"norm": "bn"}, (3, 8, 8)),
    ("torchvision:resnet18", {"num_classes": 10, "width_multiplier": 0.25}, (3, 32, 32)),
]


def permuted_pair(name, kwargs, shape, seed=1):
    model = randomize_statistics(gm.models.build(name, seed=0, **kwargs), seed=0)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    graph = trace(model, x)
    perms = graph.random_permutations(seed=seed)
    return model, graph.permute(perms, model), graph, perms, x


@pytest.mark.parametrize(("name", "kwargs", "shape"), MODELS, ids=[m[0] for m in MODELS])
def test_recovers_random_permutation_exactly(name, kwargs, shape):
    model, permuted, graph, perms, x = permuted_pair(name, kwargs, shape)
    found = weight_matching([model.state_dict(), permuted.state_dict()], graph, seed=0)
    assert set(found.permutations) == {space.name for space in graph.mergeable_spaces}
    for space, (first, second) in found.permutations.items():
        assert torch.equal(first, torch.arange(len(first)))
        assert torch.equal(second, perms[space].argsort()), space  # copy unit -> original unit
    assert found.objective == sorted(found.objective)
    norm = sum(float(v.double().pow(2).sum()) for v in model.state_dict().values()
               if v.is_floating_point())  # fmt: skip
    assert found.objective[-1] <= norm * (1 + 1e-9)
    merged = gm.merge([model, permuted], None, "weight_matching", example_input=x)
    with torch.no_grad():
        assert relative_error(model.eval()(x), merged.eval()(x)) < 1e-5


def test_the_sequential_start_escapes_the_local_optimum_of_the_identity_start():
    """A first layer of 2 units: from the identity, coordinate descent settles with them
    swapped (the published start); solving the spaces in order recovers the copy."""
    model = gm.models.build("mlp", hidden=(2, 8), seed=2)
    graph = trace(model, torch.randn(2, 64))
    perms = graph.random_permutations(seed=2)
    states = [model.state_dict(), graph.permute(perms, model).state_dict()]
    best = weight_matching([states[0], states[0]], graph).objective[-1]  # sum of |W_0|^2
    stuck = weight_matching(states, graph, start="identity")
    assert stuck.objective[-1] < 0.8 * best
    found = weight_matching(states, graph)  # start="sequential"
    assert found.objective[-1] == pytest.approx(best, rel=1e-12)
    for space, (_, second) in found.permutations.items():
        assert torch.equal(second, perms[space].argsort()), space


def test_only_biases_carry_the_signal():
    # identical rows in, identical columns out: the weights cannot tell units apart,
    # so only the outer product of the biases (not a scalar dot product) can
    model = gm.models.build("mlp", hidden=(12,), seed=0)
    with torch.no_grad():
        model.layers.fc1.weight.copy_(model.layers.fc1.weight[:1].expand(12, 64))
        model.head.weight.copy_(model.head.weight[:, :1].expand(10, 12))
        model.layers.fc1.bias.copy_(torch.linspace(-1, 1, 12))
    graph = trace(model, torch.randn(2, 64))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    permuted = graph.permute({"layers.fc1": perm}, model)
    found = weight_matching([model.state_dict(), permuted.state_dict()], graph)
    assert torch.equal(found.permutations["layers.fc1"][1], perm.argsort())


def test_merge_many_aligns_three_permuted_copies():
    model, _, graph, _, x = permuted_pair("mlp", {"hidden": (32, 16)}, (64,))
    perms = [graph.random_permutations(seed=s) for s in (1, 2, 3)]
    copies = [graph.permute(p, model) for p in perms]
    found = weight_matching([c.state_dict() for c in copies], graph, seed=0)
    assert found.sweeps >= 1 and len(found.objective) == found.sweeps
    for space, per_model in found.permutations.items():
        originals = [perms[i][space][per_model[i]] for i in range(3)]  # original unit of each k
        assert torch.equal(originals[0], originals[1]) and torch.equal(originals[1], originals[2])
    merged = gm.merge(copies, None, "weight_matching", example_input=x)
    with torch.no_grad():
        assert relative_error(model(x), merged(x)) < 1e-5
    again = merge_many([c.state_dict() for c in copies], graph, seed=0)
    assert all(
        torch.equal(a, b)
        for space in again.permutations
        for a, b in zip(again.permutations[space], found.permutations[space], strict=True)
    )


def test_trained_models_objective_and_determinism():
    models = [gm.models.build("mlp", hidden=(32, 16), seed=s) for s in (0, 1)]
    x = torch.randn(8, 64)
    merger = gm.Merger(models, example_input=x)
    result = merger.merge("weight_matching", seed=5)
    objective = result.details["objective"]
    assert objective == sorted(objective) and result.details["sweeps"] == len(objective)
    again = merger.merge("weight_matching", seed=5)
    assert_same_state(result.model, again.model)
    first = merger.merge("weight_matching", start_at=1)
    assert first.merged == [merger.spaces[1].name]
    kept = first.matches[merger.spaces[0].name]
    assert kept.merged_width == 2 * merger.spaces[0].width


def test_bad_arguments():
    model, permuted, graph, _, x = permuted_pair("mlp", {"hidden": (8,)}, (64,))
    states = [model.state_dict(), permuted.state_dict()]
    with pytest.raises(ValueError, match="not mergeable spaces"):
        weight_matching(states, graph, spaces=["nonsense"])
    with pytest.raises(ValueError, match="max_sweeps must be a positive integer"):
        weight_matching(states, graph, max_sweeps=0)
    with pytest.raises(ValueError, match="start must be one of sequential, identity, got 'x'"):
        weight_matching(states, graph, start="x")
    with pytest.raises(ValueError, match="at least 2 models"):
        weight_matching(states[:1], graph)
    with pytest.raises(ValueError, match="no hyper-parameter gamma"):
        gm.merge([model, permuted], None, "weight_matching", example_input=x, gamma=1.0)
    with pytest.raises(ValueError, match="needs a data loader"):
        gm.merge([model, permuted], None, "permute", example_input=x)
    with pytest.raises(ValueError, match="graph or an example_input"):
        gm.merge([model, permuted], None, "weight_matching")
