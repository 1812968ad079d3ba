"""HuggingFace transformers and timm architectures by name, built from configs with random
weights (never a download): ``hf:bert``, ``hf:gpt2``, ``hf:vit``, ``timm:<name>``.

transformers and timm are imported only when such a model is built.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from torch import nn

from graphmerge.models.layers import check_width_multiplier

HF_PREFIX = "hf:"
TIMM_PREFIX = "timm:"
# Tokens of the bundled digits as text: pixel intensities 0..16, then [CLS] (see data.digits).
DIGIT_VOCABULARY = 18


def _import(name: str, extra: str) -> ModuleType:
    try:
        return __import__(name)
    except ImportError as error:
        raise ImportError(
            f"{name} models need {name}: install it with `pip install 'graphmerge[{extra}]'` "
            f"(importing it failed with: {error})"
        ) from error


def _text(config_name: str, model_name: str, **fixed: Any) -> Callable[..., nn.Module]:
    """A builder of a small text classifier of ``transformers.<model_name>``."""

    def build(
        num_classes: int = 10,
        vocab_size: int = DIGIT_VOCABULARY,
        max_length: int = 80,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 128,
        width_multiplier: float = 1.0,
    ) -> nn.Module:
        transformers = _import("transformers", "hf")
        names = CONFIG_NAMES[config_name]
        values = {
            "vocab_size": vocab_size,
            "max_length": max_length,
            "hidden_size": _scaled(hidden_size, width_multiplier, num_heads),
            "num_layers": num_layers,
            "num_heads": num_heads,
            "intermediate_size": _scaled(intermediate_size, width_multiplier, 1),
        }
        if "pad_token_id" in fixed and config_name == "RobertaConfig":
            values["max_length"] += fixed["pad_token_id"] + 1  # positions count from the pad
        config = getattr(transformers, config_name)(
            num_labels=num_classes,
            **{names[key]: value for key, value in values.items() if key in names},
            **fixed,
        )
        return getattr(transformers, model_name)(config).eval()

    return build


def _scaled(width: int, multiplier: float, multiple: int) -> int:
    """``width * multiplier``, rounded to a multiple of ``multiple`` (the heads), at least one."""
    check_width_multiplier(multiplier)
    return max(multiple, round(width * multiplier / multiple) * multiple)


def _vit(
    num_classes: int = 10,
    image_size: int = 8,
    patch_size: int = 2,
    in_channels: int = 1,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    width_multiplier: float = 1.0,
) -> nn.Module:
    transformers = _import("transformers", "hf")
    config = transformers.ViTConfig(
        num_labels=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=in_channels,
        hidden_size=_scaled(hidden_size, width_multiplier, num_heads),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=_scaled(intermediate_size, width_multiplier, 1),
    )
    return transformers.ViTForImageClassification(config).eval()


_BERT_NAMES = {
    "vocab_size": "vocab_size",
    "max_length": "max_position_embeddings",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
}
CONFIG_NAMES = {
    "BertConfig": _BERT_NAMES,
    "RobertaConfig": _BERT_NAMES,
    "DistilBertConfig": {
        "vocab_size": "vocab_size",
        "max_length": "max_position_embeddings",
        "hidden_size": "dim",
        "num_layers": "n_layers",
        "num_heads": "n_heads",
        "intermediate_size": "hidden_dim",
    },
    "GPT2Config": {
        "vocab_size": "vocab_size",
        "max_length": "n_positions",
        "hidden_size": "n_embd",
        "num_layers": "n_layer",
        "num_heads": "n_head",
        "intermediate_size": "n_inner",
    },
}
HF_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "bert": _text("BertConfig", "BertForSequenceClassification"),
    "roberta": _text(
        "RobertaConfig", "RobertaForSequenceClassification", pad_token_id=DIGIT_VOCABULARY - 1
    ),
    "distilbert": _text("DistilBertConfig", "DistilBertForSequenceClassification"),
    # GPT-2 reads its prediction at the last token that is not padding.
    "gpt2": _text(
        "GPT2Config",
        "GPT2ForSequenceClassification",
        use_cache=False,
        pad_token_id=DIGIT_VOCABULARY - 1,
        bos_token_id=DIGIT_VOCABULARY - 1,
        eos_token_id=DIGIT_VOCABULARY - 1,
    ),
    "vit": _vit,
}


# A HuggingFace model of any config (a folder of config.json and model.safetensors).
HF_CONFIG = "hf-config"


def hf_from_config(config: dict[str, Any]) -> nn.Module:
    """The model ``config["architectures"][0]`` of a HuggingFace config (as config.json
    holds it) with random weights."""
    transformers = _import("transformers", "hf")
    values = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
    values.pop("transformers_version", None)
    settings = transformers.AutoConfig.for_model(config["model_type"], **values)
    architectures = settings.architectures or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(
            f"the HuggingFace config names no model class transformers has (architectures: "
            f"{architectures}): save the model with model.save_pretrained(folder)"
        )
    return getattr(transformers, architectures[0])(settings).eval()


def hf_config(model: nn.Module) -> dict[str, Any]:
    """A HuggingFace model's config as a plain dict (what ``hf_from_config`` rebuilds)."""
    config = model.config.to_dict()
    return {
        k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"
    }


def hf_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of ``hf:<name>``, or a clear error naming the known ones."""
    if name not in HF_BUILDERS:
        close = difflib.get_close_matches(name, list(HF_BUILDERS), n=3)
        hint = f" Did you mean {', '.join(HF_PREFIX + c for c in close)}?" if close else ""
        known = ", ".join(HF_PREFIX + known for known in HF_BUILDERS)
        raise ValueError(f"unknown HuggingFace architecture {name!r}.{hint} Known: {known}")
    return HF_BUILDERS[name]


def timm_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of ``timm:<name>`` (random weights, ``pretrained=False``)."""

    def build(
        num_classes: int = 10,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        options: dict[str, Any] | None = None,
    ) -> nn.Module:
        """``options``: further arguments of ``timm.create_model`` (e.g. drop_path_rate)."""
        if width_multiplier != 1.0:
            raise ValueError(
                f"timm:{name} has no width multiplier (got {width_multiplier}); pass the "
                "model's own width arguments instead"
            )
        timm = _import("timm", "timm")
        if name not in timm.list_models():
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
            raise ValueError(f"unknown timm architecture {name!r}.{hint}")
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
            **(options or {}),
        )  # fmt: skip

    return build
