"""The vocabulary of operations: what the tracer, the GraphBuilder and the repair points call
each torch function and method (by name: ``torch.add``, ``operator.add`` and ``Tensor.add``
are all "add").

One module, so that every part of graphmerge agrees on what an "add" is: ADDITIONS join
branches (a residual stream: a merge point of rank "add"); SUMS, the out-of-place ones
among them, are where a REPAIR correction of the result folds into every branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

ACTIVATION_NAMES = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "gelu",
        "silu",
        "hardswish",
        "hardsigmoid",
        "hardtanh",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "mish",
        "softplus",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "tanh_",
    }
)
# Ops that read their first argument only; a second is a dtype, device or shape reference.
REFERENCE_NAMES = frozenset({"to", "type_as", "view_as", "reshape_as", "expand_as"})
ELEMENTWISE_NAMES = ACTIVATION_NAMES | {
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "stochastic_depth",
    "neg",
    "pos",
    "abs",
    "exp",
    "log",
    "clamp",
    "clamp_",
    "clip",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "square",
    "softmax",
    "log_softmax",
    "normalize",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "identity",
}
BINARY_NAMES = frozenset(
    {
        "add",
        "add_",
        "iadd",
        "sub",
        "sub_",
        "isub",
        "mul",
        "mul_",
        "imul",
        "truediv",
        "div",
        "div_",
        "itruediv",
        "addcmul",
        "addcdiv",
        "pow",
        "where",
        "gt",
        "lt",
        "ge",
        "le",
        "eq",
        "ne",
        "minimum",
        "maximum",
    }
)
# Normalizations over axis 1 with per-channel statistics and affine (F.layer_norm apart).
NORM_NAMES = frozenset({"batch_norm", "instance_norm", "group_norm"})
# Ops returning several tensors, pieces of their input.
SPLIT_NAMES = frozenset({"split", "chunk", "unbind", "tensor_split"})
REDUCTION_NAMES = frozenset({"mean", "sum", "amax", "amin", "std", "var", "logsumexp"})
SHAPE_NAMES = frozenset(
    {"flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
)
BROADCAST_NAMES = frozenset({"expand", "expand_as", "broadcast_to"})
PERMUTE_NAMES = frozenset({"permute", "transpose", "t", "swapaxes", "swapdims"})
SPATIAL_FUNCTIONS: dict[Callable, int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
# Joins of branches by addition (a residual stream): merge points of rank "add".
ADDITIONS = frozenset({"add", "add_", "iadd", "sub", "sub_", "isub"})
ONE_OPERAND_NAMES = (
    ELEMENTWISE_NAMES
    | SHAPE_NAMES
    | BROADCAST_NAMES
    | PERMUTE_NAMES
    | REDUCTION_NAMES
    | {"interpolate"}
)
# Additions whose result a REPAIR correction can be folded through into every branch: the
# out-of-place sums (a difference or an in-place add changes a branch's own value).
SUMS = frozenset({"add", "iadd"})
# The names hand-built graphs give their sums and products (GraphBuilder.add_sum / add_product).
SUM, PRODUCT = "add", "mul"
# Ops a REPAIR correction of their input passes through unchanged (they move, not mix).
TRANSPARENT_NAMES = frozenset({"permute", "transpose", "contiguous", "clone"})
# Ops that read a tensor's metadata, not its values (x.size(0), x.shape, x.dim()).
METADATA_NAMES = frozenset({"size", "dim", "numel", "getattr"})


# aten ops (torch.export's graphs) under the name of the torch function they are.
ATEN_NAMES = {
    "_softmax": "softmax",
    "_log_softmax": "log_softmax",
    "_unsafe_view": "view",
    "_to_copy": "to",
    "alias": "identity",
    "lift_fresh_copy": "clone",
    "swapaxes": "swapaxes",
}


def name_of(target: Any) -> str:
    """The vocabulary's name of an fx node target (a function, a method name, a string, an
    aten op: "aten.add.Tensor" is "add")."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
        return ATEN_NAMES.get(name, name)
    return getattr(target, "__name__", str(target))


PRODUCER_NAMES = frozenset({"linear"})  # functions that write a new space (F.linear)


def category(name: str) -> str:
    """The merge-point category of an op: "activation", "add", "producer" or ""."""
    if name in ACTIVATION_NAMES:
        return "activation"
    if name in PRODUCER_NAMES:
        return "producer"
    return "add" if name in ADDITIONS else ""
