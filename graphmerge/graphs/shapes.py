"""Where an axis goes when a tensor is reshaped: the shape arithmetic the tracer shares."""

from __future__ import annotations

from math import prod


def reshaped_axis(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int
) -> tuple[int, int, str]:
    """Where channel ``axis`` goes in a reshape: (new axis, repeat factor, problem or "").

    Merging dims that follow the channels into it (flattening C x H x W) repeats
    every channel; anything that splits the channels or moves other dims inside
    them is reported as a problem (merging dims in front of them too: see
    ``reshaped_channels``).
    """
    new_axis, tiles, repeat, problem = reshaped_channels(in_shape, out_shape, axis)
    if not problem and tiles > 1:
        return 0, 1, "flattens other dims in front of the channels (channel-last flatten)"
    return new_axis, repeat, problem


def reshaped_channels(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int
) -> tuple[int, int, int, str]:
    """Where channel ``axis`` goes in a reshape: (new axis, tiles, repeat, problem or "").

    Dims merged into the channel axis from behind repeat every channel (``repeat``: a
    C x H x W map flattened); dims merged from in front lay the channels out ``tiles``
    times in a row (Swin's 2 x 2 patch merging: (2, 2, C) flattened to 4C). Splitting the
    channels is a problem.
    """
    if in_shape[axis] == 1:
        return 0, 1, 1, "reshapes a single-channel tensor"
    big_in = [i for i, size in enumerate(in_shape) if size != 1]
    big_out = [j for j, size in enumerate(out_shape) if size != 1]
    i = j = 0
    while i < len(big_in):
        group_in, group_out = [big_in[i]], [big_out[j]]
        size_in, size_out = in_shape[big_in[i]], out_shape[big_out[j]]
        while size_in != size_out:
            if size_in < size_out:
                i += 1
                group_in.append(big_in[i])
                size_in *= in_shape[big_in[i]]
            else:
                j += 1
                group_out.append(big_out[j])
                size_out *= out_shape[big_out[j]]
        if axis in group_in:
            if len(group_out) > 1:
                return 0, 1, 1, "splits the channel axis (as a channel shuffle does)"
            position = group_in.index(axis)
            tiles = prod(in_shape[k] for k in group_in[:position])
            repeat = prod(in_shape[k] for k in group_in[position + 1 :])
            return group_out[0], tiles, repeat, ""
        i += 1
        j += 1
    return 0, 1, 1, "reshape not understood"


def broadcast_axis(in_ndim: int, out_ndim: int, axis: int) -> int:
    """Where ``axis`` of an ``in_ndim`` tensor lands after broadcasting to ``out_ndim`` dims."""
    return axis + out_ndim - in_ndim


def indexed_axis(
    shape: tuple[int, ...], index: object, axis: int
) -> tuple[int, tuple[int, int] | None, str]:
    """Where channel ``axis`` goes when a tensor of ``shape`` is indexed with ``index`` (the
    items of ``x[...]``: ints, slices, None, Ellipsis): (new axis, the (start, stop) of a
    channel slice or None when all channels stay, problem or "").

    Selecting one channel, a strided channel slice or indexing with a tensor is a problem.
    """
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(item is Ellipsis for item in items) > 1:
        return 0, None, "indexes with several Ellipses"
    if Ellipsis in items:
        position = items.index(Ellipsis)
        consumed = sum(item is not None for item in items) - 1
        items[position : position + 1] = [slice(None)] * (len(shape) - consumed)
    dim = out = 0
    found: tuple[int, tuple[int, int] | None] | None = None
    for item in items:
        if item is None:
            out += 1
            continue
        if dim >= len(shape):
            return 0, None, "indexes more dims than the tensor has"
        if isinstance(item, bool) or not isinstance(item, (int, slice)):
            return 0, None, f"indexes with {type(item).__name__}"
        if isinstance(item, int):
            if dim == axis:
                return 0, None, "selects a single channel"
            dim += 1
            continue
        if dim == axis:
            start, stop, step = item.indices(shape[dim])
            if step != 1:
                return 0, None, "takes a strided slice of the channels"
            found = (out, None if (start, stop) == (0, shape[dim]) else (start, stop))
        dim += 1
        out += 1
    if found is None:  # the channel axis is among the dims the index does not name
        return out + (axis - dim), None, ""
    return found[0], found[1], ""


def axis_groups(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
    """The dims of a reshape paired as (input dims, output dims) of equal sizes, in order
    (dims of size 1 left out); None where the sizes do not pair up."""
    big_in = [i for i, size in enumerate(in_shape) if size != 1]
    big_out = [j for j, size in enumerate(out_shape) if size != 1]
    groups, i, j = [], 0, 0
    while i < len(big_in) and j < len(big_out):
        group_in, group_out = [big_in[i]], [big_out[j]]
        size_in, size_out = in_shape[big_in[i]], out_shape[big_out[j]]
        while size_in != size_out:
            if size_in < size_out and i + 1 < len(big_in):
                i += 1
                group_in.append(big_in[i])
                size_in *= in_shape[big_in[i]]
            elif size_out < size_in and j + 1 < len(big_out):
                j += 1
                group_out.append(big_out[j])
                size_out *= out_shape[big_out[j]]
            else:
                return None
        groups.append((group_in, group_out))
        i += 1
        j += 1
    return groups if i == len(big_in) and j == len(big_out) else None
