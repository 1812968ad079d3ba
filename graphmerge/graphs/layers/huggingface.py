"""Rules of HuggingFace transformers' own layers, registered by name (transformers is not
imported): GPT-2's Conv1D (a Linear with its weight stored transposed) and the
parameter-free activations of ``transformers.activations``."""

from __future__ import annotations

from torch import nn

from graphmerge.graphs.layers.elementwise import ActivationRule
from graphmerge.graphs.layers.registry import (
    Category,
    Correction,
    LayerCall,
    LayerRule,
    register_layer,
)
from graphmerge.graphs.spaces import Value

HF_ACTIVATIONS = tuple(
    f"transformers.activations.{name}"
    for name in (
        "GELUActivation",
        "NewGELUActivation",
        "FastGELUActivation",
        "QuickGELUActivation",
        "AccurateGELUActivation",
        "ClippedGELUActivation",
        "GELUTanh",
        "PytorchGELUTanh",
        "SiLUActivation",
        "MishActivation",
        "LaplaceActivation",
        "ReLUSquaredActivation",
        "LinearActivation",
    )
)

register_layer(*HF_ACTIVATIONS)(
    type(
        "HuggingFaceActivationRule",
        (ActivationRule,),
        {"__doc__": "transformers' elementwise activations: channels pass as they are."},
    )
)


@register_layer("transformers.pytorch_utils.Conv1D")
class Conv1DRule(LayerRule):
    """GPT-2's Conv1D, ``x @ weight + bias`` with ``weight`` (in, out): reads the input's
    last axis with ``weight`` axis 0, writes a new space with ``weight`` axis 1 and ``bias``."""

    category: Category = "producer"
    correction: Correction = "start"

    def channels(self, call: LayerCall) -> Value:
        layer, last = call.layer, None if call.in_ndim is None else call.in_ndim - 1
        inputs, outputs = layer.weight.shape
        call.read("weight", 0, inputs, expected_axis=last)
        return call.write(outputs, last, ("weight", 1), ("bias", 0))

    def resize(self, layer: nn.Module, path: str) -> None:
        layer.nx, layer.nf = layer.weight.shape
