"""Multi-layer perceptron (the Git Re-Basin / REPAIR MNIST-style MLP)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from graphmerge.models.layers import check_norm, check_positive_int, norm1d, scaled


class MLP(nn.Module):
    """Flatten, then ``Linear -> [norm] -> ReLU`` per hidden layer, then a linear head.

    Layers are named ``fc1``, ``norm1``, ``relu1``, ..., ``head`` so that graphs
    read well.
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int] = (512, 512, 512),
        num_classes: int = 10,
        norm: str = "none",
    ) -> None:
        super().__init__()
        check_positive_int("input_dim", input_dim)
        check_positive_int("num_classes", num_classes)
        check_norm(norm)
        if len(hidden) == 0:
            raise ValueError("hidden must list at least one layer width, e.g. (512, 512, 512)")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        previous = input_dim
        for index, width in enumerate(hidden, start=1):
            check_positive_int(f"hidden[{index - 1}]", width)
            layers[f"fc{index}"] = nn.Linear(previous, width)
            if norm != "none":
                layers[f"norm{index}"] = norm1d(norm, width)
            layers[f"relu{index}"] = nn.ReLU()
            previous = width
        self.layers = nn.Sequential(layers)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(x))


def mlp(
    input_dim: int = 64,
    hidden: Sequence[int] = (512, 512, 512),
    num_classes: int = 10,
    width_multiplier: float = 1.0,
    norm: str = "none",
) -> MLP:
    """Build an MLP whose hidden widths are ``hidden`` scaled by ``width_multiplier``.

    Example:
        >>> model = mlp(input_dim=64, hidden=(128, 128), num_classes=10, width_multiplier=0.5)
        >>> model.layers.fc1.out_features
        64
    """
    widths = [scaled(width, width_multiplier) for width in hidden]
    return MLP(input_dim, widths, num_classes, norm)
