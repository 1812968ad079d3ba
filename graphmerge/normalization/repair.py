"""REPAIR and RESCALE: give a merged (or pruned) model's units the statistics they should have.

For every repair point (see ``points``) the target of merged unit k is the merge
matrix's combination of the source models' units, M = [M_1 ... M_N] by model:

    mean_target = M @ mean_sources,    std_target_k = sum_i std(M_i,k x_i)

the std of each model's own contribution to unit k, summed over the models as if the
models were perfectly correlated (for permute and identity, the average of the matched
units' stds: std, not variance, is averaged, as in REPAIR). When a row of M_i mixes
several units of model i (zip within a model, cca), std(M_i,k x_i) =
sqrt(M_i,k Cov_i M_i,k^T) needs model i's covariance at the point, which the reference
pass then collects; otherwise it is |M_i,k| @ std_i. The merged model's own
mean and std are measured on the same data and each unit is corrected in place of
its producing layer: REPAIR y -> (y - mean) * std_target / std + mean_target, RESCALE
y -> (y - mean) * std_target / std + mean (scale only: means stay as they were).
Points are processed level by level (a point's statistics depend on corrections
upstream), one pass over the data per level, so that after the correction every
point meets its target on that data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from graphmerge.batches import batch_inputs
from graphmerge.fold import Match
from graphmerge.graphs import ModelGraph, trace
from graphmerge.normalization.points import FoldTarget, RepairPoint, repair_points
from graphmerge.normalization.registry import (
    NormalizationRequest,
    PointReport,
    Renormalized,
    register,
)
from graphmerge.results import MergeResult
from graphmerge.runtime import copy_model, first_samples, model_device, moved_to, on_device
from graphmerge.statistics import ChannelMoments, ReadPoint, collect_moments
from graphmerge.weighting import model_weights, reweighted

Mode = Literal["repair", "rescale"]
MODES = ("repair", "rescale")
# A merged unit is dead (constant on the data) when its std is below this fraction of
# its scale: it is shifted, never divided by a rounding-error std.
DEAD_RELATIVE = 1e-5
EXAMPLE_BATCH = 8


def repair(
    merged: nn.Module,
    models: Sequence[nn.Module],
    merge_result: MergeResult,
    loader: Iterable,
    *,
    alpha: float | Sequence[float] | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> nn.Module:
    """REPAIR: a copy of ``merged`` whose units have the mean and std of their source units.

    Targets combine the matched units of ``models`` by ``merge_result``'s merge matrices
    (weighted as in the merge, or by interpolation weights ``alpha``: one per model, or
    a float for two); every layer output and residual block output that can absorb a
    correction is shifted and scaled to its target (Jordan et al. 2023). Works with
    BatchNorm, LayerNorm and no normalization.

    Example:
        >>> result = gm.Merger([a, b], example_input=x).merge("permute")  # after collect()
        >>> repaired = gm.normalization.repair(result.model, [a, b], result, data.train)
    """
    return _from_result(merged, models, merge_result, loader, alpha=alpha, mode="repair",
                        max_batches=max_batches, max_samples=max_samples, progress=progress,
                        device=device)  # fmt: skip


def rescale(
    merged: nn.Module,
    models: Sequence[nn.Module],
    merge_result: MergeResult,
    loader: Iterable,
    *,
    alpha: float | Sequence[float] | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> nn.Module:
    """RESCALE: as ``repair`` but scale only; every unit keeps its mean, its std is the target.

    Example:
        >>> rescaled = gm.normalization.rescale(result.model, [a, b], result, data.train)
    """
    return _from_result(merged, models, merge_result, loader, alpha=alpha, mode="rescale",
                        max_batches=max_batches, max_samples=max_samples, progress=progress,
                        device=device)  # fmt: skip


def match_statistics(
    target_model: nn.Module,
    reference_models: nn.Module | Sequence[nn.Module],
    loader: Iterable,
    *,
    mode: Mode = "repair",
    weights: float | Sequence[float] | None = None,
    graph: ModelGraph | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A copy of ``target_model`` whose units take the statistics of the same units of the
    reference models (averaged, or weighted by ``weights``): REPAIR after pruning,
    quantization or interpolation of aligned models, where widths are unchanged.

    Example:
        >>> pruned = prune_half(model)            # torch.nn.utils.prune on a copy
        >>> fixed = gm.normalization.match_statistics(pruned, model, data.train)
    """
    return renormalize(
        target_model, reference_models, loader, graph, weights=weights, mode=mode,
        max_batches=max_batches, max_samples=max_samples, progress=progress, device=device,
    ).model  # fmt: skip


def _from_result(
    merged: nn.Module,
    models: Sequence[nn.Module],
    merge_result: MergeResult,
    loader: Iterable,
    *,
    alpha: float | Sequence[float] | None,
    mode: Mode,
    max_batches: int | None,
    max_samples: int | None,
    progress: bool,
    device: torch.device | str | None,
) -> nn.Module:
    graph, matches = getattr(merge_result, "graph", None), getattr(merge_result, "matches", None)
    if graph is None or matches is None:
        raise TypeError(
            f"merge_result must be the MergeResult of the merge (from gm.Merger.merge), got a "
            f"{type(merge_result).__name__}"
        )
    weights = merge_result.weights if alpha is None else alpha
    if isinstance(weights, Tensor):
        weights = weights.tolist()
    return renormalize(
        merged, models, loader, graph, matches, weights=weights, mode=mode,
        max_batches=max_batches, max_samples=max_samples, progress=progress, device=device,
    ).model  # fmt: skip


def renormalize(
    model: nn.Module,
    references: Sequence[nn.Module],
    loader: Iterable,
    graph: ModelGraph | None = None,
    matches: Mapping[str, Match] | None = None,
    *,
    weights: float | Sequence[float] | None = None,
    mode: Mode = "repair",
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    reference_cache: ReferenceCache | None = None,
    device: torch.device | str | None = None,
) -> Renormalized:
    """Correct ``model``'s unit statistics toward those of ``references``; returns a report.

    ``matches`` (space name -> Match) say which reference units each unit of ``model``
    combines (a merge); without them every unit corresponds to the same unit of each
    reference (same widths: pruning, interpolation of aligned models). ``weights``
    replaces the merge's own 1/N per model (one per reference, summing to 1, or an
    alpha for two). ``graph`` is the references' graph (traced on the loader's first
    batch when omitted). The loader must yield the same samples at every pass
    (no shuffling, or a full epoch) for the targets to be met exactly. The corrected
    copy and the references run on ``device`` (default: ``model``'s own; other models
    are copied there). Under torch.distributed every pass sums over the processes.

    Example:
        >>> report = renormalize(merged, [model_a, model_b], loader, result.graph,
        ...                      result.matches, mode="repair")
        >>> report.model, [p.point.node for p in report.points], report.skipped
    """
    if mode not in MODES:
        raise ValueError(f"unknown normalization mode {mode!r}: choose one of {', '.join(MODES)}")
    references = _checked_references(model, references)
    device = model_device(model) if device is None else torch.device(device)
    references = on_device(references, device)
    loader = _replayable(loader)
    if graph is None:
        graph = trace(
            references[0], moved_to(first_samples(_example(loader), EXAMPLE_BATCH), device)
        )
    count = len(references)
    weight = None if weights is None else model_weights(weights, count)
    merges = merge_matrices(graph, matches, count, weight)
    names = list(merges)
    points, skipped = repair_points(graph, names)
    limits = {"max_batches": max_batches, "max_samples": max_samples, "progress": progress}
    result = Renormalized(copy_model(model).to(device), mode, [], list(skipped), 0)
    if not points:
        return result
    reference_points = [
        ReadPoint(p.node, p.node, graph.space(p.space).width,
                  covariance=_mixes_units(merges[p.space], count))
        for p in points
    ]  # fmt: skip
    cache = ReferenceCache() if reference_cache is None else reference_cache
    moments, passes = cache.moments(references, graph, loader, reference_points, limits)
    result.passes = passes
    for level in sorted({point.level for point in points}):
        chosen = [point for point in points if point.level == level]
        merged_points = [ReadPoint(p.node, p.node, merges[p.space].shape[0]) for p in chosen]
        measured = collect_moments(
            [result.model], graph, loader, merged_points, description=f"{mode} level {level}",
            **limits,
        )[0]  # fmt: skip
        result.passes += 1
        for point in chosen:
            _check_same_data(measured[point.node], moments[0][point.node].count)
            report = _correct(result.model, point, merges[point.space], moments, measured, mode)
            result.points.append(report)
    return result


def merge_matrices(
    graph: ModelGraph,
    matches: Mapping[str, Match] | None,
    count: int,
    weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """The merge matrix of every matched space (float64; every mergeable space averaged
    when ``matches`` is None), reweighted by the models' ``weight``, with a clear error
    where a match does not combine ``count`` models of the space's width."""
    names = list(matches) if matches is not None else [s.name for s in graph.mergeable_spaces]
    found = {}
    for name in names:
        space = graph.space(name)
        if matches is not None:
            merge = matches[name].merge.double().cpu()
        else:
            merge = torch.eye(space.width, dtype=torch.float64).repeat(1, count) / count
        if merge.shape[1] != count * space.width:
            raise ValueError(
                f"the match of space {name!r} combines {merge.shape[1]} units, but "
                f"{count} models of width {space.width} have {count * space.width}"
            )
        found[name] = merge if weight is None else reweighted(merge, weight)
    return found


@register("repair")
def _repair(request: NormalizationRequest) -> Renormalized:
    """REPAIR: every unit gets the mean and std of the source units it combines."""
    return _requested(request, "repair")


@register("rescale")
def _rescale(request: NormalizationRequest) -> Renormalized:
    """RESCALE: every unit gets the std of its source units and keeps its mean."""
    return _requested(request, "rescale")


def _requested(request: NormalizationRequest, mode: Mode) -> Renormalized:
    return renormalize(
        request.model, request.references, request.loader, request.graph, request.matches,
        weights=request.weights, mode=mode, progress=request.progress,
        reference_cache=request.reference_cache,
    )  # fmt: skip


class ReferenceCache:
    """Moments of reference models at graph nodes, kept per (references, loader, limits).

    The references' statistics at a repair point do not depend on the merge, so every
    REPAIR / RESCALE of the same models on the same loader can share them (``Merger`` and
    the comparison harness do). Entries hold the loader and models they were read from.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[tuple[object, ...], dict[str, list[ChannelMoments]]]] = []

    def moments(
        self,
        references: Sequence[nn.Module],
        graph: ModelGraph,
        loader: Iterable,
        points: Sequence[ReadPoint],
        limits: dict[str, object],
    ) -> tuple[list[dict[str, ChannelMoments]], int]:
        """Per reference, the moments at every point; and the passes over the data it took."""
        key = (loader, graph, *references, limits["max_batches"], limits["max_samples"])
        store = self._store(key)
        missing = [point for point in points if not self._holds(store, point)]
        if missing:
            found = collect_moments(
                references, graph, loader, missing, description="reference statistics", **limits
            )
            for point in missing:
                store[point.node] = [per_model[point.node] for per_model in found]
        moments = [
            {point.node: store[point.node][index] for point in points}
            for index in range(len(references))
        ]
        return moments, int(bool(missing))

    @staticmethod
    def _holds(store: dict[str, list[ChannelMoments]], point: ReadPoint) -> bool:
        """Whether ``store`` has what ``point`` asks for (covariance included)."""
        found = store.get(point.node)
        return found is not None and (not point.covariance or found[0].comoment is not None)

    def _store(self, key: tuple[object, ...]) -> dict[str, list[ChannelMoments]]:
        for known, store in self._entries:
            if len(known) == len(key) and all(a is b for a, b in zip(known, key, strict=True)):
                return store
        store: dict[str, list[ChannelMoments]] = {}
        self._entries.append((key, store))
        return store


def _correct(
    model: nn.Module,
    point: RepairPoint,
    merge: Tensor,
    references: list[dict[str, ChannelMoments]],
    measured: dict[str, ChannelMoments],
    mode: Mode,
) -> PointReport:
    sources = [found[point.node] for found in references]
    target_mean = merge @ torch.cat([moments.mean.cpu() for moments in sources])
    target_std = _target_std(merge, sources)
    mean, std = measured[point.node].mean.cpu(), measured[point.node].std.cpu()
    dead = std <= DEAD_RELATIVE * (mean.abs() + target_std) + 1e-12
    scale = torch.where(dead, torch.ones_like(std), target_std / std.clamp_min(1e-300))
    # REPAIR: y -> scale * (y - mean) + target_mean; RESCALE keeps the mean: + mean
    shift = (target_mean if mode == "repair" else mean) - scale * mean
    _fold(model, point.folds, scale, shift)
    return PointReport(
        point, target_mean, target_std, mean, std, scale, shift, int(dead.sum().item())
    )


def _target_std(merge: Tensor, sources: Sequence[ChannelMoments]) -> Tensor:
    """sum_i std(M_i x_i) per merged unit: sqrt(diag(M_i Cov_i M_i^T)) where the covariance
    was collected, else |M_i| @ std_i (the same when a row holds one unit of model i)."""
    width = merge.shape[1] // len(sources)
    total = torch.zeros(merge.shape[0], dtype=torch.float64)
    for index, moments in enumerate(sources):
        block = merge[:, index * width : (index + 1) * width]
        if moments.comoment is None:
            total += block.abs() @ moments.std.cpu()
        else:
            variance = ((block @ moments.covariance.cpu()) * block).sum(dim=1)
            total += variance.clamp_min(0).sqrt()
    return total


def _mixes_units(merge: Tensor, count: int) -> bool:
    """Whether some merged unit combines several units of one model (needs covariance)."""
    blocks = merge.reshape(merge.shape[0], count, merge.shape[1] // count)
    return bool(((blocks != 0).sum(dim=2) > 1).any())


def _fold(model: nn.Module, folds: Sequence[FoldTarget], scale: Tensor, shift: Tensor) -> None:
    """y -> scale * y + shift on the layers' outputs: every weight and bias scaled, the
    shift added to the first bias (a sum of branches gets it once)."""
    shifted = False
    with torch.no_grad():
        for fold in folds:
            layer = model.get_submodule(fold.module)
            weight = _parameter(layer, "weight")
            shape = [1] * weight.dim()
            shape[fold.axis] = -1
            weight.mul_(scale.to(weight).view(shape))
            if fold.has_bias:
                bias = _parameter(layer, "bias")
                bias.mul_(scale.to(bias))
                if not shifted:
                    bias.add_(shift.to(bias))
                    shifted = True


def _parameter(layer: nn.Module, name: str) -> Tensor:
    """The stored tensor behind ``name`` (``name_orig`` when torch.nn.utils.prune masks it)."""
    original = getattr(layer, f"{name}_orig", None)
    return original if isinstance(original, Tensor) else getattr(layer, name)


def _check_same_data(moments: ChannelMoments, samples: int) -> None:
    if moments.count != samples:
        raise ValueError(
            f"the loader gave {moments.count} feature samples in one pass and {samples} in "
            "another: statistics are corrected pass by pass on the same data, so use a "
            "loader that yields the same samples every time (e.g. shuffle=False)"
        )


def _checked_references(model: nn.Module, references: Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(references, nn.Module):
        references = [references]
    references = list(references)
    if not references:
        raise ValueError("give at least one reference model (the source or unpruned models)")
    for index, reference in enumerate([model, *references]):
        if not isinstance(reference, nn.Module):
            raise TypeError(f"expected nn.Modules, got a {type(reference).__name__} ({index})")
    return references


def _replayable(loader: Iterable) -> Iterable:
    if iter(loader) is loader:
        raise ValueError(
            "the loader is a one-shot iterator, but renormalization passes over the data "
            "several times: pass a DataLoader or a list of batches"
        )
    return loader


def _example(loader: Iterable) -> Tensor:
    first = next(iter(loader), None)
    if first is None:
        raise ValueError("the loader yielded no batches: renormalization needs data")
    return batch_inputs(first)
