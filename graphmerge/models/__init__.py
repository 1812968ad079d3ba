"""Reference architectures (MLP, VGG, ResNet-20, a small ViT) and torchvision models, by name.

Every builder takes a width multiplier and a number of classes. ``build`` records
the architecture name and its arguments on the model (``spec_of``), so that a
checkpoint can rebuild the model from the file alone.

Example:
    >>> import graphmerge as gm
    >>> model = gm.models.build("resnet20", width_multiplier=2, num_classes=5, seed=0)
    >>> gm.models.spec_of(model).architecture
    'resnet20'
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graphmerge.models.graphs import mlp_graph, reference_graph, resnet20_graph, vgg_graph
from graphmerge.models.layers import LayerNorm2d
from graphmerge.models.mlp import MLP, mlp
from graphmerge.models.resnet import BasicBlock, ResNet20, resnet20
from graphmerge.models.torchvision_models import (
    check_torchvision_name,
    torchvision_model,
    torchvision_names,
)
from graphmerge.models.vgg import VGG, VGG_CONFIGS, vgg
from graphmerge.models.vit import ViT
from graphmerge.models.zoo import (
    HF_BUILDERS,
    HF_CONFIG,
    HF_PREFIX,
    TIMM_PREFIX,
    hf_builder,
    hf_from_config,
    timm_builder,
)

TORCHVISION_PREFIX = "torchvision:"
SPEC_ATTRIBUTE = "graphmerge_spec"

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "vgg": vgg,
    "resnet20": resnet20,
    "vit": ViT,
    HF_CONFIG: hf_from_config,
}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    f"vgg{depth}": ("vgg", {"depth": depth}) for depth in VGG_CONFIGS
}


@dataclass(frozen=True)
class ModelSpec:
    """How a model was built: ``build(architecture, **kwargs)`` rebuilds it (weights aside)."""

    architecture: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "kwargs": dict(self.kwargs)}


def available(include_torchvision: bool = True) -> list[str]:
    """Names ``build`` accepts; torchvision ones carry the ``torchvision:`` prefix."""
    names = sorted([*(set(_BUILDERS) - {HF_CONFIG}), *_ALIASES])
    names += [HF_PREFIX + name for name in HF_BUILDERS]
    if include_torchvision:
        names += [TORCHVISION_PREFIX + name for name in torchvision_names()]
    return names


def build(name: str, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` with ``kwargs``; ``seed`` fixes the random initialisation.

    Names: ``mlp``, ``vgg`` (or ``vgg11``/``vgg13``/``vgg16``/``vgg19``), ``resnet20``,
    ``vit`` (a small vision transformer), ``torchvision:<name>`` for any torchvision
    classification model, ``timm:<name>`` for any timm model and ``hf:bert``,
    ``hf:roberta``, ``hf:distilbert``, ``hf:gpt2`` (small text classifiers of
    HuggingFace transformers, 2 layers of width 64 and 4 heads by default, over the digit
    tokens) and ``hf:vit``; all with random weights, never a download.
    The global RNG is left as it was when ``seed`` is given.

    Example:
        >>> model = build("vgg11", norm="bn", width_multiplier=0.25, in_channels=1, seed=0)
        >>> spec_of(model).kwargs["depth"]
        11
    """
    architecture, builder, kwargs = _resolve(name, kwargs)
    try:
        bound = inspect.signature(builder).bind(**kwargs)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(builder).parameters)
        raise ValueError(f"bad arguments for {name!r}: {error}. It accepts: {accepted}") from None
    bound.apply_defaults()
    if seed is None:
        model = builder(**bound.arguments)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(**bound.arguments)
    setattr(model, SPEC_ATTRIBUTE, ModelSpec(architecture, dict(bound.arguments)))
    return model


def data_kwargs(name: str, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """The build arguments that a data set fixes: classes, and input size or channels.

    Example:
        >>> data_kwargs("mlp", (64,), 5)
        {'num_classes': 5, 'input_dim': 64}
    """
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    architecture = architecture_of(name)
    if architecture == "mlp":
        kwargs["input_dim"] = math.prod(input_shape)
    elif architecture in ("vgg", "resnet20"):
        kwargs["in_channels"] = input_shape[0]
    elif architecture in ("vit", f"{HF_PREFIX}vit"):
        kwargs["in_channels"], kwargs["image_size"] = input_shape[0], input_shape[-1]
    elif architecture.startswith(TIMM_PREFIX):
        kwargs["in_channels"] = input_shape[0]
    elif architecture.startswith(HF_PREFIX):
        kwargs["max_length"] = max(input_shape[-1], 8)
    return kwargs


def architecture_of(name: str) -> str:
    """The architecture a user-facing name builds: ``vgg11`` -> ``vgg``, ``mlp`` -> ``mlp``."""
    return _resolve(name, {})[0]


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The ``ModelSpec`` recorded by ``build``, or None for a model built elsewhere."""
    return getattr(model, SPEC_ATTRIBUTE, None)


def _resolve(
    name: str, kwargs: dict[str, Any]
) -> tuple[str, Callable[..., nn.Module], dict[str, Any]]:
    """Map a user-facing name to (architecture, builder, kwargs with alias defaults)."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    if name in _ALIASES:
        architecture, fixed = _ALIASES[name]
        clashes = {key for key in fixed if key in kwargs and kwargs[key] != fixed[key]}
        if clashes:
            raise ValueError(f"{name!r} fixes {fixed}; it cannot take {sorted(clashes)} as well")
        return architecture, _BUILDERS[architecture], {**kwargs, **fixed}
    if name in _BUILDERS:
        return name, _BUILDERS[name], kwargs
    if name.startswith(TORCHVISION_PREFIX):
        tv_name = check_torchvision_name(name.removeprefix(TORCHVISION_PREFIX))
        return name, _torchvision_builder(tv_name), kwargs
    if name.startswith(HF_PREFIX):
        return name, hf_builder(name.removeprefix(HF_PREFIX)), kwargs
    if name.startswith(TIMM_PREFIX):
        return name, timm_builder(name.removeprefix(TIMM_PREFIX)), kwargs
    choices = available(include_torchvision=False)
    close = difflib.get_close_matches(name, choices, n=3)
    if name in torchvision_names():
        close = [TORCHVISION_PREFIX + name]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}.{hint} Known: {', '.join(choices)}, torchvision:<name> "
        "for torchvision classification models and timm:<name> for timm models (see "
        "graphmerge.models.available())"
    )


def _torchvision_builder(tv_name: str) -> Callable[..., nn.Module]:
    def build_torchvision(num_classes: int = 1000, width_multiplier: float = 1.0) -> nn.Module:
        return torchvision_model(
            tv_name, num_classes=num_classes, width_multiplier=width_multiplier
        )

    return build_torchvision


__all__ = [
    "MLP",
    "VGG",
    "BasicBlock",
    "LayerNorm2d",
    "ModelSpec",
    "ResNet20",
    "ViT",
    "architecture_of",
    "available",
    "build",
    "mlp",
    "mlp_graph",
    "reference_graph",
    "resnet20",
    "resnet20_graph",
    "spec_of",
    "torchvision_model",
    "vgg",
    "vgg_graph",
]
