"""REPAIR and RESCALE: exact targets, where corrections fold, reports and bad inputs."""

import pytest
import torch
from conftest import calibrated, state_hash
from torch import nn
from torch.nn.utils import prune

import graphmerge as gm
from graphmerge.normalization import renormalize
from graphmerge.statistics import ReadPoint, collect_moments

# (name, build kwargs, input shape): BatchNorm, LayerNorm, no norm with residual sums
CASES = [
    ("mlp", {"hidden": (24, 16), "norm": "bn"}, (64,)),
    ("vgg11", {"norm": "ln", "width_multiplier": 0.125}, (3, 16, 16)),
    ("resnet20", {"norm": "none"}, (3, 8, 8)),
    ("resnet20", {"norm": "bn"}, (3, 8, 8)),
]


def batches(shape, count=3, size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=generator) for _ in range(count)]


def pair(name, kwargs, shape, seeds=(0, 1)):
    data = torch.cat(batches(shape))
    models = []
    for seed in seeds:
        model = gm.models.build(name, seed=seed, **kwargs)
        models.append(calibrated(model, data, seed=seed))
    return models


def merged_pair(name, kwargs, shape, method="permute", **options):
    models = pair(name, kwargs, shape)
    loader = batches(shape)
    merger = gm.Merger(models, example_input=loader[0], progress=False)
    merger.collect(loader)
    return models, loader, merger.merge(method, **options)


def measured(model, graph, loader, report):
    points = [ReadPoint(p.point.node, p.point.node, p.target_mean.shape[0]) for p in report.points]
    return collect_moments([model], graph, loader, points, progress=False)[0]


def partner_targets(models, graph, loader, report, result):
    """Targets by hand for a permute merge: the average of matched units' mean and std."""
    width = {p.point.node: graph.space(p.point.space).width for p in report.points}
    points = [ReadPoint(node, node, d) for node, d in width.items()]
    sources = collect_moments(models, graph, loader, points, progress=False)
    targets = {}
    for p in report.points:
        unmerge, d = result.matches[p.point.space].unmerge, width[p.point.node]
        partner = [unmerge[i * d : (i + 1) * d].argmax(dim=0) for i in range(len(models))]
        means = [sources[i][p.point.node].mean[partner[i]] for i in range(len(models))]
        stds = [sources[i][p.point.node].std[partner[i]] for i in range(len(models))]
        targets[p.point.node] = (sum(means) / len(models), sum(stds) / len(models))
    return targets


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES)
def test_repair_meets_the_averaged_statistics_of_matched_units(name, kwargs, shape):
    models, loader, result = merged_pair(name, kwargs, shape)
    before = [state_hash(m) for m in models]
    merged_hash = state_hash(result.model)
    report = renormalize(result.model, models, loader, result.graph, result.matches,
                         progress=False)  # fmt: skip
    assert report.points and report.model is not result.model
    found = measured(report.model, result.graph, loader, report)
    by_hand = partner_targets(models, result.graph, loader, report, result)
    for item in report.points:
        mean, std = by_hand[item.point.node]
        scale = float(std.max())
        assert torch.allclose(item.target_mean, mean, atol=1e-9 * scale + 1e-12)
        assert torch.allclose(item.target_std, std, atol=1e-9 * scale + 1e-12)
        got = found[item.point.node]
        assert torch.allclose(got.mean, mean, atol=1e-3 * scale), item.point.node
        assert torch.allclose(got.std, std, atol=1e-3 * scale), item.point.node
        # the merge really had collapsed the units: the correction is not a no-op
    assert max((p.std_before - p.target_std).abs().max().item() for p in report.points) > 1e-2
    assert [state_hash(m) for m in models] == before  # inputs untouched
    assert state_hash(result.model) == merged_hash


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES[:3])
def test_rescale_keeps_means_and_meets_the_std(name, kwargs, shape):
    models, loader, result = merged_pair(name, kwargs, shape)
    report = renormalize(result.model, models, loader, result.graph, result.matches,
                         mode="rescale", progress=False)  # fmt: skip
    found = measured(report.model, result.graph, loader, report)
    for item in report.points:
        got, scale = found[item.point.node], float(item.target_std.max())
        assert torch.allclose(got.std, item.target_std, atol=1e-3 * scale)
        # upstream points were rescaled too, so compare with the mean measured at its pass
        assert torch.allclose(got.mean, item.mean_before, atol=1e-3 * scale)
    shifted = max((p.target_mean - p.mean_before).abs().max().item() for p in report.points)
    assert shifted > 1e-2  # repair would have moved the means; rescale did not


def test_points_cover_layers_and_residual_block_outputs():
    models, loader, result = merged_pair("resnet20", {"norm": "none"}, (3, 8, 8))
    report = renormalize(result.model, models, loader, result.graph, result.matches,
                         progress=False)  # fmt: skip
    kinds = {p.point.node: p.point.kind for p in report.points}
    # projection-shortcut blocks: the block output is corrected through both branches
    assert kinds["add_3"] == "sum" and kinds["add_6"] == "sum"
    sum_point = next(p.point for p in report.points if p.point.node == "add_3")
    assert [f.module for f in sum_point.folds] == ["layer2.0.conv2", "layer2.0.shortcut.0"]
    # identity-shortcut blocks: skipped with the reason, their residual branch corrected
    skipped = {s.node: s.reason for s in report.skipped}
    assert "identity shortcut" in skipped["add"]
    assert kinds["layer1_0_norm2"] == "layer"
    assert "layer2_0_norm2" not in kinds  # absorbed by the sum point add_3
    levels = [p.point.level for p in report.points]
    assert levels == sorted(levels) and report.passes == 1 + len(set(levels))


def test_repair_of_an_exact_merge_changes_nothing():
    """A model merged with its permuted copy already has its statistics: scale 1, shift 0."""
    model = pair("vgg11", {"norm": "none", "width_multiplier": 0.125}, (3, 16, 16))[0]
    loader = batches((3, 16, 16))
    graph = gm.graphs.trace(model, loader[0])
    copy = graph.permute(graph.random_permutations(seed=3))
    merger = gm.Merger([model, copy], graph=graph, example_input=loader[0], progress=False)
    merger.collect(loader)
    result = merger.merge("permute", normalize="repair", loader=loader)
    for item in result.details["normalization"].points:
        assert torch.allclose(item.scale, torch.ones_like(item.scale), atol=1e-4)
    x = loader[0]
    with torch.no_grad():
        assert torch.allclose(result.model.eval()(x), model.eval()(x), atol=1e-4)


def test_pruned_model_matches_the_unpruned_statistics():
    model = pair("resnet20", {"norm": "bn"}, (3, 8, 8))[0]
    loader = batches((3, 8, 8))
    pruned = gm.models.build("resnet20", seed=0)
    pruned.load_state_dict(model.state_dict())
    for module in pruned.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(module, "weight", amount=0.5)
    hashes = state_hash(model), state_hash(pruned)
    fixed = gm.normalization.match_statistics(pruned, model, loader, progress=False)
    assert (state_hash(model), state_hash(pruned)) == hashes
    # the pruning masks survive: the correction scaled weight_orig, zeros stay zeros
    conv = fixed.layer1[0].conv1
    assert torch.equal(conv.weight_mask, pruned.layer1[0].conv1.weight_mask)
    assert bool((conv.weight[conv.weight_mask == 0] == 0).all())
    graph = gm.graphs.trace(model, loader[0])
    report = renormalize(pruned, [model], loader, graph, progress=False)
    points = [ReadPoint(p.point.node, p.point.node, p.target_mean.shape[0]) for p in report.points]
    reference = collect_moments([model], graph, loader, points, progress=False)[0]
    after = collect_moments([fixed], graph, loader, points, progress=False)[0]
    for point in points:
        scale = float(reference[point.name].std.max())
        assert torch.allclose(after[point.name].mean, reference[point.name].mean, atol=1e-3 * scale)
        assert torch.allclose(after[point.name].std, reference[point.name].std, atol=1e-3 * scale)


def test_repair_and_rescale_functions_and_merge_wiring_agree():
    models, loader, result = merged_pair("mlp", {"hidden": (24, 16)}, (64,))
    repaired = gm.normalization.repair(result.model, models, result, loader, progress=False)
    rescaled = gm.normalization.rescale(result.model, models, result, loader, progress=False)
    wired = gm.merge(models, loader, "permute", normalize="repair", progress=False)
    again = gm.merge(models, loader, "permute", normalize="repair", progress=False)
    assert state_hash(wired) == state_hash(repaired) == state_hash(again)  # deterministic
    assert state_hash(rescaled) != state_hash(repaired)
    reset = gm.merge(models, loader, "permute", normalize="reset", progress=False)
    assert state_hash(reset) == state_hash(result.model)  # no BatchNorm: nothing to reset


def test_interpolation_weights_move_the_targets():
    models, loader, result = merged_pair("mlp", {"hidden": (24, 16)}, (64,), weights=0.25)
    repaired = gm.normalization.repair(result.model, models, result, loader, progress=False)
    by_alpha = gm.normalization.repair(result.model, models, result, loader, alpha=[0.75, 0.25],
                                       progress=False)  # fmt: skip
    midpoint = gm.normalization.repair(result.model, models, result, loader, alpha=0.5,
                                       progress=False)  # fmt: skip
    assert state_hash(repaired) == state_hash(by_alpha) != state_hash(midpoint)
    report = renormalize(result.model, models, loader, result.graph, result.matches,
                         weights=0.25, progress=False)  # fmt: skip
    first = report.points[0]
    d = result.graph.space(first.point.space).width
    unmerge = result.matches[first.point.space].unmerge
    partner = unmerge[d:].argmax(dim=0)
    points = [ReadPoint(first.point.node, first.point.node, d)]
    sources = collect_moments(models, result.graph, loader, points, progress=False)
    mean_0, mean_1 = (s[first.point.node].mean for s in sources)
    assert torch.allclose(first.target_mean, 0.75 * mean_0 + 0.25 * mean_1[partner])


def test_bad_inputs_get_clear_errors():
    models, loader, result = merged_pair("mlp", {"hidden": (24, 16)}, (64,))
    with pytest.raises(ValueError, match="cannot run on inputs of shape"):
        gm.normalization.repair(result.model, models, result, [torch.randn(4, 10)])
    with pytest.raises(ValueError, match="one-shot iterator"):
        gm.normalization.repair(result.model, models, result, iter(loader))
    with pytest.raises(ValueError, match="no batches"):
        gm.normalization.match_statistics(result.model, models, [])
    with pytest.raises(TypeError, match="MergeResult"):
        gm.normalization.repair(result.model, models, result.model, loader)
    with pytest.raises(ValueError, match="unknown normalization mode"):
        renormalize(result.model, models, loader, result.graph, result.matches, mode="reset")
    with pytest.raises(ValueError, match="unknown normalization 'repare'"):
        gm.merge(models, loader, "permute", normalize="repare")
    with pytest.raises(ValueError, match="needs data"):
        gm.Merger(models, example_input=loader[0]).merge("identity", normalize="repair")
    with pytest.raises(ValueError, match="weights must sum to 1"):
        gm.normalization.repair(result.model, models, result, loader, alpha=[0.5, 0.6])
    wide = gm.models.build("mlp", hidden=(30, 16), seed=0)
    with pytest.raises(ValueError, match="channels, expected 24"):
        gm.normalization.match_statistics(wide, models[0], loader, progress=False)
    broken = gm.models.build("mlp", hidden=(24, 16), seed=0)
    with torch.no_grad():
        broken.layers.fc1.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        gm.normalization.match_statistics(result.model, broken, loader, progress=False)


@pytest.mark.parametrize(("name", "kwargs", "shape"), [CASES[0], CASES[2]])
def test_repair_works_on_hand_built_graphs(name, kwargs, shape):
    models = pair(name, kwargs, shape)
    loader = batches(shape)
    graph = gm.models.reference_graph(models[0])
    merger = gm.Merger(models, graph=graph, example_input=loader[0], progress=False)
    merger.collect(loader)
    result = merger.merge("permute", normalize="repair", loader=loader)
    report = result.details["normalization"]
    traced = renormalize(result.model, models, loader, gm.graphs.trace(models[0], loader[0]),
                         result.matches, progress=False)  # fmt: skip
    assert len(report.points) == len(traced.points)
    assert {p.point.kind for p in report.points} == {p.point.kind for p in traced.points}
    found = measured(report.model, graph, loader, report)
    for item in report.points:
        scale = float(item.target_std.max())
        assert torch.allclose(found[item.point.node].mean, item.target_mean, atol=1e-3 * scale)
        assert torch.allclose(found[item.point.node].std, item.target_std, atol=1e-3 * scale)
    with torch.no_grad():  # the same corrections whichever graph found the points
        x = loader[0]
        assert torch.allclose(report.model.eval()(x), traced.model.eval()(x), atol=1e-4)


@pytest.mark.parametrize(
    ("method", "options"),
    [("zip", {"start_at": 2}), ("cca", {"stop_at": 6}), ("identity", {"output": "concat"})],
)
def test_repair_meets_its_targets_for_any_merge_width(method, options):
    models, loader, result = merged_pair("resnet20", {"norm": "none"}, (3, 8, 8), method, **options)
    report = renormalize(result.model, models, loader, result.graph, result.matches,
                         progress=False)  # fmt: skip
    found = measured(report.model, result.graph, loader, report)
    widths = {p.target_mean.shape[0] for p in report.points}
    assert len(widths) > 1 or method == "identity"  # merged (d) and side-by-side (N*d) spaces
    for item in report.points:
        scale = float(item.target_std.max())
        assert torch.allclose(found[item.point.node].mean, item.target_mean, atol=1e-3 * scale)
        assert torch.allclose(found[item.point.node].std, item.target_std, atol=1e-3 * scale)
        assert bool((item.target_std >= 0).all())


def layer_output(model, layer, inputs):
    """The output of ``layer`` (a module path) when ``model`` runs on ``inputs``, float64."""
    features = []
    hook = model.get_submodule(layer).register_forward_hook(
        lambda module, args, output: features.append(output.detach().double())
    )
    with torch.no_grad():
        model.eval()(inputs)
    hook.remove()
    return features[0]


@pytest.mark.parametrize(("method", "options"), [("cca", {}), ("zip", {"beta": 1.0})])
def test_mixing_merges_target_the_std_of_each_models_own_contribution(method, options):
    """A row mixing several units of one model (cca, zip within a model) targets
    sum_i sqrt(M_i Cov_i M_i^T), from each model's covariance, not |M| @ std."""
    models, loader, result = merged_pair("mlp", {"hidden": (24, 16)}, (64,), method, **options)
    report = renormalize(result.model, models, loader, result.graph, result.matches,
                         progress=False)  # fmt: skip
    inputs = torch.cat(loader)
    mixed = 0
    for item in report.points:
        layer = item.point.folds[0].module
        merge = result.matches[item.point.space].merge
        width = merge.shape[1] // 2
        expected = torch.zeros(merge.shape[0], dtype=torch.float64)
        upper = torch.zeros(merge.shape[0], dtype=torch.float64)
        for index, model in enumerate(models):
            output = layer_output(model, layer, inputs)
            centred = output - output.mean(dim=0)
            covariance = centred.T @ centred / centred.shape[0]
            block = merge[:, index * width : (index + 1) * width]
            expected += torch.einsum("kd,de,ke->k", block, covariance, block).sqrt()
            upper += block.abs() @ covariance.diagonal().sqrt()
        assert torch.allclose(item.target_std, expected, rtol=1e-6, atol=1e-9)
        assert bool((item.target_std <= upper + 1e-9).all())
        mixed += int((item.target_std < upper - 1e-6).sum())
    assert mixed > 0  # some units really mix, so the old |M| @ std target would differ
    found = measured(report.model, result.graph, loader, report)
    for item in report.points:
        scale = float(item.target_std.max())
        assert torch.allclose(found[item.point.node].std, item.target_std, atol=1e-3 * scale)


def test_reference_cache_reads_the_covariance_when_a_later_merge_needs_it():
    models, loader, _ = merged_pair("mlp", {"hidden": (24, 16)}, (64,))
    merger = gm.Merger(models, example_input=loader[0], progress=False)
    merger.collect(loader)
    permuted = merger.merge("permute", normalize="repair", loader=loader)
    mixed = merger.merge("cca", normalize="repair", loader=loader)
    again = merger.merge("cca", normalize="repair", loader=loader)
    fresh = gm.Merger(models, example_input=loader[0], progress=False)
    fresh.collect(loader)
    alone = fresh.merge("cca", normalize="repair", loader=loader)
    passes = [r.details["normalization"].passes for r in (permuted, mixed, again, alone)]
    levels = passes[3] - 1
    assert passes == [levels + 1, levels + 1, levels, levels + 1]
    for key, value in alone.model.state_dict().items():
        assert torch.allclose(mixed.model.state_dict()[key], value, atol=1e-6)
