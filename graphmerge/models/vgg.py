"""VGG for small images (CIFAR-style: conv stack, then a single linear classifier)."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from graphmerge.models.layers import check_network_args, kaiming_init_convs, norm2d, scaled

POOL = "M"
STAGE_WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_STAGE = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
VGG_CONFIGS: dict[int, list[int | str]] = {
    depth: [
        item
        for width, convs in zip(STAGE_WIDTHS, counts, strict=True)
        for item in [width] * convs + [POOL]
    ]
    for depth, counts in CONVS_PER_STAGE.items()
}


class VGG(nn.Module):
    """Conv3x3 -> [norm] -> ReLU blocks with 2x2 max-pools, global average pool, linear head.

    The pools use ``ceil_mode=True``, which equals the classic VGG on 32x32 inputs
    and lets small inputs (8x8, 16x16) pass all five pools at 1x1.
    """

    def __init__(
        self,
        config: list[int | str],
        num_classes: int = 10,
        norm: str = "none",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_network_args(norm, num_classes, in_channels)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        previous, conv_index, pool_index = in_channels, 0, 0
        for item in config:
            if item == POOL:
                pool_index += 1
                layers[f"pool{pool_index}"] = nn.MaxPool2d(2, 2, ceil_mode=True)
                continue
            conv_index += 1
            layers[f"conv{conv_index}"] = nn.Conv2d(previous, item, 3, padding=1)
            if norm != "none":
                layers[f"norm{conv_index}"] = norm2d(norm, item)
            layers[f"relu{conv_index}"] = nn.ReLU()
            previous = item
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(previous, num_classes)
        # Kaiming (fan_out) keeps the signal alive through 8-16 convs without
        # normalization; PyTorch's default init lets it vanish and VGG-11 stalls.
        kaiming_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def vgg(
    depth: int = 11,
    norm: str = "none",
    width_multiplier: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
) -> VGG:
    """Build VGG-``depth`` (11, 13, 16 or 19) with ``norm`` in {"none", "bn", "ln"}.

    Example:
        >>> model = vgg(11, norm="bn", width_multiplier=0.25, num_classes=10, in_channels=1)
        >>> model.features.conv1.out_channels
        16
    """
    if depth not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG depth {depth!r}: choose one of {sorted(VGG_CONFIGS)}")
    config = [
        item if item == POOL else scaled(item, width_multiplier) for item in VGG_CONFIGS[depth]
    ]
    return VGG(config, num_classes, norm, in_channels)
