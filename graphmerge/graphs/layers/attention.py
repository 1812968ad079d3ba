"""Rules of attention layers: nn.MultiheadAttention, traced in a plain form with its heads.

torch.fx traces an ``nn.MultiheadAttention`` call as three steps, so that the features of
its heads become nodes of the graph (their merge points):

1. ``attention_projections``: the Q, K and V projections (packed ``in_proj_weight`` or
   separate ones, with ``bias_k`` / ``bias_v``), sequence first;
2. ``attend``: the heads' scaled dot-product attention, returning the heads' outputs side by
   side (what the output projection reads) and the attention weights;
3. the output projection ``out_proj``.

The residual stream it reads (the columns of Q, K, V) and writes (the rows of the output
projection) are followed exactly. Its heads get two structured spaces sharing one block
index (``<path>.heads``, H blocks of ``head_dim``): ``<path>.query_key`` (the rows of Q and
K, one within-head permutation for both) and ``<path>.value`` (the rows of V and the
output projection's columns, another one); see DESIGN.md section 8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from graphmerge.graphs.layers.dense import LinearRule
from graphmerge.graphs.layers.registry import (
    FunctionCall,
    FunctionRule,
    LayerRule,
    read_problem,
    register_function,
    register_layer,
)
from graphmerge.graphs.parameters import FromParameters
from graphmerge.graphs.spaces import Channels, Segment, Several, Unknown, Value

register_layer(NonDynamicallyQuantizableLinear)(LinearRule)  # out_proj: a plain Linear


def attention_projections(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    q_proj_weight: Tensor | None,
    k_proj_weight: Tensor | None,
    v_proj_weight: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V of nn.MultiheadAttention (sequence first: (L, B, E)), ``bias_k`` / ``bias_v``
    appended to K and V as one more position."""
    if in_proj_weight is not None:
        weights = in_proj_weight.chunk(3)
    else:
        weights = (q_proj_weight, k_proj_weight, v_proj_weight)
    biases = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
    q, k, v = (
        F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)
    )
    if bias_k is not None:
        k = torch.cat([k, bias_k.repeat(1, k.shape[1], 1)])
        v = torch.cat([v, bias_v.repeat(1, v.shape[1], 1)])
    return q, k, v


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    add_zero_attn: bool,
    dropout: float,
    training: bool,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
    biased: bool,
) -> tuple[Tensor, Tensor | None]:
    """The heads of nn.MultiheadAttention on projected q, k, v: (outputs of the heads side by
    side, (L, B, E); attention weights). torch's own F.multi_head_attention_forward computes
    it, with identity projections (exact: each output is one product by 1)."""
    width = q.shape[-1]
    eye = torch.eye(width, dtype=q.dtype, device=q.device)
    if biased:  # bias_k / bias_v are already appended: the masks get their column
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    return F.multi_head_attention_forward(
        q, k, v, width, num_heads, None, None, None, None, add_zero_attn, dropout, eye, None,
        training=training, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, use_separate_proj_weight=True, q_proj_weight=eye,
        k_proj_weight=eye, v_proj_weight=eye, average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )  # fmt: skip


fx.wrap("attention_projections")
fx.wrap("attend")


def multihead_attention(
    layer: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention.forward as projections, heads and output projection."""
    if layer.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    q, k, v = attention_projections(
        query, key, value, layer.in_proj_weight, layer.in_proj_bias, layer.q_proj_weight,
        layer.k_proj_weight, layer.v_proj_weight, layer.bias_k, layer.bias_v,
    )  # fmt: skip
    heads, weights = attend(
        q, k, v, layer.num_heads, layer.add_zero_attn, layer.dropout, layer.training,
        key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
        layer.bias_k is not None,
    )  # fmt: skip
    out = layer.out_proj(heads)
    return (out.transpose(0, 1) if layer.batch_first else out), weights


@register_layer(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    """Traced through ``multihead_attention``: packed or separate projections, batch_first
    either way, bias_k / bias_v, masks."""

    leaf = False

    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        return lambda *args, **kwargs: multihead_attention(layer, *args, **kwargs)


@register_function(attention_projections)
class ProjectionsRule(FunctionRule):
    """Q and K rows write one new space, V rows another; the columns read the inputs."""

    def channels(self, call: FunctionCall) -> Value:
        finder = call.finder
        inputs, params = call.args[:3], call.args[3:]
        packed, packed_bias, q_weight, k_weight, v_weight, bias_k, bias_v = params
        names = {
            "packed": _parameter(packed),
            "packed_bias": _parameter(packed_bias),
            "q": _parameter(q_weight),
            "k": _parameter(k_weight),
            "v": _parameter(v_weight),
        }
        given = [p for p in params if isinstance(p, FromParameters)]
        if any(p.parameter is None for p in given):
            reason = f"{call.name}: attention projections computed from parameters"
            for value in inputs:
                finder.freeze_value(value, reason)
            return Unknown(reason)
        widths = (packed.shape[0] // 3,) * 3 if packed is not None else (
            q_weight.shape[0], k_weight.shape[0], v_weight.shape[0]
        )  # fmt: skip
        origin = (names["packed"] or names["q"]).rsplit(".", 1)[0]
        query_key = finder.new(f"{origin}.query_key", widths[0], producer=True)
        values = finder.new(f"{origin}.value", widths[2], producer=True)
        rows = (Segment(query_key, widths[0]), Segment(query_key, widths[1]))
        rows += (Segment(values, widths[2]),)
        for position, (value, weight) in enumerate(
            zip(inputs, (packed,) * 3 if packed is not None else params[2:5], strict=True)
        ):
            columns = weight.shape[1]
            name = names["packed"] if packed is not None else names["qkv"[position]]
            self._read(call, name, value, columns)
        if packed is not None:
            finder.touch(names["packed"], 0, "out", Channels(None, rows))
        else:
            for position, weight_name in enumerate(names[n] for n in "qkv"):
                finder.touch(weight_name, 0, "out", Channels(None, rows[position : position + 1]))
        if names["packed_bias"] is not None:
            finder.touch(names["packed_bias"], 0, "out", Channels(None, rows))
        for bias, segment in ((bias_k, rows[1]), (bias_v, rows[2])):
            if isinstance(bias, FromParameters):
                finder.touch(bias.parameter, 2, "out", Channels(None, (segment,)))
        last = [None if v is None else v.axis for v in inputs if isinstance(v, Channels)]
        axis = last[0] if last else None
        return Several(tuple(Channels(axis, (segment,)) for segment in rows))

    @staticmethod
    def _read(call: FunctionCall, name: str, value: Value, width: int) -> None:
        finder = call.finder
        if finder.is_input(value):
            value = finder.input_channels(width)
        problem = "" if finder.is_input(value) else read_problem(value, width, None)
        if problem:
            finder.freeze_value(value, f"{call.name} {problem}")
            finder.touch_unknown(name, 1, width, f"{call.name} {problem}")
        else:
            finder.touch(name, 1, "in", value)


@register_function(attend)
class AttendRule(FunctionRule):
    """Q and K must carry one space, V another: both get the heads' block index; the output
    carries V's space (the heads side by side)."""

    category = "producer"

    def channels(self, call: FunctionCall) -> Value:
        q, k, v = call.args[:3]
        masks = [call.argument(7, "key_padding_mask"), call.argument(9, "attn_mask")]
        per_head_weights = call.argument(8, "need_weights") and not call.argument(
            10, "average_attn_weights"
        )
        out = paired_heads(call, q, k, v, call.argument(3, "num_heads"), masks, per_head_weights)
        return Several((out, None))


def paired_heads(
    call: FunctionCall,
    q: Value,
    k: Value,
    v: Value,
    heads: int,
    masks: list,
    per_head_weights: bool = False,
) -> Value:
    """The heads of projected q, k, v (flat channels): q/k and v get one block index of
    ``heads`` blocks; the result carries v's space. Where they cannot be followed, all three
    are frozen and the result is Unknown."""
    finder = call.finder
    problem = _heads_problem(finder, q, k, v, masks)
    if not problem and per_head_weights:
        problem = "returns the attention weights of each head"
    if problem:
        for value in (q, k, v):
            finder.freeze_value(value, f"{call.name} {problem}")
        return Unknown(f"{call.name} {problem}")
    origin = finder.origin(q.segments[0].element).removesuffix(".query_key")
    index = finder.block_index(f"{origin}.heads", heads)
    finder.structure(q, index)
    finder.structure(v, index)
    return v


def _heads_problem(finder, q: Value, k: Value, v: Value, masks: list) -> str:
    """Why the heads of q, k, v cannot be followed ("" when they can)."""
    values = (q, k, v)
    if not all(isinstance(x, Channels) and len(x.segments) == 1 for x in values):
        return "reads projections the tracer could not follow"
    if not finder.same(q.segments[0].element, k.segments[0].element):
        return "reads queries and keys of different spaces"
    for mask in masks:
        if isinstance(mask, (Unknown, Several, FromParameters)) or (
            isinstance(mask, Channels) and not finder.is_input(mask)
        ):
            return "has a mask computed from channels or parameters"
    return ""


def _parameter(value: object) -> str | None:
    return value.parameter if isinstance(value, FromParameters) else None
