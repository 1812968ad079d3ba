"""Attention and transformer layers: nn.MultiheadAttention (packed and separate projections,
batch_first either way, bias_k / bias_v), nn.TransformerEncoder / Decoder (pre- and
post-norm) and torchvision's ViT. The residual stream and the MLPs are merged exactly;
the heads are frozen spaces with their reason (structured head matching is to come)."""

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import graphmerge as gm
from graphmerge.graphs import randomize_statistics, register_layer, trace
from graphmerge.graphs.layers import registry
from graphmerge.graphs.layers.attention import MultiheadAttentionRule

HEADS = "holds attention heads"


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
def test_multihead_attention_is_exact_for_the_stream(options):
    model = randomize_statistics(Attending(**options)).eval()
    x = torch.randn(3, 5, 6)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    assert (
        graph.space("embed").mergeable
        and "attention.out_proj.weight" in graph.space("embed").params
    )
    assert {s.name for s in graph.frozen_spaces} >= {"attention.query_key", "attention.value"}
    assert HEADS in graph.space("attention.value").reason
    if options.get("separate"):
        assert "attention.k_proj_weight" in graph.space("memory").params


def test_a_rule_that_forgets_the_output_rows_fails_the_check(monkeypatch):
    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))

    @register_layer(nn.MultiheadAttention)
    class Forgetful(MultiheadAttentionRule):
        def channels(self, call):
            out = super().channels(call)
            fresh = call.finder.new_channels(call.path, call.layer.embed_dim, out.values[0].axis)
            return type(out)((fresh, None))  # output rows not tied to the stream it joins

    model = randomize_statistics(Attending()).eval()
    x = torch.randn(3, 5, 6)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) > 1e-3


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
def test_transformer_layers_are_traced_through_and_merge_back_exactly(norm_first, decoder):
    model = randomize_statistics(Encoding(norm_first, decoder)).eval()
    x = torch.randn(4, 5, 6)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    mergeable = [s.name for s in graph.mergeable_spaces]
    assert mergeable[:3] == ["embed", "encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    copy = graph.permute(graph.random_permutations(seed=5))
    loader = [torch.randn(8, 5, 6) for _ in range(3)]
    with torch.no_grad():
        reference = model(x)
        for method in ("permute", "weight_matching"):
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


def test_torchvision_vit_stream_and_mlps_merge_exactly():
    model = randomize_statistics(small_vit()).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    stream = graph.space("conv_proj")
    assert stream.mergeable and {"class_token", "encoder.pos_embedding"} <= set(stream.params)
    frozen = {s.name: s.reason for s in graph.frozen_spaces}
    assert len(frozen) == 4 and all(HEADS in reason for reason in frozen.values())
    copy = graph.permute(graph.random_permutations(seed=1))
    with torch.no_grad():
        merged = gm.merge([model, copy], [x], "permute", progress=False)
        assert torch.allclose(merged(x), model(x), atol=1e-5)
