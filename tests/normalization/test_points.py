"""Repair points: which outputs can be corrected, through which layers, and why not."""

import torch
from torch import nn

import graphmerge as gm
from graphmerge.models.layers import LayerNorm2d
from graphmerge.normalization import repair_points


def points_of(model, x):
    graph = gm.graphs.trace(model, x)
    points, skipped = repair_points(graph, [s.name for s in graph.mergeable_spaces])
    return graph, {p.node: p for p in points}, {s.node: s.reason for s in skipped}


class Shared(nn.Module):
    """fc1 is called twice; bn2 has no affine parameters; fc3 has no bias and no norm."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(6, 6, bias=False), nn.Linear(6, 6), nn.Linear(6, 5)
        self.bn2 = nn.BatchNorm1d(5, affine=False)
        self.fc3, self.head = nn.Linear(5, 4, bias=False), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc0(x)
        x = torch.relu(self.fc1(torch.relu(h)) + self.fc1(torch.relu(-h)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(torch.relu(self.fc3(x)))


def test_layer_norm_chains_fold_into_the_norm_through_permutes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), LayerNorm2d(8), nn.Dropout(0.1), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(4))  # fmt: skip
    model(torch.randn(2, 3, 6, 6))
    _, points, _ = points_of(model, torch.randn(2, 3, 6, 6))
    (point,) = points.values()
    assert point.node == "_2"  # the Dropout after the LayerNorm's closing permute
    assert [(f.module, f.axis, f.has_bias) for f in point.folds] == [("1.norm", 0, True)]


def test_places_that_cannot_absorb_a_correction_are_skipped_with_reasons():
    _, points, skipped = points_of(Shared(), torch.randn(4, 6))
    assert points == {}
    reasons = " | ".join(skipped.values())
    assert "fc1 is called 2 times" in reasons
    assert "no bias to absorb the mean shift (fc0)" in reasons
    assert "bn2 has no affine parameters" in reasons
    assert "no bias to absorb the mean shift (fc3)" in reasons


def test_batch_norm_chain_folds_into_the_norm_and_levels_follow_dependencies():
    model = gm.models.build("vgg11", norm="bn", width_multiplier=0.125, seed=0)
    _, points, skipped = points_of(model, torch.randn(2, 3, 16, 16))
    assert not skipped and len(points) == 8
    assert [p.level for p in points.values()] == list(range(8))
    assert all(p.folds[0].module.startswith("features.norm") for p in points.values())
