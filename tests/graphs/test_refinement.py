"""Refined spaces: a layer's output cut by a slice or a split (CSP, mixed convolutions), or
added to a concatenation (ghost modules), is refined into parts that move independently;
their features are read at an offset of the node that carries them side by side."""

import torch
import torch.nn.functional as F
from torch import nn

import graphmerge as gm
from graphmerge.graphs import randomize_statistics, trace


class CrossStage(nn.Module):
    """CSP: one conv's output split in halves, one half convolved, both concatenated."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.inner, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.norm(self.stem(x)))
        kept, worked = y.split(8, dim=1)
        return self.head(torch.cat([kept, F.relu(self.inner(worked))], 1)).mean((2, 3))


class Ghost(nn.Module):
    """A ghost module (primary conv, cheap depthwise copy, concatenated, sliced) added to a
    shortcut conv's output."""

    def __init__(self):
        super().__init__()
        self.primary = nn.Conv2d(3, 6, 1)
        self.cheap = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.shortcut, self.head = nn.Conv2d(3, 10, 1), nn.Conv2d(10, 4, 1)

    def forward(self, x):
        primary = self.primary(x)
        ghost = torch.cat([primary, self.cheap(primary)], 1)[:, :10]
        return self.head(F.relu(ghost + self.shortcut(x))).mean((2, 3))


def exact_graph(model, x):
    """The graph of ``model``: every space mergeable, the self-check at float rounding."""
    graph = trace(model, x)
    assert graph.coverage == 1.0 and graph.check_symmetries(x, relative=True) < 1e-6
    return graph


def test_a_split_refines_the_space_into_halves_that_move_independently():
    graph = exact_graph(randomize_statistics(CrossStage()).eval(), torch.randn(4, 3, 8, 8))
    halves = [s for s in graph.mergeable_spaces if "stem.weight" in s.params]
    assert [s.width for s in halves] == [8, 8]
    (rows,) = [a for a in halves[1].param_axes if a.param == "stem.weight"]
    assert (rows.offset, rows.width) == (8, 8)  # the second half of the stem's rows


def test_a_sum_with_a_concatenation_refines_the_other_side_and_reads_it_at_an_offset():
    model = randomize_statistics(Ghost()).eval()
    x = torch.randn(16, 3, 8, 8)
    graph = exact_graph(model, x)
    shortcut = [s for s in graph.mergeable_spaces if "shortcut.weight" in s.params]
    assert sorted(s.width for s in shortcut) == [2, 4]  # primary's 4 + 2, and 4 again
    assert any(s.merge_offset > 0 for s in graph.mergeable_spaces)
    copy = graph.permute(graph.random_permutations(seed=2))
    with torch.no_grad():
        reference = model(x)
        for method in ("permute", "zip", "weight_matching"):
            merged = gm.merge([model, copy], [x], method, progress=False)
            assert (merged(x) - reference).abs().max() <= 1e-5 * reference.abs().max(), method


def test_a_slice_inside_a_structured_space_stays_frozen():
    class SlicedGroups(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.head(self.grouped(self.conv(x))[:, :3]).mean((2, 3))

    graph = trace(randomize_statistics(SlicedGroups()).eval(), torch.randn(2, 3, 4, 4))
    assert "slices channels inside a space" in graph.space("grouped").reason
