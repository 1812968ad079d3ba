"""Attention written out in a model's own code: channels split into heads and followed.

The tracer describes a projection reshaped into heads (``view(B, N, H, d)``, or a packed
``reshape(B, N, 3, H, d)``) by a :class:`~graphmerge.graphs.spaces.Heads`, and follows it
through permutes, ``unbind`` of the packed q, k, v, ``q @ k.transpose(-2, -1)``, softmax,
``attn @ v`` or ``F.scaled_dot_product_attention``, and the reshape that puts the heads
side by side again. The attention pairs the heads: q and k become one space (one
within-head permutation), q and v get one block index (one head permutation). Any other
op on heads freezes them, with the reason.
"""

from __future__ import annotations

from graphmerge.graphs.shapes import axis_groups
from graphmerge.graphs.spaces import Channels, Heads, Segment, SpaceFinder, Value


def split_into_heads(
    value: Channels, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> Heads | None:
    """``value`` (one whole space) reshaped so that its channel axis becomes (H, d) or
    (P, H, d) axes: its Heads; None for any other reshape."""
    if len(value.segments) != 1 or value.segments[0].repeat != 1 or value.axis is None:
        return None
    groups = axis_groups(in_shape, out_shape)
    group = next((g for g in groups or () if value.axis in g[0]), None)
    if group is None or group[0] != [value.axis] or len(group[1]) not in (2, 3):
        return None
    *parts, head_axis, inner_axis = group[1]
    return Heads(
        value.segments[0].element,
        out_shape[head_axis],
        head_axis,
        inner_axis,
        parts=out_shape[parts[0]] if parts else 1,
        parts_axis=parts[0] if parts else None,
    )


def reshaped_heads(
    heads: Heads, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> Value | str:
    """A reshape of heads: the heads side by side again (head and inner axes merged, in that
    order) gives Channels; a reshape that leaves the head, inner and parts axes whole moves
    them; anything else is a problem (a string)."""
    problem = "reshapes attention heads in a way the tracer does not follow"
    groups = axis_groups(in_shape, out_shape)
    if groups is None:
        return problem
    kept = [
        axis for axis in (heads.head_axis, heads.inner_axis, heads.parts_axis) if axis is not None
    ]
    for group_in, group_out in groups:
        if heads.inner_axis is not None and group_in == [heads.inner_axis, heads.head_axis]:
            return "puts split channels back in another order (a channel shuffle)"
        if heads.inner_axis is not None and group_in == [heads.head_axis, heads.inner_axis]:
            if heads.parts != 1 or len(group_out) != 1:
                return problem
            width = heads.heads * in_shape[heads.inner_axis]
            return Channels(group_out[0], (Segment(heads.element, width),))
    moved = {}
    for group_in, group_out in groups:
        touched = [axis for axis in kept if axis in group_in]
        if touched and (len(group_in) != 1 or len(group_out) != 1):
            return problem
        if touched:
            moved[group_in[0]] = group_out[0]
    return heads.moved(moved) if len(moved) == len(kept) else problem


def unpacked(heads: Heads, finder: SpaceFinder, width: int) -> list[Heads] | None:
    """The P pieces of a packed projection along its parts axis (q, k, v), its space cut into
    P parts; ``width`` = H * d. None if the space cannot be cut."""
    whole = Channels(None, (Segment(heads.element, heads.parts * width),))
    cuts = [width * k for k in range(1, heads.parts)]
    refined = finder.refine(whole, cuts)
    if refined is None:
        return None
    shift = {}
    for axis in (heads.head_axis, heads.inner_axis):
        shift[axis] = axis - (1 if axis > heads.parts_axis else 0)
    pieces = [s.element for s in refined.sliced_all(cuts)]
    return [
        Heads(piece, heads.heads, shift[heads.head_axis], shift[heads.inner_axis])
        for piece in pieces
    ]


def attention_scores(finder: SpaceFinder, q: Heads, k: Heads, origin: str) -> Heads | str:
    """``q @ k^T``: q and k become one space in the blocks of a new head index; the logits
    carry that index. A problem (a string) where the heads do not line up."""
    if q.element is None or k.element is None or q.parts != 1 or k.parts != 1:
        return "multiplies attention tensors that are not queries and keys"
    if q.heads != k.heads or q.head_axis != k.head_axis:
        return "multiplies queries and keys whose heads do not line up"
    finder.union(q.element, k.element)
    index = finder.block_index(f"{origin}.heads", q.heads)
    finder.structure(Channels(None, (Segment(q.element, finder.width(q.element)),)), index)
    return Heads(None, q.heads, q.head_axis, None, index=index)


def attended(finder: SpaceFinder, scores: Heads, v: Heads, inner_axis: int) -> Heads | str:
    """``softmax(scores) @ v``: v joins the heads' block index; the result carries v's space."""
    if v.element is None or v.parts != 1 or scores.index is None:
        return "multiplies attention weights with a tensor that is not values"
    if v.heads != scores.heads or v.head_axis != scores.head_axis:
        return "multiplies attention weights and values whose heads do not line up"
    finder.structure(Channels(None, (Segment(v.element, finder.width(v.element)),)), scores.index)
    return Heads(v.element, v.heads, v.head_axis, inner_axis, index=scores.index)
