"""Rules of torch.nn's transformer layers: traced through, in their plain (slow-path) form.

``nn.TransformerEncoderLayer`` and its kin choose a fused fast path by testing their
inputs, which torch.fx cannot trace. Their rules give the tracer the same computation
written plainly (what the layers compute in eval mode when the fast path is off), so the
attention, the norms and the feed-forward layers inside become nodes of the graph.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from graphmerge.graphs.layers.registry import LayerRule, register_layer


class TracedThroughRule(LayerRule):
    """A layer torch.fx traces through, by ``traced_forward`` instead of its own forward."""

    leaf = False


@register_layer(nn.TransformerEncoderLayer)
class EncoderLayerRule(TracedThroughRule):
    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        return lambda *args, **kwargs: encoder_layer(layer, *args, **kwargs)


@register_layer(nn.TransformerDecoderLayer)
class DecoderLayerRule(TracedThroughRule):
    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        return lambda *args, **kwargs: decoder_layer(layer, *args, **kwargs)


@register_layer(nn.TransformerEncoder)
class EncoderRule(TracedThroughRule):
    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        if kwargs.get("src_key_padding_mask") is not None:
            return None  # padded positions go through nested tensors: not the plain form
        return lambda *args, **kwargs: encoder(layer, *args, **kwargs)


@register_layer(nn.TransformerDecoder)
class DecoderRule(TracedThroughRule):
    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        return lambda *args, **kwargs: decoder(layer, *args, **kwargs)


def encoder_layer(
    layer: nn.TransformerEncoderLayer,
    src: Tensor,
    src_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """TransformerEncoderLayer.forward without its fast path."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal))
    return layer.norm2(x + layer._ff_block(x))


def decoder_layer(
    layer: nn.TransformerDecoderLayer,
    tgt: Tensor,
    memory: Tensor,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
) -> Tensor:
    """TransformerDecoderLayer.forward."""
    x = tgt
    masks = (memory_mask, memory_key_padding_mask, memory_is_causal)
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = x + layer._mha_block(layer.norm2(x), memory, *masks)
        return x + layer._ff_block(layer.norm3(x))
    x = layer.norm1(x + layer._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
    x = layer.norm2(x + layer._mha_block(x, memory, *masks))
    return layer.norm3(x + layer._ff_block(x))


def encoder(
    stack: nn.TransformerEncoder,
    src: Tensor,
    mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool | None = None,
) -> Tensor:
    """TransformerEncoder.forward without nested tensors (no padding mask)."""
    x = src
    for layer in stack.layers:
        x = layer(x, src_mask=mask, is_causal=bool(is_causal))
    return x if stack.norm is None else stack.norm(x)


DECODER_MASKS = (
    "tgt_mask",
    "memory_mask",
    "tgt_key_padding_mask",
    "memory_key_padding_mask",
    "tgt_is_causal",
    "memory_is_causal",
)


def decoder(stack: nn.TransformerDecoder, tgt: Tensor, memory: Tensor, *args, **kwargs) -> Tensor:
    """TransformerDecoder.forward: every layer gets the same masks (positional as in torch)."""
    masks = dict(zip(DECODER_MASKS, args, strict=False)) | kwargs
    masks["tgt_is_causal"] = bool(masks.get("tgt_is_causal"))
    x = tgt
    for layer in stack.layers:
        x = layer(x, memory, **masks)
    return x if stack.norm is None else stack.norm(x)
