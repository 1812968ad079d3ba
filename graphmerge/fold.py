"""The fold: W_merged = sum_i M_out,i . W_i . U_in,i for every parameter and buffer.

Its vocabulary is the bottom of graphmerge: a :class:`ChannelRun` is ``width``
channels at ``offset`` along an axis, each repeated ``repeat`` times in a row (a
flattened C x H x W map); a :class:`ParamAxis` is a run of a parameter axis that
belongs to a space; a :class:`Match` is how one space is merged.

Each space carries, per model i, a map for the axes that write it (the merge
matrix block M_i, shape (d', d)) and one for the axes that read it (U_i^T, the
transposed unmerge block, also (d', d)). A parameter axis made of several runs
(a concatenation) or of repeated channels (a flattened C x H x W map) is folded
run by run. Spaces without maps (input, frozen ones, averaged outputs) keep
their axes as they are: the parameter is then averaged over the models.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Role = Literal["out", "in"]


class ChannelRun:
    """``width`` channels from position ``offset`` of an axis, each ``repeat`` times in a row.

    The one vocabulary of channel runs: a parameter axis block (:class:`ParamAxis`), a
    space's part of a concatenation (``graphs.Block``). Subclasses are frozen dataclasses
    with the fields ``offset``, ``width`` and ``repeat``.
    """

    offset: int
    width: int
    repeat: int

    @property
    def size(self) -> int:
        """Positions the run covers along its axis: width * repeat."""
        return self.width * self.repeat

    @property
    def stop(self) -> int:
        return self.offset + self.size

    def units(self, tensor: Tensor, axis: int) -> Tensor:
        """The run's positions of ``axis`` as two axes (width, repeat): one per channel."""
        part = tensor.narrow(axis, self.offset, self.size)
        shape = part.shape
        return part.reshape(*shape[:axis], self.width, self.repeat, *shape[axis + 1 :])

    def rows(self, tensor: Tensor, axis: int) -> Tensor:
        """The run's channels as rows: (width, everything else), repeats kept with their channel."""
        return self.units(tensor, axis).movedim(axis, 0).reshape(self.width, -1)


@dataclass(frozen=True)
class ParamAxis(ChannelRun):
    """One run of a parameter axis that belongs to a space.

    ``role`` is "out" where the parameter writes the space (conv output channels,
    biases, norm parameters and buffers: folded with the merge matrix) and "in"
    where it reads it (conv input channels: folded with the unmerge matrix).
    Positions ``offset`` .. ``offset + width * repeat`` of ``axis`` hold the space,
    each channel repeated ``repeat`` times consecutively.

    ``groups`` > 1 marks the input axis of a grouped convolution (weight axis 1): the
    space has ``groups`` blocks of ``width // groups`` channels, and the rows of block g
    along axis 0 read only block g, so the axis holds one block (``block_width``
    positions) and is folded block by block (``fold_grouped``).
    """

    param: str
    axis: int
    role: Role
    offset: int = 0
    width: int = 0
    repeat: int = 1
    groups: int = 1

    @property
    def block_width(self) -> int:
        return self.width // self.groups

    @property
    def size(self) -> int:
        return self.block_width * self.repeat if self.groups > 1 else self.width * self.repeat

    def __str__(self) -> str:
        repeat = f" x{self.repeat}" if self.repeat > 1 else ""
        groups = f" /{self.groups} groups" if self.groups > 1 else ""
        return f"{self.param}:{self.axis}[{self.offset}:{self.stop}]{repeat}{groups} ({self.role})"


@dataclass(frozen=True)
class Match:
    """How one space is merged: ``merge`` (d', N*d) and ``unmerge`` (N*d, d')."""

    merge: Tensor
    unmerge: Tensor

    @property
    def merged_width(self) -> int:
        return self.merge.shape[0]


def composed_permutation(blocks: Tensor, within: Sequence[Tensor]) -> Tensor:
    """The permutation of a structured axis: new position h*w + j takes old position
    blocks[h]*w + within[h][j] (block h of the result is block ``blocks[h]``, its channels
    reordered by ``within[h]``).

    Example:
        >>> composed_permutation(torch.tensor([1, 0]), [torch.tensor([1, 0])] * 2).tolist()
        [3, 2, 1, 0]
    """
    width = len(within[0])
    return torch.cat([blocks[h] * width + within[h].long() for h in range(len(blocks))])


def state_tensors(model: nn.Module, keep_vars: bool = False) -> dict[str, Tensor]:
    """Every tensor a merge carries: the state_dict, then the buffers registered with
    ``persistent=False`` (index tables, position ids), which the state_dict leaves out.

    Example:
        >>> sorted(state_tensors(nn.BatchNorm1d(2)))
        ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """
    tensors = dict(model.state_dict(keep_vars=keep_vars))
    for path, module in model.named_modules(remove_duplicate=False):
        for name in sorted(module._non_persistent_buffers_set):
            buffer = module._buffers.get(name)
            if buffer is not None:
                tensors[f"{path}.{name}" if path else name] = (
                    buffer if keep_vars else buffer.detach()
                )
    return tensors


def tensor_aliases(model: nn.Module) -> dict[str, str]:
    """Names of tensors also reachable under an earlier name: tied weights
    (``head.weight = embedding.weight``) and modules registered twice, each mapped to the
    first name (the one ``named_parameters`` gives)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state_tensors(model, keep_vars=True).items():
        canonical = first.setdefault(id(tensor), key)
        if canonical != key:
            aliases[key] = canonical
    return aliases


def loaded_copy(template: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy of ``template`` holding ``tensors`` (named as by ``state_tensors``).

    Tensors are set directly rather than through ``load_state_dict``, so shapes may change
    and no loading hook runs (torchvision's MNASNet refuses a state dict without its
    version metadata); a buffer missing from ``tensors`` keeps the template's value.
    """
    model = copy.deepcopy(template)
    replaced: dict[int, Tensor] = {}  # a tensor held by several modules stays shared (tied)
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and prefix + name in tensors:
                if id(parameter) not in replaced:
                    value = tensors[prefix + name].to(parameter.dtype)
                    replaced[id(parameter)] = nn.Parameter(
                        value, requires_grad=parameter.requires_grad
                    )
                module._parameters[name] = replaced[id(parameter)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and prefix + name in tensors:
                if id(buffer) not in replaced:
                    replaced[id(buffer)] = tensors[prefix + name].to(buffer.dtype).clone()
                module._buffers[name] = replaced[id(buffer)]
    return model


@dataclass(frozen=True)
class AxisMap:
    """A linear map from d channels to d' channels, applied along one tensor axis.

    Either a dense ``matrix`` (d', d) or, when every row has at most one non-zero
    (permutations, averaging of matched units, block placement), an ``index`` of
    length d' with an optional ``scale``: output channel k is ``scale[k]`` times
    input channel ``index[k]``. The sparse form is exact and fast.
    """

    matrix: Tensor | None = None
    index: Tensor | None = None
    scale: Tensor | None = None

    @classmethod
    def permutation(cls, index: Tensor) -> AxisMap:
        return cls(index=index.long())

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> AxisMap:
        """The sparse form when each row has at most one non-zero, else the dense one."""
        nonzero = matrix != 0
        if bool((nonzero.sum(dim=1) <= 1).all()):
            index = nonzero.to(torch.int8).argmax(dim=1)
            scale = matrix.gather(1, index[:, None]).squeeze(1)
            return cls(index=index, scale=None if bool((scale == 1).all()) else scale)
        return cls(matrix=matrix)

    def dense(self, width: int) -> Tensor:
        """The map as a (d', d) matrix (float64), d = ``width``."""
        if self.matrix is not None:
            return self.matrix.double()
        matrix = torch.zeros(len(self.index), width, dtype=torch.float64)
        scale = torch.ones(len(self.index)) if self.scale is None else self.scale
        matrix[torch.arange(len(self.index)), self.index.long().cpu()] = scale.double().cpu()
        return matrix

    def apply(self, tensor: Tensor, axis: int) -> Tensor:
        """``tensor`` with ``axis`` (length d) mapped to d' channels."""
        if self.index is not None:
            mapped = tensor.index_select(axis, self.index.to(tensor.device))
            if self.scale is None:
                return mapped
            shape = [1] * tensor.dim()
            shape[axis] = -1
            return mapped * self.scale.to(device=tensor.device, dtype=tensor.dtype).view(shape)
        matrix = self.matrix.to(device=tensor.device, dtype=tensor.dtype)
        moved = tensor.movedim(axis, -1) @ matrix.T
        return moved.movedim(-1, axis)


@dataclass(frozen=True)
class SpaceMaps:
    """Per model i: the map of axes writing the space (M_i) and reading it (U_i^T)."""

    write: Sequence[AxisMap]
    read: Sequence[AxisMap]


def fold_tensors(
    tensors: Sequence[Tensor],
    param_axes: Sequence[tuple[str, ParamAxis]],
    maps: Mapping[str, SpaceMaps],
    weights: Tensor | None = None,
) -> Tensor:
    """Fold one parameter of N models: sum_i (maps applied to tensor i), averaged if unmerged.

    ``param_axes`` lists (space name, ParamAxis) runs of this parameter. The
    sum is divided by N (or weighted by ``weights``, one per model) unless an axis
    that writes a mapped space carries the weighting itself (merge matrices already
    average).
    """
    if not tensors[0].is_floating_point():
        return tensors[0].clone()  # counters such as num_batches_tracked
    by_axis: dict[int, list[tuple[str, ParamAxis]]] = defaultdict(list)
    for space, param_axis in param_axes:
        if space in maps:
            by_axis[param_axis.axis].append((space, param_axis))
    if not by_axis and all(torch.equal(tensors[0], tensor) for tensor in tensors[1:]):
        return tensors[0].clone()  # shared by every model (tables, masks): kept exactly
    weighted = any(run.role == "out" for runs in by_axis.values() for _, run in runs)
    total: Tensor | None = None
    for model, tensor in enumerate(tensors):
        folded = tensor.detach()
        for axis, runs in sorted(by_axis.items()):
            folded = _fold_axis(folded, axis, runs, maps, model)
        if not weighted and weights is not None:
            folded = folded * weights[model].item()
        total = folded if total is None else total + folded
    return total if weighted or weights is not None else total / len(tensors)


def _fold_axis(
    tensor: Tensor,
    axis: int,
    param_axes: list[tuple[str, ParamAxis]],
    maps: Mapping[str, SpaceMaps],
    model: int,
) -> Tensor:
    pieces: list[Tensor] = []
    position = 0
    for space, param_axis in sorted(param_axes, key=lambda item: item[1].offset):
        if param_axis.offset > position:  # channels of unmapped spaces stay as they are
            pieces.append(tensor.narrow(axis, position, param_axis.offset - position))
        space_maps = maps[space]
        axis_map = (space_maps.write if param_axis.role == "out" else space_maps.read)[model]
        if param_axis.groups > 1:
            pieces.append(fold_grouped(tensor, param_axis, axis_map))
        else:
            part = axis_map.apply(param_axis.units(tensor, axis), axis)
            pieces.append(part.flatten(axis, axis + 1))
        position = param_axis.stop
    if position < tensor.shape[axis]:
        pieces.append(tensor.narrow(axis, position, tensor.shape[axis] - position))
    return torch.cat(pieces, dim=axis)


def fold_grouped(tensor: Tensor, param_axis: ParamAxis, axis_map: AxisMap) -> Tensor:
    """Axis 1 of a grouped convolution's weight (rows already in merged order) mapped block by
    block: the rows of merged block g read merged block g of the input space, so they take
    the map's block g rows; its columns sum over the source blocks (a structured match puts
    each merged block's non-zeros in one source block, so the sum is that block).

    The merged space keeps the block width: it has d' / w blocks, as the rows do.
    """
    width, groups = param_axis.width, param_axis.groups
    block = param_axis.block_width
    matrix = axis_map.dense(width).to(device=tensor.device, dtype=tensor.dtype)
    merged_groups = matrix.shape[0] // block
    per_block = matrix.reshape(merged_groups, block, groups, block).sum(dim=2)  # (G', w', w)
    rows = tensor.reshape(merged_groups, tensor.shape[0] // merged_groups, block, -1)
    mapped = torch.einsum("gkj,grjs->grks", per_block, rows)
    return mapped.reshape(tensor.shape[0], block, *tensor.shape[2:])


def block_diagonal(tensor: Tensor, param_axis: ParamAxis) -> Tensor:
    """A grouped weight (C_out, C_in / G, ...) as the dense weight it acts as (C_out, C_in, ...):
    block g of the rows holds its weights at block g of the columns, zeros elsewhere."""
    groups, block = param_axis.groups, param_axis.block_width
    rows = tensor.shape[0] // groups
    dense = tensor.new_zeros(tensor.shape[0], groups * block, *tensor.shape[2:])
    for group in range(groups):
        part = slice(group * rows, (group + 1) * rows)
        dense[part, group * block : (group + 1) * block] = tensor[part]
    return dense


def fold_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]],
    param_axes: Mapping[str, Sequence[tuple[str, ParamAxis]]],
    maps: Mapping[str, SpaceMaps],
    aliases: Mapping[str, str] | None = None,
    weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """Fold every entry of N state dicts (same keys) into one merged state dict.

    ``param_axes`` maps parameter names to their (space, ParamAxis) runs;
    ``aliases`` maps a state-dict key to the name its tensor is known by in the
    graph (a module reached by two paths); ``weights`` (one per model, summing to 1)
    replace the plain average of parameters no merge matrix weights.
    """
    aliases = aliases or {}
    merged: dict[str, Tensor] = {}
    for key, first in state_dicts[0].items():
        axes = param_axes.get(aliases.get(key, key), ())
        tensors = [sd[key] for sd in state_dicts]
        merged[key] = fold_tensors(tensors, axes, maps, weights).to(first.dtype)
    _keep_variances_positive(merged)
    return merged


def _keep_variances_positive(state: dict[str, Tensor]) -> None:
    """Clamp BatchNorm running variances that a map with negative entries made <= 0.

    Maps that mix channels (cca) fold a variance as a signed sum, which can be
    negative: it is raised to the smallest positive variance of the layer, with a
    warning, rather than turned into NaN outputs.
    """
    clamped = []
    for key, value in state.items():
        if key.endswith("running_var") and value.is_floating_point() and (value <= 0).any():
            positive = value[value > 0]
            floor = positive.min() if positive.numel() else torch.ones((), dtype=value.dtype)
            state[key] = torch.where(value > 0, value, floor)
            clamped.append(f"{key} ({int((value <= 0).sum())})")
    if clamped:
        warnings.warn(
            f"merging made BatchNorm running variances <= 0 (the merge matrices mix channels "
            f"with negative weights): clamped in {', '.join(clamped[:3])}"
            f"{' and more' if len(clamped) > 3 else ''}; recompute them with "
            "gm.normalization.reset_bn(merged, loader)",
            RuntimeWarning,
            stacklevel=3,
        )
