"""Window attention (torchvision's and timm's Swin, MaxViT) and timm's ViT attention (traced
as written: the generic attention pattern of ``graphs.heads``): heads as
structured spaces, the relative-position-bias table on the heads' block index, patch
merging and cyclic shifts followed; permuted copies merged back exactly."""

import dataclasses

import pytest
import timm
import torch
from torchvision.models.swin_transformer import SwinTransformer

import graphmerge as gm
from graphmerge.graphs import randomize_statistics, trace
from graphmerge.graphs.model_graph import ModelGraph
from graphmerge.graphs.shapes import reshaped_channels


def tiny_swin():
    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[4, 8], window_size=[2, 2],
        num_classes=5,
    )  # fmt: skip


def tiny_timm_vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5
    )


def test_reshapes_that_merge_dims_in_front_of_the_channels_tile_them():
    # Swin's patch merging: (B, H/2, W/2, 2, 2, C) -> (B, H/2, W/2, 4C)
    assert reshaped_channels((2, 4, 4, 2, 2, 8), (2, 4, 4, 32), 5) == (3, 4, 1, "")
    assert reshaped_channels((2, 8, 3, 3), (2, 72), 1) == (1, 1, 9, "")  # C x H x W flatten
    assert reshaped_channels((2, 16), (2, 4, 4), 1)[3].startswith("splits the channel axis")


def test_torchvision_swin_heads_and_tables_are_exact():
    model = randomize_statistics(tiny_swin()).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = trace(model, x)
    with torch.no_grad():  # the traced steps compute what torchvision's function computes
        assert torch.allclose(graph.module(x), model(x), atol=1e-5)
    assert graph.coverage == 1.0
    right = graph.check_symmetries(x, relative=True)
    assert right < 1e-5
    heads = graph.space("features.1.1.attn.qkv.heads")
    assert heads.width == 4
    assert heads.params == ("features.1.1.attn.relative_position_bias_table",)
    assert graph.space("features.1.1.attn.qkv.value").blocks == heads.name

    def table_left_alone(spaces):  # the bias table not moved with its heads
        return [dataclasses.replace(s, param_axes=()) if s.role == "blocks" else s for s in spaces]

    wrong = ModelGraph(
        graph.model, graph.graph, table_left_alone(list(graph.spaces)), graph.concatenations,
        source="traced", module=graph.module,
    )  # fmt: skip
    # 4-token windows: the bias moves the outputs little, yet far above float rounding
    assert wrong.check_symmetries(x, relative=True) > max(1e-4, 100 * right)


@pytest.mark.parametrize("build", [tiny_swin, tiny_timm_vit], ids=["torchvision swin", "timm vit"])
def test_permuted_copies_merge_back_with_permute_and_weight_matching(build):
    model = randomize_statistics(build()).eval()
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x[:2])
    assert graph.coverage == 1.0
    copy = graph.permute(graph.random_permutations(seed=3))
    with torch.no_grad():
        reference = model(x)
        for method in ("permute", "weight_matching"):
            merged = gm.merge([model, copy], [x], method, graph=graph, progress=False)
            assert (merged(x) - reference).abs().max() <= 1e-4 * reference.abs().max(), method


def test_timm_attention_with_q_k_norms_freezes_its_heads_with_the_reason():
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=5,
        qk_norm=True,
    )  # fmt: skip
    model = randomize_statistics(model).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = trace(model, x)
    assert graph.check_symmetries(x, relative=True) < 1e-5
    qkv = "blocks.0.attn.qkv.weight"
    heads = [s for s in graph.spaces if any(a.param == qkv and a.axis == 0 for a in s.param_axes)]
    assert len(heads) == 3 and all(s.frozen for s in heads)  # q, k, v: the q/k norms
    assert all("attention heads" in s.reason for s in heads)


def test_a_roll_along_the_channels_freezes_them():
    class Rolling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(torch.roll(self.fc1(x), shifts=1, dims=-1))

    graph = trace(randomize_statistics(Rolling()), torch.randn(3, 4))
    assert "rolls the channel axis" in graph.space("fc1").reason


def test_torchvision_maxvit_attention_is_traced_with_its_heads():
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit(
        input_size=(16, 16), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5,
    )  # fmt: skip
    model = randomize_statistics(model).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = trace(model, x)
    with torch.no_grad():
        assert torch.allclose(graph.module(x), model(x), atol=1e-5)
    assert graph.coverage == 1.0
    assert graph.check_symmetries(x, relative=True) < 1e-5
    tables = [s for s in graph.spaces if s.role == "blocks" and s.param_axes]
    assert tables and all("relative_position_bias_table" in s.params[0] for s in tables)
