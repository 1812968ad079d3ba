"""Attention written out in a model's own forward (the generic pattern of ``graphs.heads``):
a packed or separate projection reshaped into heads, ``q @ k^T``, softmax, ``@ v`` or
``F.scaled_dot_product_attention``, the heads put side by side again. The heads become
structured spaces; wrong couplings fail the self-check; permuted copies merge back."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphmerge as gm
from graphmerge.graphs import randomize_statistics, trace
from graphmerge.graphs.model_graph import ModelGraph


class Attention(nn.Module):
    def __init__(self, packed, fused, heads=4):
        super().__init__()
        self.packed, self.fused, self.heads = packed, fused, heads
        self.embed = nn.Linear(6, 16)
        if packed:
            self.qkv = nn.Linear(16, 48)
        else:
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.proj, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        batch, tokens, width = x.shape
        if self.packed:  # as timm does
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:  # as HF does
            q, k, v = (
                layer(x).view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
                for layer in (self.q, self.k, self.v)
            )
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * 0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.head((x + self.proj(out)).mean(1))


VARIANTS = [(True, True), (True, False), (False, True), (False, False)]
IDS = ["packed-sdpa", "packed-matmul", "separate-sdpa", "separate-matmul"]


@pytest.mark.parametrize(("packed", "fused"), VARIANTS, ids=IDS)
def test_hand_written_attention_has_structured_heads_and_merges_back(packed, fused):
    model = randomize_statistics(Attention(packed, fused)).eval()
    x = torch.randn(8, 5, 6)
    graph = trace(model, x)
    assert graph.coverage == 1.0 and graph.check_symmetries(x, relative=True) < 1e-6
    (index,) = graph.block_spaces
    assert index.width == 4
    assert len(graph.structured(index.name)) == 2  # q/k (one space) and v
    copy = graph.permute(graph.random_permutations(seed=3))
    with torch.no_grad():
        reference = model(x)
        for method in ("permute", "weight_matching"):
            merged = gm.merge([model, copy], [x], method, progress=False)
            assert (merged(x) - reference).abs().max() <= 1e-5 * reference.abs().max(), method


def test_wrong_couplings_of_hand_written_heads_fail_the_self_check():
    model = randomize_statistics(Attention(packed=False, fused=True)).eval()
    x = torch.randn(4, 5, 6)
    graph = trace(model, x)

    def rebuilt(change):
        spaces = change(list(graph.spaces))
        return ModelGraph(
            graph.model, graph.graph, spaces, graph.concatenations, source="traced",
            module=graph.module,
        )  # fmt: skip

    def keys_apart(spaces):  # K's rows with their own within-head permutation
        position = next(i for i, s in enumerate(spaces) if "q.weight" in s.params)
        space = spaces[position]
        keys = tuple(a for a in space.param_axes if a.param.startswith("k."))
        rest = tuple(a for a in space.param_axes if not a.param.startswith("k."))
        spaces[position] = dataclasses.replace(space, param_axes=rest)
        return [*spaces, dataclasses.replace(space, name="keys", param_axes=keys)]

    def heads_ignored(spaces):
        return [dataclasses.replace(s, blocks="") for s in spaces if s.role != "blocks"]

    for change in (keys_apart, heads_ignored):
        assert rebuilt(change).check_symmetries(x, relative=True) > 1e-2, change


def test_an_op_on_heads_the_tracer_does_not_follow_freezes_them_with_the_reason():
    class Cumulative(Attention):
        def forward(self, x):
            x = self.embed(x)
            q = self.q(x).view(x.shape[0], x.shape[1], 4, 4).cumsum(dim=-1)
            return self.head(q.flatten(2).mean(1))

    graph = trace(randomize_statistics(Cumulative(packed=False, fused=True)), torch.randn(2, 5, 6))
    assert "of attention heads" in graph.space("q").reason
