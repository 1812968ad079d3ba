"""Rules of window attention: torchvision's Swin (``ShiftedWindowAttention``), with its heads.

torchvision computes a Swin block's attention in one fx-wrapped function,
``shifted_window_attention``, whose heads no node shows. Its rule gives torch.fx the same
computation in steps: the (shifted) windows as tokens (``swin_windows``), the Q, K and V
projections (``attention.attention_projections``, as for nn.MultiheadAttention), the heads with the
relative position bias and the shift mask (``swin_attend``), the output projection, and
the windows put back (``swin_unwindows``). The heads are structured spaces as in
``attention``; the relative-position-bias table (((2W-1)^2, H)) has the heads on axis 1,
so its axis 1 belongs to the heads' block index (only the head permutation moves it).
Swin V2 (cosine attention, a bias MLP) is traced as torchvision wrote it (frozen heads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from graphmerge.graphs.layers import attention
from graphmerge.graphs.layers.registry import (
    FunctionCall,
    FunctionRule,
    LayerRule,
    register_function,
    register_layer,
)
from graphmerge.graphs.parameters import FromParameters
from graphmerge.graphs.spaces import Channels, Segment, Several, Unknown, Value

SHIFT_MASK = -100.0  # torchvision's value for attention across a shifted window's edge


def _padding(shape: torch.Size, window_size: list[int]) -> tuple[int, int]:
    pad_right = (window_size[1] - shape[2] % window_size[1]) % window_size[1]
    pad_bottom = (window_size[0] - shape[1] % window_size[0]) % window_size[0]
    return pad_bottom, pad_right


def _shift(padded: tuple[int, int], window_size: list[int], shift_size: list[int]) -> list[int]:
    """No shift along a side the window covers whole (as torchvision does)."""
    return [0 if window_size[i] >= padded[i] else shift_size[i] for i in range(2)]


def swin_windows(x: Tensor, window_size: list[int], shift_size: list[int]) -> Tensor:
    """(B, H, W, C) -> the tokens of each (cyclically shifted, padded) window: (B*nW, N, C)."""
    pad_bottom, pad_right = _padding(x.shape, window_size)
    x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
    batch, height, width, channels = x.shape
    shift = _shift((height, width), window_size, shift_size)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    rows, columns = height // window_size[0], width // window_size[1]
    x = x.view(batch, rows, window_size[0], columns, window_size[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(
        batch * rows * columns, window_size[0] * window_size[1], channels
    )


def swin_unwindows(
    tokens: Tensor, like: Tensor, window_size: list[int], shift_size: list[int]
) -> Tensor:
    """The inverse of ``swin_windows``: windows' tokens back to a map shaped like ``like``."""
    batch, height, width, _ = like.shape
    pad_bottom, pad_right = _padding(like.shape, window_size)
    padded = (height + pad_bottom, width + pad_right)
    rows, columns = padded[0] // window_size[0], padded[1] // window_size[1]
    channels = tokens.shape[-1]
    x = tokens.view(batch, rows, columns, window_size[0], window_size[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded[0], padded[1], channels)
    shift = _shift(padded, window_size, shift_size)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def _shift_mask(padded: tuple[int, int], window_size: list[int], shift: list[int], like: Tensor):
    """torchvision's mask of a shifted window: -100 between tokens from different regions."""
    mask = like.new_zeros(padded)
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    rows, columns = padded[0] // window_size[0], padded[1] // window_size[1]
    mask = mask.view(rows, window_size[0], columns, window_size[1]).permute(0, 2, 1, 3)
    mask = mask.reshape(rows * columns, window_size[0] * window_size[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, SHIFT_MASK).masked_fill(mask == 0, 0.0)


def swin_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    relative_position_bias: Tensor,
    like: Tensor,
    window_size: list[int],
    shift_size: list[int],
    attention_dropout: float,
    training: bool,
) -> Tensor:
    """Window attention of projected q, k, v (tokens first: (N, B*nW, C)) with the relative
    position bias (1, H, N, N) and the shift mask; the heads side by side, (N, B*nW, C)."""
    pad_bottom, pad_right = _padding(like.shape, window_size)
    padded = (like.shape[1] + pad_bottom, like.shape[2] + pad_right)
    shift = _shift(padded, window_size, shift_size)
    mask = _shift_mask(padded, window_size, shift, q) if sum(shift) > 0 else None
    scale = (q.shape[-1] // num_heads) ** -0.5
    return window_heads(
        q, k, v, num_heads, relative_position_bias, mask, scale, attention_dropout, training
    )


fx.wrap("swin_windows")
fx.wrap("swin_unwindows")
fx.wrap("swin_attend")


def shifted_window_attention(layer: nn.Module, x: Tensor) -> Tensor:
    """torchvision's ShiftedWindowAttention.forward (Swin V1) in steps."""
    bias = layer.get_relative_position_bias()
    tokens = swin_windows(x, layer.window_size, layer.shift_size).transpose(0, 1)
    q, k, v = attention.attention_projections(  # via the module: fx.wrap patched it there
        tokens, tokens, tokens, layer.qkv.weight, layer.qkv.bias, None, None, None, None, None
    )
    heads = swin_attend(
        q, k, v, layer.num_heads, bias, x, layer.window_size, layer.shift_size,
        layer.attention_dropout, layer.training,
    )  # fmt: skip
    out = F.dropout(layer.proj(heads.transpose(0, 1)), p=layer.dropout, training=layer.training)
    return swin_unwindows(out, x, layer.window_size, layer.shift_size)


class WindowAttentionRule(LayerRule):
    """A window attention traced through its steps; ``randomize_statistics`` gives its
    relative-position-bias table values of the attention logits' scale (its initial spread,
    0.02, would hide a table left unpermuted: a change of 3e-4 instead of O(1e-2))."""

    leaf = False

    def random_tensor(
        self, layer: nn.Module, name: str, tensor: Tensor, generator: torch.Generator
    ) -> Tensor:
        if name == "relative_position_bias_table":
            return torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        return super().random_tensor(layer, name, tensor, generator)


@register_layer("torchvision.models.swin_transformer.ShiftedWindowAttention")
class ShiftedWindowAttentionRule(WindowAttentionRule):
    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        return lambda x: shifted_window_attention(layer, x)


@register_function("torchvision.models.swin_transformer._get_relative_position_bias")
class RelativePositionBiasRule(FunctionRule):
    """table[index] viewed (N, N, H), moved to (1, H, N, N): the table's axis 1 on axis 1."""

    def channels(self, call: FunctionCall) -> Value:
        table = call.args[0]
        if not isinstance(table, FromParameters) or table.parameter is None:
            return FromParameters.constant_tensor((), f"{call.name}: a bias from a computed table")
        tokens = self.tokens(call)
        axes = (frozenset(), frozenset({(table.parameter, 1)}), frozenset(), frozenset())
        return FromParameters((1, table.shape[1], tokens, tokens), axes)

    def tokens(self, call: FunctionCall) -> int:
        """N, the tokens of a window (torchvision passes the window size)."""
        return call.args[2][0] * call.args[2][1]


class WindowsRule(FunctionRule):
    """Tokens regrouped by windows: the channels pass unchanged, last axis both ways."""

    reads_axis, writes_axis = 3, 2  # (B, H, W, C) -> (B*nW, N, C)

    def channels(self, call: FunctionCall) -> Value:
        value = call.args[0]
        if not isinstance(value, Channels) or value.axis != self.reads_axis:
            reason = f"{call.name} regroups a tensor whose channels are not last"
            call.finder.freeze_value(value, reason)
            return Unknown(reason)
        return value.moved(self.writes_axis)


register_function(swin_windows)(WindowsRule)


@register_function(swin_unwindows)
class UnwindowsRule(WindowsRule):
    reads_axis, writes_axis = 2, 3


@register_function(swin_attend)
class WindowAttendRule(FunctionRule):
    """As ``attend``; the bias's head axis (a table's axis 1) joins the heads' block index."""

    category = "producer"

    def channels(self, call: FunctionCall) -> Value:
        q, k, v, heads, bias = call.args[:5]
        out = attention.paired_heads(call, q, k, v, heads, masks=[])
        if not isinstance(out, Channels) or not isinstance(bias, FromParameters) or bias.constant:
            reason = f"{call.name} adds a position bias the tracer cannot follow"
            for value in (q, k, v):
                call.finder.freeze_value(value, reason)
            return Unknown(reason)
        index = call.finder.block_of(out)
        for param, axis in bias.axes[1]:
            call.finder.touch(param, axis, "out", Channels(None, (Segment(index, heads),)))
        return out


@register_function("torchvision.models.swin_transformer._patch_merging_pad")
class PatchMergingRule(FunctionRule):
    """Swin's patch merging: the 2 x 2 neighbours of each position side by side along the
    channels (last axis), so the output holds the input's channels four times in a row."""

    def channels(self, call: FunctionCall) -> Value:
        value = call.args[0]
        if not isinstance(value, Channels) or value.axis != 3:
            reason = f"{call.name} merges patches of a tensor whose channels are not last"
            call.finder.freeze_value(value, reason)
            return Unknown(reason)
        return Channels(3, value.segments * 4)


def relative_position_bias(table: Tensor, index: Tensor, tokens: int) -> Tensor:
    """timm's relative position bias: table[index] as (1, H, N, N)."""
    bias = table[index.view(-1)].view(tokens, tokens, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


def window_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    bias: Tensor,
    mask: Tensor | None,
    scale: float,
    attention_dropout: float,
    training: bool,
) -> Tensor:
    """timm's window attention of projected q, k, v (tokens first: (N, B*nW, C)) with a
    relative position bias (1, H, N, N) and an optional (nW, N, N) mask: (N, B*nW, C)."""
    tokens, windows = q.shape[:2]

    def heads(x: Tensor) -> Tensor:
        return x.reshape(tokens, windows, num_heads, -1).permute(1, 2, 0, 3)

    attn = (heads(q) * scale) @ heads(k).transpose(-2, -1) + bias
    if mask is not None:
        count = mask.shape[0]
        attn = attn.view(-1, count, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(attn.softmax(dim=-1), p=attention_dropout, training=training)
    return (attn @ heads(v)).permute(2, 0, 1, 3).reshape(tokens, windows, -1)


fx.wrap("relative_position_bias")
fx.wrap("window_heads")


def timm_window_attention(layer: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """timm's WindowAttention.forward (Swin V1) in steps."""
    bias = relative_position_bias(
        layer.relative_position_bias_table, layer.relative_position_index, layer.window_area
    )
    tokens = x.transpose(0, 1)
    q, k, v = attention.attention_projections(
        tokens, tokens, tokens, layer.qkv.weight, layer.qkv.bias, None, None, None, None, None
    )
    dropout = layer.attn_drop.p if isinstance(layer.attn_drop, nn.Dropout) else 0.0
    heads = window_heads(q, k, v, layer.num_heads, bias, mask, layer.scale, dropout, layer.training)
    return layer.proj_drop(layer.proj(heads.transpose(0, 1)))


@register_layer("timm.models.swin_transformer.WindowAttention")
class TimmWindowAttentionRule(WindowAttentionRule):
    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        return lambda x, mask=None: timm_window_attention(layer, x, mask)


@register_function(relative_position_bias)
class TimmRelativePositionBiasRule(RelativePositionBiasRule):
    def tokens(self, call: FunctionCall) -> int:
        return call.args[2]  # timm passes the window area


@register_function(window_heads)
class WindowHeadsRule(WindowAttendRule):
    """As ``swin_attend``; the mask (positions only: a buffer, or an input) is not permuted,
    and a mask computed from channels freezes the heads."""

    def channels(self, call: FunctionCall) -> Value:
        mask = call.args[5]
        if isinstance(mask, (Unknown, Several)) or (
            isinstance(mask, Channels) and not call.finder.is_input(mask)
        ):
            reason = f"{call.name} has a mask computed from channels"
            for value in call.args[:3]:
                call.finder.freeze_value(value, reason)
            return Unknown(reason)
        return super().channels(call)


def maxvit_attention(layer: nn.Module, x: Tensor) -> Tensor:
    """torchvision's MaxViT RelativePositionalMultiHeadAttention.forward in steps: x is
    (B, G, P, D); the P tokens of each of the B*G partitions attend to each other."""
    batch, partitions, tokens, channels = x.shape
    flat = x.reshape(batch * partitions, tokens, channels).transpose(0, 1)
    q, k, v = attention.attention_projections(
        flat, flat, flat, layer.to_qkv.weight, layer.to_qkv.bias, None, None, None, None, None
    )
    bias = relative_position_bias(
        layer.relative_position_bias_table, layer.relative_position_index, layer.max_seq_len
    )
    heads = window_heads(q, k, v, layer.n_heads, bias, None, layer.scale_factor, 0.0, False)
    return layer.merge(heads.transpose(0, 1).reshape(batch, partitions, tokens, channels))


@register_layer("torchvision.models.maxvit.RelativePositionalMultiHeadAttention")
class MaxVitAttentionRule(WindowAttentionRule):
    def traced_forward(self, layer: nn.Module, kwargs: dict) -> Callable | None:
        return lambda x: maxvit_attention(layer, x)
