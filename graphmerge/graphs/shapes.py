"""Where an axis goes when a tensor is reshaped: the shape arithmetic the tracer shares."""

from __future__ import annotations


def reshaped_axis(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int
) -> tuple[int, int, str]:
    """Where channel ``axis`` goes in a reshape: (new axis, repeat factor, problem or "").

    Merging dims that follow the channels into it (flattening C x H x W) repeats
    every channel; anything that splits the channels or moves other dims inside
    them is reported as a problem.
    """
    if in_shape[axis] == 1:
        return 0, 1, "reshapes a single-channel tensor"
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
                return 0, 1, "splits the channel axis (as a channel shuffle does)"
            if group_in[0] != axis:
                return 0, 1, "flattens other dims in front of the channels (channel-last flatten)"
            inner = size_in // in_shape[axis]
            return group_out[0], inner, ""
        i += 1
        j += 1
    return 0, 1, "reshape not understood"


def broadcast_axis(in_ndim: int, out_ndim: int, axis: int) -> int:
    """Where ``axis`` of an ``in_ndim`` tensor lands after broadcasting to ``out_ndim`` dims."""
    return axis + out_ndim - in_ndim
