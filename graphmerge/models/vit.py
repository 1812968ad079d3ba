"""A small vision transformer for the bundled digits (patch embedding, class token,
pre-norm encoder layers of torch.nn)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphmerge.models.layers import check_positive_int, scaled

MLP_RATIO = 2  # the hidden width of each encoder layer's MLP, in widths


class ViT(nn.Module):
    """Patches (a strided conv) as tokens, a class token and a position table, ``depth``
    pre-norm ``nn.TransformerEncoderLayer``s, a final LayerNorm and a head on the class token.
    The width is ``width`` scaled by ``width_multiplier`` (a multiple of ``heads``).

    graphmerge merges its residual stream and its MLP hidden layers exactly; the heads
    are frozen spaces (averaged as they are) until structured head matching exists.

    Example:
        >>> model = ViT(image_size=8, patch_size=2, width=32, depth=2, heads=4)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        width_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size),
                            ("in_channels", in_channels), ("num_classes", num_classes),
                            ("width", width), ("depth", depth), ("heads", heads)):  # fmt: skip
            check_positive_int(name, value)
        width = scaled(width, width_multiplier)
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, MLP_RATIO * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        return self.head(self.norm(self.encoder(x))[:, 0])
