"""torchvision classification architectures by name, with random weights (never a download)."""

from __future__ import annotations

import difflib
from types import ModuleType

from torch import nn

from graphmerge.models.layers import (
    check_positive_int,
    check_width_multiplier,
    kaiming_init_convs,
    scaled,
)

NATIVE_WIDTH_FAMILIES = ("mobilenet_v2", "mobilenet_v3")
VGG_CONFIG_KEYS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def import_torchvision() -> ModuleType:
    """Import torchvision or explain how to install the pair that works with it."""
    try:
        import torchvision
    except (ImportError, RuntimeError) as error:
        raise ImportError(
            "torchvision models need torchvision: install the pinned pair with "
            "`pip install 'graphmerge[vision]'` (torch==2.14.0, torchvision==0.29.2); "
            f"importing it failed with: {error}"
        ) from error
    return torchvision


def torchvision_names() -> list[str]:
    """Names of torchvision's classification architectures (e.g. resnet18, vgg11_bn)."""
    torchvision = import_torchvision()
    return list(torchvision.models.list_models(module=torchvision.models))


def check_torchvision_name(name: str) -> str:
    """Return ``name`` if torchvision has that classification model, else raise a clear error."""
    names = torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown torchvision architecture {name!r}.{hint} Known: {', '.join(names)}"
        )
    return name


def torchvision_model(
    name: str, num_classes: int = 1000, width_multiplier: float = 1.0
) -> nn.Module:
    """Build torchvision's ``name`` with random weights and ``num_classes`` outputs.

    ``width_multiplier`` scales every hidden width of the resnet/resnext/wide_resnet
    and vgg families, and is passed as ``width_mult`` to mobilenet_v2/v3.

    Example:
        >>> model = torchvision_model("resnet18", num_classes=10, width_multiplier=0.5)
        >>> model.fc.in_features
        256
    """
    torchvision = import_torchvision()
    check_positive_int("num_classes", num_classes)
    check_width_multiplier(width_multiplier)
    check_torchvision_name(name)
    if name.startswith(NATIVE_WIDTH_FAMILIES):
        return torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, width_mult=float(width_multiplier)
        )
    extra = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    if width_multiplier == 1:
        return model
    if isinstance(model, torchvision.models.ResNet):
        return _widen_resnet(model, num_classes, width_multiplier)
    if isinstance(model, torchvision.models.VGG):
        return _widen_vgg(torchvision, model, name, num_classes, width_multiplier)
    raise ValueError(
        f"width_multiplier={width_multiplier} is not supported for torchvision {name!r}; it is "
        "supported for the resnet, resnext, wide_resnet, vgg and mobilenet_v2/v3 families "
        "(use width_multiplier=1 for the others)"
    )


def _widen_resnet(model: nn.Module, num_classes: int, width_multiplier: float) -> nn.Module:
    """Rebuild a torchvision ResNet's stem, stages and head at scaled widths."""
    block = type(model.layer1[0])
    stage_lengths = [
        len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
    ]
    model.inplanes = scaled(64, width_multiplier)
    model.dilation = 1
    model.conv1 = nn.Conv2d(3, model.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = model._norm_layer(model.inplanes)
    stages = zip((64, 128, 256, 512), stage_lengths, strict=True)
    for index, (planes, length) in enumerate(stages, start=1):
        stride = 1 if index == 1 else 2
        stage = model._make_layer(block, scaled(planes, width_multiplier), length, stride=stride)
        setattr(model, f"layer{index}", stage)
    model.fc = nn.Linear(scaled(512, width_multiplier) * block.expansion, num_classes)
    _torchvision_init(model)
    return model


def _widen_vgg(
    torchvision: ModuleType, model: nn.Module, name: str, num_classes: int, width_multiplier: float
) -> nn.Module:
    """Rebuild a torchvision VGG's features and classifier at scaled widths."""
    vgg_module = torchvision.models.vgg
    config = [
        item if item == "M" else scaled(item, width_multiplier)
        for item in vgg_module.cfgs[VGG_CONFIG_KEYS[name.removesuffix("_bn")]]
    ]
    model.features = vgg_module.make_layers(config, batch_norm=name.endswith("_bn"))
    hidden = scaled(4096, width_multiplier)
    model.classifier[0] = nn.Linear(config[-2] * 7 * 7, hidden)
    model.classifier[3] = nn.Linear(hidden, hidden)
    model.classifier[6] = nn.Linear(hidden, num_classes)
    _torchvision_init(model)
    for module in model.classifier.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return model


def _torchvision_init(model: nn.Module) -> None:
    """torchvision's own initialisation of convs and norms (kaiming fan_out, unit scale)."""
    kaiming_init_convs(model)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
