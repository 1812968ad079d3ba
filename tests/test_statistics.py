"""Feature statistics: exact moments, streaming, limits, inputs, no NaN, in-place ops."""

import pytest
import torch
from conftest import calibrated
from torch import nn

import graphmerge as gm
from graphmerge.graphs import trace
from graphmerge.statistics import (
    ChannelMoments,
    DataPass,
    FeatureReader,
    ReadPoint,
    SpaceStatistics,
    collect_moments,
    collect_statistics,
)


def test_streaming_moments_equal_the_direct_ones():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(1000, 6, generator=generator, dtype=torch.float64) * 3 + 100
    stats = SpaceStatistics.empty(6)
    for chunk in rows.split(37):
        stats.update(chunk.float())
    assert stats.count == 1000
    assert torch.allclose(stats.mean, rows.mean(0), atol=1e-4)
    direct = torch.cov(rows.T, correction=0)
    assert torch.allclose(stats.covariance, direct, rtol=1e-4, atol=1e-4)
    assert torch.allclose(stats.correlation, torch.corrcoef(rows.T), atol=1e-5)
    halves = SpaceStatistics.empty(6), SpaceStatistics.empty(6)
    halves[0].update(rows[:400].float())
    halves[1].update(rows[400:].float())
    combined = halves[0] + halves[1]
    assert torch.allclose(combined.covariance, stats.covariance, rtol=1e-5, atol=1e-6)


def test_dead_units_give_no_nan():
    stats = SpaceStatistics.empty(3)
    stats.update(torch.tensor([[1.0, 0.0, 2.0], [2.0, 0.0, 1.0], [3.0, 0.0, 0.5]]))
    assert torch.isfinite(stats.correlation).all()
    assert stats.std[1] == pytest.approx(1e-8)
    assert stats.correlation[0, 1] == 0


def features_by_hand(model, x):
    """Pre-activation features of every hidden layer of an MLP, via forward hooks."""
    captured = []
    hooks = [m.register_forward_hook(lambda _, __, out: captured.append(out.clone()))
             for name, m in model.layers.named_children() if name.startswith("fc")]  # fmt: skip
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return captured


def test_statistics_of_two_models_match_hooks_and_ignore_batching():
    a = gm.models.build("mlp", hidden=(8, 6), seed=0)
    b = gm.models.build("mlp", hidden=(8, 6), seed=1)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    graph = trace(a, x)
    stats = collect_statistics([a, b], graph, [(x[:20], None), (x[20:], None)], progress=False)
    by_hand = [
        torch.cat(pair, dim=1).double()
        for pair in zip(features_by_hand(a, x), features_by_hand(b, x), strict=True)
    ]
    for space, rows in zip(graph.mergeable_spaces, by_hand, strict=True):
        assert space.merge_point.startswith("layers_fc")  # pre-activation
        assert torch.allclose(
            stats[space.name].covariance, torch.cov(rows.T, correction=0), atol=1e-6
        )
    again = collect_statistics([a, b], graph, [x[:7], x[7:]], progress=False)
    # products are taken in float32 per batch: equal up to float32 rounding of the sums
    for key in stats:
        scale = stats[key].outer.abs().max().item()
        assert torch.allclose(again[key].outer, stats[key].outer, rtol=0, atol=1e-6 * scale)


def test_limits_and_bad_loaders():
    a, b = (gm.models.build("mlp", hidden=(8,), seed=s) for s in (0, 1))
    x = torch.randn(64, 64)
    graph = trace(a, x)
    batches = [x[i : i + 16] for i in range(0, 64, 16)]
    name = graph.mergeable_spaces[0].name
    assert (
        collect_statistics([a, b], graph, batches, max_batches=2, progress=False)[name].count == 32
    )
    assert (
        collect_statistics([a, b], graph, batches, max_samples=20, progress=False)[name].count == 20
    )
    with pytest.raises(ValueError, match="no samples"):
        collect_statistics([a, b], graph, [], progress=False)
    with pytest.raises(ValueError, match="no samples"):
        collect_statistics([a, b], graph, [x[:0]], progress=False)
    with pytest.raises(ValueError, match=r"the loader yields dicts \(keys 'label'\) without"):
        collect_statistics([a, b], graph, [{"label": x}], progress=False)
    with torch.no_grad():
        b.layers.fc1.bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite features"):
        collect_statistics([a, b], graph, batches, progress=False)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x)))).mean((2, 3))


def test_in_place_activations_do_not_corrupt_pre_activation_features():
    x = torch.randn(16, 3, 4, 4)
    model = calibrated(InPlace(), x)
    graph = trace(model, x)
    (space,) = graph.mergeable_spaces
    stats = collect_statistics([model, model], graph, [x], progress=False)[space.name]
    with torch.no_grad():
        pre = model.bn(model.conv(x)).permute(0, 2, 3, 1).reshape(-1, 4).double()
    assert (pre < 0).any()  # ReLU(inplace=True) would have zeroed these
    assert torch.allclose(stats.mean[:4], pre.mean(0), atol=1e-6)


def test_reused_buffers_hold_the_same_features_and_are_rewritten(monkeypatch):
    """reuse=True: the values of a fresh reader, in tensors rewritten at the next call
    (also through an in-place ReLU that follows the read point)."""
    monkeypatch.setattr(gm.statistics.reader, "REUSE_BYTES", 0)  # reuse even these small features
    model = calibrated(InPlace(), torch.randn(16, 3, 4, 4))
    graph = trace(model, torch.randn(2, 3, 4, 4))
    fresh = FeatureReader(model, graph, graph.mergeable_spaces)
    reused = FeatureReader(model, graph, graph.mergeable_spaces, reuse=True)
    first, second = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        expected = {name: value.clone() for name, value in fresh(first).items()}
        found = reused(first)
        for name, value in expected.items():
            assert torch.equal(found[name], value)
        storage = {name: value.data_ptr() for name, value in found.items()}
        again = reused(second)
        for name, value in fresh(second).items():
            assert torch.equal(again[name], value)
            assert again[name].data_ptr() == storage[name]  # the same buffer, rewritten
        smaller = reused(first[:3])  # another batch size: new buffers of that size
        for name, value in fresh(first[:3]).items():
            assert torch.equal(smaller[name], value)


def test_models_are_restored_to_their_modes():
    a, b = (gm.models.build("resnet20", seed=s) for s in (0, 1))
    a.train()
    b.eval()
    x = torch.randn(8, 3, 8, 8)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    collect_statistics([a, b], trace(a, x), [x], progress=False)
    assert a.training and not b.training
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_hand_built_graphs_read_features_with_hooks():
    a, b = (gm.models.build("resnet20", seed=s) for s in (0, 1))
    x = torch.randn(8, 3, 8, 8)
    traced = collect_statistics([a, b], trace(a, x), [x], progress=False)
    built = collect_statistics([a, b], gm.models.resnet20_graph(a), [x], progress=False)
    assert set(traced) == set(built)
    for key in traced:
        assert torch.allclose(traced[key].outer, built[key].outer, rtol=1e-5), key


def test_channel_moments_equal_mean_and_variance_by_hand_whatever_the_batching():
    generator = torch.Generator().manual_seed(0)
    rows = 3.0 + 2.0 * torch.randn(5, 400, generator=generator)  # offset: cancellation-prone
    moments = ChannelMoments.empty(5)
    for chunk in rows.split([1, 150, 0, 249], dim=1):
        moments.update(chunk)
    assert moments.count == 400
    assert torch.allclose(moments.mean, rows.double().mean(dim=1), atol=1e-12)
    assert torch.allclose(moments.std, rows.double().std(dim=1, correction=0), atol=1e-12)


def test_moments_at_any_node_of_a_model():
    model = gm.models.build("mlp", hidden=(8, 6), seed=0)
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x)
    points = [ReadPoint("relu", "layers_relu1", 8), ReadPoint("hidden", "layers_fc2", 6)]
    found = collect_moments([model], graph, [x[:10], x[10:]], points, progress=False)[0]
    with torch.no_grad():
        first = model.layers.relu1(model.layers.fc1(x))
        second = model.layers.fc2(first)
    for name, value in (("relu", first), ("hidden", second)):
        assert torch.allclose(found[name].mean, value.double().mean(dim=0), atol=1e-6)
        assert torch.allclose(found[name].std, value.double().std(dim=0, correction=0), atol=1e-6)
    with pytest.raises(ValueError, match="features at 'hidden' have 6 channels, expected 7"):
        collect_moments([model], graph, [x], [ReadPoint("hidden", "layers_fc2", 7)],
                        progress=False)  # fmt: skip


def test_channel_moments_covariance_matches_torch_cov_across_batches():
    from graphmerge.statistics import ChannelMoments

    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 90, generator=generator, dtype=torch.float64) * 4 + 25
    moments = ChannelMoments.empty(5, covariance=True)
    for chunk in (rows[:, :7], rows[:, 7:8], rows[:, 8:60], rows[:, 60:]):
        moments.update(chunk)
    expected = torch.cov(rows, correction=0)
    assert torch.allclose(moments.covariance, expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(moments.variance, expected.diagonal(), rtol=1e-10)
    plain = ChannelMoments.empty(5)
    plain.update(rows)
    with pytest.raises(ValueError, match="without covariance=True"):
        _ = plain.covariance


def test_a_data_pass_counts_its_samples_and_leaves_out_small_batches():
    loader = [torch.randn(3, 2), torch.randn(1, 2), (torch.randn(4, 2), torch.zeros(4))]
    data = DataPass(loader, torch.device("cpu"), smallest=2)
    assert [len(inputs) for inputs in data] == [3, 4] and data.samples == 7
    limited = DataPass(loader, torch.device("cpu"), max_samples=5)
    assert [len(inputs) for inputs in limited] == [3, 1, 1] and limited.samples == 5
    empty = DataPass([torch.randn(1, 2)], torch.device("cpu"), smallest=2)
    assert list(empty) == []
    with pytest.raises(ValueError, match="the loader yielded no samples: reset_bn needs data"):
        empty.check_samples("reset_bn needs data")
