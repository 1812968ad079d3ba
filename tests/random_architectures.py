"""Random MLPs and small CNNs for the property tests: depth, widths, norms, adds, concats.

An ``Architecture`` is a plain description (hypothesis draws it; its repr is the
failing example) and ``RandomNet`` builds it. Blocks after the stem:

- ``plain``: layer, norm, ReLU to a new width (one new space);
- ``residual``: x + norm(layer(ReLU(norm(layer(x))))), then ReLU: the inner width is a
  new space, the output joins x's space (one residual stream);
- ``branches``: cat of two layer-norm-ReLU branches of x (two new spaces, one cat);
- ``dense``: cat of x and layer-norm-ReLU(x) (DenseNet style: x's space and a new one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from graphmerge.models.layers import norm1d, norm2d

BLOCKS = ("plain", "residual", "branches", "dense")
NORMS = ("none", "bn", "ln")
INPUT_FEATURES = 6
INPUT_CHANNELS = 3
IMAGE_SIZE = 5
CLASSES = 4


@dataclass(frozen=True)
class Architecture:
    """kind "mlp" or "cnn"; ``stem`` width; one (block, width) per block; the norm."""

    kind: str
    norm: str
    stem: int
    blocks: tuple[tuple[str, int], ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "mlp":
            return (INPUT_FEATURES,)
        return (INPUT_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def adds_concatenations(self) -> bool:
        """Whether a residual block adds to a concatenation (the tracer freezes that)."""
        concatenated = False
        for block, _ in self.blocks:
            if block == "residual" and concatenated:
                return True
            concatenated = block in ("branches", "dense")
        return False

    @property
    def num_spaces(self) -> int:
        """The mergeable spaces the tracer must find: the stem's and each block's new ones."""
        new = {"plain": 1, "residual": 1, "branches": 2, "dense": 1}
        return 1 + sum(new[block] for block, _ in self.blocks)


@st.composite
def architectures(draw: st.DrawFn, max_blocks: int = 3, max_width: int = 10) -> Architecture:
    """Hypothesis strategy: an MLP or CNN of 0..max_blocks blocks, widths up to max_width.

    Widths start at 2 (3 under LayerNorm): a layer of one unit, or LayerNorm over two
    (every output +-1), makes every later feature a function of one variable, so all
    are perfectly correlated and no statistic can tell units apart (tested apart).
    """
    kind = draw(st.sampled_from(("mlp", "cnn")))
    norm = draw(st.sampled_from(NORMS))
    width = st.integers(3 if norm == "ln" else 2, max_width)
    blocks = draw(st.lists(st.tuples(st.sampled_from(BLOCKS), width), max_size=max_blocks))
    return Architecture(kind, norm, draw(width), tuple(blocks))


class Unit(nn.Module):
    """layer, norm, ReLU."""

    def __init__(self, architecture: Architecture, width_in: int, width_out: int) -> None:
        super().__init__()
        self.layer = _layer(architecture, width_in, width_out)
        self.norm = _norm(architecture, width_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.norm(self.layer(x)))


class Residual(nn.Module):
    def __init__(self, architecture: Architecture, width: int, inner: int) -> None:
        super().__init__()
        self.inner = Unit(architecture, width, inner)
        self.layer = _layer(architecture, inner, width)
        self.norm = _norm(architecture, width)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.norm(self.layer(self.inner(x))))


class Branches(nn.Module):
    def __init__(self, architecture: Architecture, width_in: int, width: int) -> None:
        super().__init__()
        self.left = Unit(architecture, width_in, width)
        self.right = Unit(architecture, width_in, width + 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=1)


class Dense(nn.Module):
    def __init__(self, architecture: Architecture, width_in: int, width: int) -> None:
        super().__init__()
        self.unit = Unit(architecture, width_in, width)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.unit(x)], dim=1)


class RandomNet(nn.Module):
    """The network an ``Architecture`` describes (see ``build`` for a seeded one)."""

    def __init__(self, architecture: Architecture) -> None:
        super().__init__()
        self.architecture = architecture
        first = architecture.input_shape[0]
        self.stem = Unit(architecture, first, architecture.stem)
        width = architecture.stem
        blocks = []
        for block, size in architecture.blocks:
            if block == "plain":
                blocks.append(Unit(architecture, width, size))
                width = size
            elif block == "residual":
                blocks.append(Residual(architecture, width, size))
            elif block == "branches":
                blocks.append(Branches(architecture, width, size))
                width = 2 * size + 1
            else:
                blocks.append(Dense(architecture, width, size))
                width += size
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        if self.architecture.kind == "cnn":
            x = x.mean(dim=(2, 3))
        return self.head(x)


def build(architecture: Architecture, seed: int) -> RandomNet:
    """``RandomNet(architecture)`` initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return RandomNet(architecture)


def _layer(architecture: Architecture, width_in: int, width_out: int) -> nn.Module:
    if architecture.kind == "mlp":
        return nn.Linear(width_in, width_out)
    return nn.Conv2d(width_in, width_out, kernel_size=3, padding=1)


def _norm(architecture: Architecture, width: int) -> nn.Module:
    build = norm1d if architecture.kind == "mlp" else norm2d
    return build(architecture.norm, width)
