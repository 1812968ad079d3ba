"""Matching structured spaces: two-level assignment, block-by-block solving, block matches,
and merges of permuted copies of models with attention heads and grouped convolutions."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphmerge as gm
from graphmerge.fold import Match, composed_permutation
from graphmerge.graphs import randomize_statistics, trace
from graphmerge.matching_functions import registry
from graphmerge.matching_functions.structured import block_match, two_level_assignment


def planted(blocks, width, seed):
    generator = torch.Generator().manual_seed(seed)
    block_partner = torch.randperm(blocks, generator=generator)
    within = [torch.randperm(width, generator=generator) for _ in range(blocks)]
    partner = composed_permutation(block_partner, within)
    noise = 0.3 * torch.rand(blocks * width, blocks * width, generator=generator)
    similarity = noise.double()
    similarity[torch.arange(blocks * width), partner] += 1.0
    return similarity, block_partner, partner


def test_two_level_assignment_recovers_a_planted_structured_permutation():
    first, blocks_a, partner_a = planted(4, 6, seed=0)
    found_blocks, (found,) = two_level_assignment([first], blocks=4)
    assert torch.equal(found_blocks, blocks_a) and torch.equal(found, partner_a)


def test_two_level_assignment_sums_the_spaces_that_share_the_blocks():
    # Space 1 alone is ambiguous (flat similarity); space 2 decides the block pairing.
    flat = torch.ones(8, 8, dtype=torch.float64)
    second, blocks_b, _ = planted(2, 4, seed=3)
    found_blocks, composed = two_level_assignment([flat, second], blocks=2)
    assert torch.equal(found_blocks, blocks_b)
    assert all(sorted(p.tolist()) == list(range(8)) for p in composed)
    for partner in composed:  # each merged block takes one whole block
        assert {int(k) // 4 for k in partner[:4]} == {int(blocks_b[0])}


def test_block_match_averages_blocks_and_refuses_mixed_ones():
    space = gm.graphs.Space("s", 1, 4, "hidden", (), (), None, False, blocks="b")
    partner = composed_permutation(torch.tensor([1, 0]), [torch.tensor([1, 0])] * 2)
    merge, unmerge = gm.matching_functions.permutation_match([torch.arange(4), partner])
    blocks = block_match(Match(merge, unmerge), space, 2, 2, "permute")
    assert torch.allclose(blocks.merge, torch.tensor([[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]]).double())
    assert torch.allclose(blocks.unmerge, 2 * blocks.merge.T)
    mixed = torch.full((4, 8), 1 / 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="mixes channels of different blocks"):
        block_match(Match(mixed, mixed.T), space, 2, 2, "mine")
    with pytest.raises(ValueError, match="not a multiple of its block width"):
        block_match(Match(merge[:3], unmerge[:, :3]), space, 2, 2, "mine")


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.norm2 = nn.GroupNorm(4, 32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return self.head(F.relu(self.conv3(x)).mean((2, 3)))


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


MODELS = {
    "grouped": (GroupedNet, (3, 8, 8)),
    "attention": (AttentionNet, (7, 6)),
}


def permuted_pair(kind, seed=4):
    model_type, shape = MODELS[kind]
    torch.manual_seed(0)
    model = randomize_statistics(model_type()).eval()
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x[:4])
    return model, graph.permute(graph.random_permutations(seed)), x


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["permute", "zip", "weight_matching"])
def test_permuted_copies_are_recovered_block_by_block(kind, method):
    model, copy, x = permuted_pair(kind)
    loader = [x[:16], x[16:]]
    merged = gm.merge([model, copy], loader, method, progress=False)
    with torch.no_grad():
        reference = model(x)
        assert (merged(x) - reference).abs().max() <= 1e-4 * reference.abs().max()
        averaged = gm.merge([model, copy], loader, "identity", progress=False)
        assert (averaged(x) - reference).abs().max() > 1e-2 * reference.abs().max()


def test_identity_keeps_blocks_in_place_and_so_does_preserve_first_with_identity():
    model, copy, x = permuted_pair("attention")
    merger = gm.Merger([model, copy], example_input=x[:4], progress=False)
    merger.collect([x])
    for result in (merger.merge("identity"), merger.merge("preserve_first", k=0, inner="identity")):
        heads = result.matches["attention.heads"]
        assert torch.allclose(heads.merge, torch.cat([torch.eye(4), torch.eye(4)], 1).double() / 2)
    matched = merger.merge("permute").matches["attention.heads"]
    assert torch.equal(
        matched.merge != 0, merger.merge("zip").matches["attention.heads"].merge != 0
    )


def test_a_scope_keeps_the_spaces_of_one_block_index_together():
    model, copy, x = permuted_pair("grouped")
    merger = gm.Merger([model, copy], example_input=x[:4], progress=False)
    merger.collect([x])
    names = [space.name for space in merger.spaces]
    assert names[:3] == ["conv1", "conv2", "conv3"]  # all in blocks of conv2.groups
    result = merger.merge("permute", start_at=1)  # conv1 outside: conv2, conv3 follow it
    assert "conv1" not in result.merged and "conv2" not in result.merged
    assert result.model.conv2.groups == 8  # the two models' groups side by side
    with torch.no_grad():
        ensemble = (model(x) + copy(x)) / 2
        assert torch.allclose(result.model(x), ensemble, atol=1e-4)


def test_a_method_that_mixes_heads_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @gm.matching_functions.register("blender")
    def blender(stats, num_models):
        total = stats.mean.shape[0]
        merge = torch.full((total // num_models, total), 1.0 / total, dtype=torch.float64)
        return merge, merge.T * num_models

    class JointBlender(gm.matching_functions.Entry):  # a joint method: its own solve
        def solve(self, problem, hparams):
            return gm.matching_functions.Solution(
                {s.name: Match(*blender(problem.statistics[s.name], 2)) for s in problem.spaces}
            )

    registry.register_entry(JointBlender("joint_blender", blender))
    model, copy, x = permuted_pair("attention")
    merger = gm.Merger([model, copy], example_input=x[:4], progress=False)
    merger.collect([x])
    with pytest.warns(RuntimeWarning, match="LayerNorm"):  # it mixes the stream, too
        merger.merge("blender")  # a features function runs block by block: within heads
    with pytest.raises(ValueError, match="joint_blender mixes channels of different blocks"):
        merger.merge("joint_blender")


def test_methods_that_mix_channels_through_a_layer_norm_say_so():
    model, copy, x = permuted_pair("attention")
    merger = gm.Merger([model, copy], example_input=x[:4], progress=False)
    merger.collect([x])
    with pytest.warns(RuntimeWarning, match="cca mixes channels of .* LayerNorm normalises"):
        merger.merge("cca")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merger.merge("permute")  # permutations commute with LayerNorm: no warning
