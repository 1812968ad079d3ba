"""randomize_statistics: every floating parameter and buffer a permutation could act on is
given random, finite, well-scaled values; indices, masks and the original model are kept."""

import torch
from torch import nn

from graphmerge.fold import state_tensors
from graphmerge.graphs import randomize_statistics


class Zoo(nn.Module):
    """The values that hide a missing permutation: zeros, ones, constants."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.group = nn.GroupNorm(2, 8)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.position = nn.Parameter(torch.zeros(1, 4, 8))
        self.gamma = nn.Parameter(torch.full((8,), 1e-6))
        self.head = nn.Linear(8, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("index", torch.arange(8))
        self.register_buffer("keep", torch.ones(8, dtype=torch.bool))
        self.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), 1))
        self.register_buffer("temperature", torch.tensor(2.0))
        self.register_buffer("table", torch.ones(4, 8), persistent=False)

    def forward(self, x):  # x: (batch, 4 tokens, 6)
        h = self.norm(self.embed(x) + self.position + self.class_token) * self.gamma + self.table
        h = h + (torch.softmax(self.mask, -1) @ h)
        h = self.group(self.bn(h.mean(1)).unsqueeze(-1)).squeeze(-1)
        return self.head(h / self.temperature)


def test_every_floating_parameter_and_buffer_gets_random_values():
    model = Zoo()
    before = {k: v.clone() for k, v in state_tensors(model).items()}
    randomized = randomize_statistics(model, seed=3)
    after = state_tensors(randomized)
    kept = {"index", "keep", "mask", "temperature", "bn.num_batches_tracked"}
    for key, value in after.items():
        if key in kept:
            assert torch.equal(value, before[key]), key
            continue
        assert not torch.equal(value, before[key]), key
        assert torch.isfinite(value).all() and value.std() > 0.01, key  # no constant left
    assert (after["bn.running_var"] >= 0.5).all() and (after["norm.weight"] >= 0.5).all()
    assert (after["gamma"] >= 0.5).all()  # a layer scale of order one, not 1e-6
    x = torch.randn(5, 4, 6)
    with torch.no_grad():
        output = randomized.eval()(x)
    assert torch.isfinite(output).all() and output.std() > 1e-3


def test_randomizing_is_seeded_and_never_touches_the_model():
    model = Zoo()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    first, again = randomize_statistics(model, seed=1), randomize_statistics(model, seed=1)
    other = randomize_statistics(model, seed=2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
        assert torch.equal(first.state_dict()[key], again.state_dict()[key]), key
    assert not torch.equal(first.head.weight, other.head.weight)


def test_trained_weights_keep_their_scale():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    with torch.no_grad():
        model[0].weight.mul_(10)
    randomized = randomize_statistics(model)
    ratio = randomized[0].weight.std() / model[0].weight.std()
    assert 0.9 < ratio < 1.1
    assert not torch.equal(randomized[0].weight, model[0].weight)
