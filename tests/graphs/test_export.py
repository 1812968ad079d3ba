"""The export tracer (torch.export) and the HuggingFace models it captures: the same spaces
as torch.fx where both trace, HF models exact with every parameter randomized, merges of
permuted copies reproduced through dict batches, graphs that run on any batch size."""

import pytest
import torch
from conftest import relative_error
from torch import nn

import graphmerge as gm
from graphmerge.graphs import GraphTraceError, randomize_statistics, trace

TEXT_MODELS = ["hf:bert", "hf:distilbert", "hf:roberta", "hf:gpt2"]


def tokens(batch: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Digit-like token ids with padding at the end of every third sequence."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 17, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[::3, length - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def batches(count: int = 3, batch: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    sizes = [(batch - index, length - index) for index in range(count)]
    return [
        {**tokens(size, steps, seed=size), "labels": torch.arange(size) % 10}
        for size, steps in sizes
    ]


def text_model(name: str) -> nn.Module:
    return randomize_statistics(gm.models.build(name, num_classes=10, max_length=16, seed=0))


def t5_encoder() -> nn.Module:
    import transformers

    config = transformers.T5Config(
        vocab_size=20, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4
    )
    return randomize_statistics(transformers.T5EncoderModel(config))


MODELS = {
    **{name: (lambda name=name: text_model(name), tokens) for name in TEXT_MODELS},
    "hf:vit": (
        lambda: randomize_statistics(gm.models.build("hf:vit", seed=0)),
        lambda: {"pixel_values": torch.randn(4, 1, 8, 8)},
    ),
    "t5 encoder": (t5_encoder, tokens),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_huggingface_models_are_traced_whole_and_exact(name):
    build, example = MODELS[name]
    model, inputs = build(), example()
    graph = trace(model, inputs)
    assert graph.tracer == "export"
    assert graph.coverage == 1.0, graph.summary()
    # The heads of each of the 2 layers (T5's layers share one relative bias: one index).
    assert len(graph.block_spaces) == (1 if name == "t5 encoder" else 2)
    assert graph.check_symmetries(inputs, relative=True) < 1e-5


def test_t5s_relative_attention_bias_moves_with_the_heads_of_every_layer():
    model = t5_encoder()
    graph = trace(model, tokens())
    (bias,) = [
        s for s in graph.spaces if any("relative_attention_bias" in a.param for a in s.param_axes)
    ]
    assert bias.role == "blocks" and bias.width == 4
    assert graph.block_spaces == [bias]  # the bias is shared: both layers' heads move as one


@pytest.mark.parametrize("name", ["hf:bert", "hf:gpt2"])
@pytest.mark.parametrize("method", ["permute", "weight_matching"])
def test_a_permuted_copy_is_merged_back_through_dict_batches(name, method):
    model = text_model(name)
    data = batches()  # batches of 8, 7 and 6 sequences of 12, 11 and 10 tokens, with padding
    graph = trace(model, tokens())
    permuted = graph.permute(graph.random_permutations(seed=4))
    probe = tokens(5, 9, seed=9)
    moved = [
        (a - b).abs().max() for a, b in zip(model.parameters(), permuted.parameters(), strict=True)
    ]
    assert sum(change > 0.1 for change in moved) > len(moved) // 2  # heads, stream, MLP moved
    merged = gm.merge([model, permuted], data, method=method, progress=False)
    with torch.no_grad():
        reference = model.eval()(**probe).logits
        assert relative_error(reference, merged(**probe).logits) < 1e-4


def test_gpt2s_tied_embedding_and_head_are_one_space_and_stay_tied():
    import transformers

    config = transformers.GPT2Config(
        vocab_size=20, n_embd=32, n_layer=1, n_head=4, n_positions=16, use_cache=False
    )
    model = randomize_statistics(transformers.GPT2LMHeadModel(config))
    graph = trace(model, tokens())
    stream = graph.space("transformer.wte")
    assert {a.param for a in stream.param_axes} >= {"transformer.wte.weight"}
    permuted = graph.permute(graph.random_permutations(seed=1))
    assert permuted.lm_head.weight is permuted.transformer.wte.weight
    assert graph.check_symmetries(tokens(), relative=True) < 1e-5


def test_non_persistent_buffers_are_carried_into_the_merged_model():
    model = text_model("hf:bert")
    merged = gm.merge([model, model], batches(), "permute", progress=False)
    assert torch.equal(merged.bert.embeddings.position_ids, model.bert.embeddings.position_ids)


class Shared(nn.Module):
    """A layer called twice, on one stream."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.fc(torch.relu(self.fc(h)))))


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("mlp", {"hidden": (16, 16)}, (4, 64)),
        ("resnet20", {"in_channels": 1}, (4, 1, 8, 8)),
        ("vgg11", {"norm": "bn", "width_multiplier": 0.125, "in_channels": 1}, (4, 1, 32, 32)),
    ],
)
def test_both_tracers_find_the_same_spaces(name, kwargs, shape):
    model = randomize_statistics(gm.models.build(name, seed=0, **kwargs))
    x = torch.randn(*shape)
    fx_graph, exported = trace(model, x, tracer="fx"), trace(model, x, tracer="export")
    assert (fx_graph.tracer, exported.tracer) == ("fx", "export")
    assert fx_graph.same_spaces(exported)
    assert [s.merge_point for s in fx_graph.spaces] == [s.merge_point for s in exported.spaces]
    assert exported.check_symmetries(x, relative=True) < 1e-5


def test_a_layer_called_twice_is_one_call_per_use_in_the_exported_graph():
    model = randomize_statistics(Shared())
    x = torch.randn(5, 6)
    exported = trace(model, x, tracer="export")
    calls = [n.target for n in exported.module.graph.nodes if n.op == "call_module"]
    assert calls == ["inp", "fc", "fc", "out"]
    assert exported.same_spaces(trace(model, x, tracer="fx"))


def test_the_exported_graph_reads_batches_of_other_sizes_and_lengths():
    model = text_model("hf:bert")
    graph = trace(model, tokens(4, 12))
    reader = gm.statistics.FeatureReader(model, graph, graph.mergeable_spaces)
    for batch, length in ((4, 12), (3, 7), (1, 16)):
        features = reader(gm.ModelInputs(kwargs=tokens(batch, length)))
        assert features["bert.embeddings.word_embeddings"].shape == (64, batch * length)


def test_a_bad_tracer_name_is_refused():
    with pytest.raises(
        ValueError, match=r"tracer must be one of 'auto', 'fx', 'export', got 'jit'"
    ):
        trace(Shared(), torch.randn(2, 6), tracer="jit")
    with pytest.raises(GraphTraceError, match=r"the example input must be a tensor, a tuple"):
        trace(Shared(), 3.0)
