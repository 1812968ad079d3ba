"""Building blocks shared by the reference architectures."""

from __future__ import annotations

import math
from dataclasses import replace

from torch import Tensor, nn

from graphmerge.graphs import LayerCall, NormRule, register_layer, rule_for
from graphmerge.graphs.spaces import Value
from graphmerge.runtime import check_positive_int

NORMS = ("none", "bn", "ln")


class LayerNorm2d(nn.Module):
    """Channel-last LayerNorm for (N, C, H, W) tensors: normalizes over C at every position.

    The ConvNeXt / Git Re-Basin convention; it keeps a per-channel affine, so the
    layer is equivariant to channel permutations.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@register_layer(LayerNorm2d)
class LayerNorm2dRule(NormRule):
    """Its inner LayerNorm's weight and bias join the channels (axis 1) and take a REPAIR
    correction. torch.fx traces through it exactly (permute, LayerNorm, permute): the rule
    serves hand-built graphs and the repair points."""

    leaf = False

    def channels(self, call: LayerCall) -> Value:
        inner = call.layer.norm
        return rule_for(inner).channels(
            replace(call, layer=inner, path=call.param("norm"), input_shapes=[None])
        )

    def parameter_holder(self, layer: nn.Module, path: str) -> tuple[nn.Module, str]:
        return layer.norm, f"{path}.norm" if path else "norm"


def check_norm(norm: str) -> str:
    """Return ``norm`` if it names a supported normalization, else raise a clear error."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
    return norm


def norm2d(norm: str, channels: int) -> nn.Module:
    """Normalization layer for conv features: BatchNorm2d, channel-last LayerNorm or Identity."""
    layers = {"bn": nn.BatchNorm2d, "ln": LayerNorm2d}
    return layers[norm](channels) if norm in layers else nn.Identity()


def norm1d(norm: str, features: int) -> nn.Module:
    """Normalization layer for flat features: BatchNorm1d, LayerNorm or Identity."""
    layers = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm}
    return layers[norm](features) if norm in layers else nn.Identity()


def scaled(width: int, width_multiplier: float) -> int:
    """Round ``width * width_multiplier`` to a whole number of units; a multiplier that would
    leave a layer with less than one unit is an error, not a silent width of 1."""
    check_width_multiplier(width_multiplier)
    if width * width_multiplier < 1:
        raise ValueError(
            f"width_multiplier={width_multiplier:g} leaves a layer of {width} units with "
            f"{width * width_multiplier:.3g} units: give at least {1 / width:.3g}"
        )
    return max(1, round(width * width_multiplier))


def check_width_multiplier(width_multiplier: float) -> float:
    """Return ``width_multiplier`` if it is a finite positive number, else raise a clear error."""
    if (
        isinstance(width_multiplier, bool)
        or not isinstance(width_multiplier, (int, float))
        or not math.isfinite(width_multiplier)
        or width_multiplier <= 0
    ):
        raise ValueError(
            "width_multiplier must be a finite number > 0 (e.g. 0.5, 1, 4), "
            f"got {width_multiplier!r}"
        )
    return width_multiplier


def check_network_args(norm: str, num_classes: int, in_channels: int) -> None:
    """Validate the arguments every reference CNN takes."""
    check_norm(norm)
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)


def kaiming_init_convs(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) weights and zero biases for every Conv2d in ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
