"""Rules of attention layers: nn.MultiheadAttention.

The residual stream a multi-head attention reads (the columns of its Q, K and V
projections) and the stream it writes (the rows of its output projection) are followed
exactly. Its heads (the rows of Q and K, which share a permutation within each head, and
the rows of V with the output projection's columns) get frozen spaces of their own:
matching heads needs structured spaces, so they are averaged as they are.
"""

from __future__ import annotations

from torch import nn

from graphmerge.graphs.layers.registry import LayerCall, LayerRule, register_layer
from graphmerge.graphs.spaces import Channels, Segment, Several, Value


@register_layer(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    """``attention(query, key, value, ...)``: packed or separate projections, batch_first
    either way, bias_k / bias_v; returns (output, weights)."""

    inputs = 3  # query, key, value (masks may follow)

    def accepts(self, count: int) -> bool:
        return 3 <= count <= 5

    def channels(self, call: LayerCall) -> Value:
        layer, finder = call.layer, call.finder
        query, key, value = call.inputs[:3]
        width, last = layer.embed_dim, None if call.in_ndim is None else call.in_ndim - 1
        if layer._qkv_same_embed_dim:
            for read in (query, key, value):
                call.read("in_proj_weight", 1, width, value=read, expected_axis=last)
        else:
            call.read("q_proj_weight", 1, width, value=query, expected_axis=last)
            call.read("k_proj_weight", 1, layer.kdim, value=key, expected_axis=last)
            call.read("v_proj_weight", 1, layer.vdim, value=value, expected_axis=last)
        reason = (
            f"{call.path} holds attention heads: graphmerge does not match heads yet, they are "
            "averaged as they are"
        )
        query_key, values = (finder.new(call.param(name), width) for name in ("query_key", "value"))
        for element in (query_key, values):
            finder.freeze(element, reason)
        heads = {"query_key": Segment(query_key, width), "value": Segment(values, width)}
        packed = Channels(None, (heads["query_key"], heads["query_key"], heads["value"]))
        rows = {"in_proj_weight": packed, "in_proj_bias": packed}
        rows |= {f"{p}_proj_weight": Channels(None, (heads["query_key"],)) for p in "qk"}
        rows["v_proj_weight"] = Channels(None, (heads["value"],))
        for name, channels in rows.items():
            if getattr(layer, name, None) is not None:
                finder.touch(call.param(name), 0, "out", channels)
        for name, head in (("bias_k", "query_key"), ("bias_v", "value")):
            if getattr(layer, name, None) is not None:
                finder.touch(call.param(name), 2, "out", Channels(None, (heads[head],)))
        finder.touch(call.param("out_proj.weight"), 1, "in", Channels(None, (heads["value"],)))
        out = finder.new_channels(call.path, width, last)
        finder.touch(call.param("out_proj.weight"), 0, "out", out)
        if layer.out_proj.bias is not None:
            finder.touch(call.param("out_proj.bias"), 0, "out", out)
        return Several((out, None))
