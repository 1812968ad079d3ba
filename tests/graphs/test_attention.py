"""Attention and transformer layers: nn.MultiheadAttention (packed and separate projections,
batch_first either way, bias_k / bias_v), nn.TransformerEncoder / Decoder (pre- and
post-norm) and torchvision's ViT. The residual stream, the MLPs and the heads (structured
spaces: one head permutation shared by Q/K and V/O, free within-head permutations) are
merged exactly; wrong couplings fail the self-check."""

import dataclasses

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import graphmerge as gm
from graphmerge.graphs import randomize_statistics, trace
from graphmerge.graphs.model_graph import ModelGraph


class Attending(nn.Module):
    def __init__(self, batch_first=True, separate=False, extra_bias=False):
        super().__init__()
        self.batch_first = batch_first
        self.embed, self.memory = nn.Linear(6, 16), nn.Linear(6, 12)
        kdim = 12 if separate else None
        self.attention = nn.MultiheadAttention(
            16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim,
            add_bias_kv=extra_bias, add_zero_attn=extra_bias,
        )  # fmt: skip
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x, memory = self.embed(x), self.memory(x)
        if not self.batch_first:
            x, memory = x.transpose(0, 1), memory.transpose(0, 1)
        source = memory if self.attention.kdim != 16 else x
        out, weights = self.attention(x, source, source)
        x = x + out
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(x.mean(1)) + weights.mean()


@pytest.mark.parametrize(
    "options",
    [{}, {"batch_first": False}, {"separate": True}, {"extra_bias": True}],
    ids=["packed", "sequence first", "separate projections", "bias_kv"],
)
def test_multihead_attention_is_exact_with_its_heads(options):
    model = randomize_statistics(Attending(**options)).eval()
    x = torch.randn(3, 5, 6)
    graph = trace(model, x)
    with torch.no_grad():  # the traced plain form computes what the layer computes
        assert torch.allclose(graph.module(x), model(x), atol=1e-6)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    assert graph.coverage == 1.0 and not graph.frozen_spaces
    assert "attention.out_proj.weight" in graph.space("embed").params
    heads = graph.space("attention.heads")
    assert heads.role == "blocks" and heads.width == 4
    for name in ("attention.query_key", "attention.value"):
        assert graph.space(name).blocks == "attention.heads" and graph.space(name).mergeable
    assert "attention.out_proj.weight" in graph.space("attention.value").params
    if options.get("separate"):
        assert "attention.k_proj_weight" in graph.space("memory").params
        assert "attention.k_proj_weight" in graph.space("attention.query_key").params
    if options.get("extra_bias"):
        assert "attention.bias_k" in graph.space("attention.query_key").params
        assert "attention.bias_v" in graph.space("attention.value").params


def rebuilt(graph, change):
    """The graph with its spaces edited by ``change(spaces) -> spaces`` (a wrong graph)."""
    return ModelGraph(
        graph.model, graph.graph, change(list(graph.spaces)), graph.concatenations,
        source=graph.source, module=graph.module,
    )  # fmt: skip


def split_space(spaces, name, keep):
    """``name`` split in two: the axes ``keep`` accepts, and the others as a new space."""
    position = next(i for i, s in enumerate(spaces) if s.name == name)
    space = spaces[position]
    kept = tuple(a for a in space.param_axes if keep(a))
    moved = tuple(a for a in space.param_axes if not keep(a))
    spaces[position] = dataclasses.replace(space, param_axes=kept)
    spaces.append(dataclasses.replace(space, name=f"{name}.split", param_axes=moved))
    return spaces


def test_wrong_head_couplings_fail_the_self_check():
    model = randomize_statistics(Attending()).eval()
    x = torch.randn(3, 5, 6)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) < 1e-5

    def own_heads_for_values(spaces):  # V/O with another head permutation than Q/K
        heads = next(s for s in spaces if s.name == "attention.heads")
        spaces.append(dataclasses.replace(heads, name="attention.heads.values"))
        return [
            dataclasses.replace(s, blocks="attention.heads.values")
            if s.name == "attention.value" else s
            for s in spaces
        ]  # fmt: skip

    def keys_apart(spaces):  # K rows with their own within-head permutation
        def rows_of_queries(a):
            return a.param != "attention.in_proj_weight" or a.offset != 16

        return split_space(spaces, "attention.query_key", rows_of_queries)

    def unstructured(spaces):  # heads ignored: channels moved across heads
        return [dataclasses.replace(s, blocks="") for s in spaces if s.role != "blocks"]

    for change in (own_heads_for_values, keys_apart, unstructured):
        assert rebuilt(graph, change).check_symmetries(x, relative=True) > 1e-2, change


class Masked(nn.Module):
    def __init__(self, per_head_weights=False):
        super().__init__()
        self.per_head_weights = per_head_weights
        self.embed = nn.Linear(6, 16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x, mask, padding):
        x = self.embed(x)
        out, weights = self.attention(
            x, x, x, attn_mask=mask, key_padding_mask=padding,
            average_attn_weights=not self.per_head_weights,
        )  # fmt: skip
        return self.head((x + out).mean(1)), weights


def test_masks_from_the_inputs_keep_the_heads_and_per_head_weights_freeze_them():
    x = torch.randn(2, 5, 6)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    model = randomize_statistics(Masked()).eval()
    graph = trace(model, (x, mask, padding))
    with torch.no_grad():
        for traced, plain in zip(
            graph.module(x, mask, padding), model(x, mask, padding), strict=True
        ):
            assert torch.allclose(traced, plain, atol=1e-6)
    assert graph.coverage == 1.0
    assert graph.check_symmetries((x, mask, padding), relative=True) < 1e-5
    graph = trace(randomize_statistics(Masked(per_head_weights=True)).eval(), (x, mask, padding))
    reason = graph.space("attention.value").reason
    assert "returns the attention weights of each head" in reason
    assert graph.check_symmetries((x, mask, padding), relative=True) < 1e-5


class Encoding(nn.Module):
    def __init__(self, norm_first, decoder=False):
        super().__init__()
        self.decoder = decoder
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first)
        final = nn.LayerNorm(16) if norm_first else None
        self.encoder = nn.TransformerEncoder(layer, 2, norm=final, enable_nested_tensor=False)
        if decoder:
            layer = nn.TransformerDecoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first)
            self.decode = nn.TransformerDecoder(layer, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        memory = self.encoder(self.embed(x))
        out = self.decode(self.embed(x), memory) if self.decoder else memory
        return self.head(out.mean(1))


class Padded(Encoding):
    def forward(self, x, padding):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding).mean(1))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "encoder-decoder"])
def test_transformer_layers_merge_back_exactly_with_their_heads(norm_first, decoder):
    model = randomize_statistics(Encoding(norm_first, decoder)).eval()
    x = torch.randn(4, 5, 6)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    mergeable = [s.name for s in graph.mergeable_spaces]
    assert mergeable[:3] == [
        "embed", "encoder.layers.0.self_attn.query_key", "encoder.layers.0.self_attn.value"
    ]  # fmt: skip
    assert graph.coverage == 1.0
    copy = graph.permute(graph.random_permutations(seed=5))
    loader = [torch.randn(8, 5, 6) for _ in range(3)]
    with torch.no_grad():
        reference = model(x)
        for method in ("permute", "zip", "weight_matching"):
            data = None if method == "weight_matching" else loader
            merged = gm.merge([model, copy], data, method, example_input=x, progress=False)
            assert (merged(x) - reference).abs().max() <= 1e-4 * reference.abs().max(), method


def test_an_encoder_with_a_padding_mask_is_one_frozen_call():
    model = Padded(False).eval()
    x, padding = torch.randn(2, 5, 6), torch.zeros(2, 5, dtype=torch.bool)
    graph = trace(model, (x, padding))
    assert "unknown layer encoder" in graph.space("embed").reason


def small_vit():
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip


def test_torchvision_vit_merges_back_exactly_with_its_heads():
    model = randomize_statistics(small_vit()).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    stream = graph.space("conv_proj")
    assert stream.mergeable and {"class_token", "encoder.pos_embedding"} <= set(stream.params)
    assert graph.coverage == 1.0 and len(graph.block_spaces) == 2
    copy = graph.permute(graph.random_permutations(seed=1))
    with torch.no_grad():
        for method in ("permute", "weight_matching"):
            merged = gm.merge([model, copy], [x], method, progress=False)
            assert torch.allclose(merged(x), model(x), atol=1e-5), method
