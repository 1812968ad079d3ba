"""ResNet-20 for small images (He et al. 2016, CIFAR variant: 3 stages of 3 basic blocks)."""

from __future__ import annotations

from torch import Tensor, nn

from graphmerge.models.layers import check_network_args, kaiming_init_convs, norm2d, scaled

STAGE_WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 3


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus a shortcut, then ReLU.

    The shortcut is a 1x1 conv + norm when the shape changes (option B), else identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=bias)
        self.norm1 = norm2d(norm, out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=bias)
        self.norm2 = norm2d(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                norm2d(norm, out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """Stem conv, three stages of basic blocks (strides 1, 2, 2), global pool, linear head."""

    def __init__(
        self,
        widths: tuple[int, int, int] = STAGE_WIDTHS,
        num_classes: int = 10,
        norm: str = "bn",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_network_args(norm, num_classes, in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=norm == "none")
        self.norm1 = norm2d(norm, widths[0])
        self.relu1 = nn.ReLU()
        previous = widths[0]
        stages = []
        for stage_index, width in enumerate(widths):
            blocks = []
            for block_index in range(BLOCKS_PER_STAGE):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(previous, width, stride, norm))
                previous = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous, num_classes)
        self._init_weights(norm)

    def _init_weights(self, norm: str) -> None:
        kaiming_init_convs(self)
        if norm == "none":
            # Without normalization every residual add would double the variance
            # (2^9 over nine blocks); shrink each block's last conv so the stream
            # keeps its scale at initialisation (Fixup-style).
            num_blocks = len(STAGE_WIDTHS) * BLOCKS_PER_STAGE
            for block in self.modules():
                if isinstance(block, BasicBlock):
                    block.conv2.weight.data.mul_(num_blocks**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(
    width_multiplier: float = 1.0,
    norm: str = "bn",
    num_classes: int = 10,
    in_channels: int = 3,
) -> ResNet20:
    """Build ResNet-20 with stage widths (16, 32, 64) x ``width_multiplier``.

    Example:
        >>> model = resnet20(width_multiplier=4, norm="bn", num_classes=10, in_channels=1)
        >>> model.fc.in_features
        256
    """
    widths = tuple(scaled(width, width_multiplier) for width in STAGE_WIDTHS)
    return ResNet20(widths, num_classes, norm, in_channels)
