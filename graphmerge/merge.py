"""The merge engine: statistics, a matching per space, and the fold, for N >= 2 models.

``merge`` is the one-call API; ``Merger`` keeps the graph and the statistics so
that several methods, scopes and output modes can be compared on the same data
without a second pass.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from graphmerge import matching_functions, normalization
from graphmerge.batches import batch_inputs, check_loader
from graphmerge.fold import AxisMap, Match, SpaceMaps, fold_state_dicts, state_tensors
from graphmerge.graphs import ModelGraph, Space, check_plain_model, trace
from graphmerge.matching_functions import MatchingProblem, structured
from graphmerge.resize import resized_copy
from graphmerge.results import MergeResult
from graphmerge.runtime import (
    ModelInputs,
    call_model,
    evaluating,
    example_inputs,
    first_samples,
    model_device,
    moved_to,
    on_device,
)
from graphmerge.statistics import SpaceStatistics, collect_statistics
from graphmerge.weighting import model_weights, reweighted

Output = Literal["average", "concat"]
OUTPUTS = ("average", "concat")
EXAMPLE_BATCH = 8


class Merger:
    """Merge N models of one architecture; statistics are collected once and reused.

    Example:
        >>> merger = gm.Merger([model_a, model_b], example_input=x)
        >>> merger.collect(loader, max_samples=1024)
        >>> permuted = merger.merge("permute").model
        >>> averaged = merger.merge("identity").model
        >>> ensemble = merger.merge("permute", start_at=len(merger.spaces)).model

    ``device`` is where the models run, the statistics are kept and the merged model
    is built (default: the models' own device; models elsewhere are copied there, the
    caller's are never moved). Matching functions run on the CPU (scipy, numpy).
    Under torch.distributed, ``collect`` sums over the processes: every process gets
    the same statistics and merges the same model (see ``gm.distributed``).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        graph: ModelGraph | None = None,
        example_input: Tensor | tuple[Tensor, ...] | dict | ModelInputs | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        check_models(models, same_device=device is None)
        models = on_device(models, device)
        device = model_device(models[0])
        if graph is None:
            if example_input is None:
                raise ValueError("Merger needs a graph or an example_input to trace the models")
            graph = trace(models[0], _first_samples(_placed(example_input, device)))
        self.models = list(models)
        self.graph = graph
        self.example_input = None if example_input is None else _placed(example_input, device)
        self.statistics: dict[str, SpaceStatistics] | None = None
        self.progress = progress
        # The source models' moments at repair points depend only on the graph and the
        # data: REPAIR / RESCALE of several merges on one loader read them once.
        self._reference_moments = normalization.ReferenceCache()

    @property
    def spaces(self) -> list[Space]:
        """The mergeable spaces, in topological order (what start_at / stop_at count)."""
        return self.graph.mergeable_spaces

    def collect(
        self,
        loader: Iterable,
        max_batches: int | None = None,
        max_samples: int | None = None,
        progress: bool | None = None,
    ) -> dict[str, SpaceStatistics]:
        """One pass over ``loader``: feature statistics of every mergeable space."""
        self.statistics = collect_statistics(
            self.models,
            self.graph,
            loader,
            max_batches=max_batches,
            max_samples=max_samples,
            progress=self.progress if progress is None else progress,
        )
        return self.statistics

    def merge(
        self,
        method: str = "permute",
        *,
        start_at: int | str | None = None,
        stop_at: int | str | None = None,
        output: Output = "average",
        weights: float | Sequence[float] | None = None,
        normalize: str | None = None,
        loader: Iterable | None = None,
        **hparams: object,
    ) -> MergeResult:
        """Match the spaces in [start_at, stop_at) with ``method``; keep the others unmerged.

        ``start_at=k`` keeps the first k mergeable spaces side by side (width N*d,
        preserve-first merging); ``stop_at=k`` keeps spaces k.. side by side
        (partial zipping, per-model heads). Spaces are given by index into
        ``self.spaces`` or by name. ``output="concat"`` gives joint logits over
        the models' label sets; ``"average"`` averages them. ``weights`` (one per
        model, or alpha for two: weights 1 - alpha, alpha) replace the plain average:
        with ``permute``, alpha in [0, 1] walks the aligned interpolation path.
        ``normalize`` ("reset", "repair", "rescale") repairs the merged model's
        statistics on ``loader`` (see ``gm.normalization``).
        """
        entry = matching_functions.entry(method)
        entry.check_hyperparameters(hparams)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        normalization.check_data(normalization.check_name(normalize), loader)
        weight = None if weights is None else model_weights(weights, len(self.models))
        first, last = self.scope(start_at, stop_at)
        merged = self._in_scope(self.spaces[first:last])
        if merged and entry.needs_statistics and self.statistics is None:
            raise ValueError(
                f"method {method!r} needs feature statistics: call collect(loader) first"
            )
        count = len(self.models)
        started = time.perf_counter()
        problem = MatchingProblem(
            graph=self.graph,
            spaces=[space for space in self.spaces if space.name in merged],
            num_models=count,
            positions={space.name: index for index, space in enumerate(self.spaces)},
            num_spaces=len(self.spaces),
            statistics=self.statistics,
            states=[state_tensors(model) for model in self.models],
            models=self.models,
            loader=loader,
        )
        solution = entry.solve(problem, hparams)
        matches: dict[str, Match] = {}
        for space in self.spaces:
            if space.name in merged:
                found = solution.matches.get(space.name)
                matches[space.name] = _checked(found, space, count, method)
            else:
                eye = torch.eye(count * space.width, dtype=torch.float64)
                matches[space.name] = Match(eye, eye)
        for index in self.graph.block_spaces:
            matches[index.name] = _index_match(self.graph, index, matches, count, method)
        _warn_mixing_through_layer_norm(self.graph, matches, merged, count, method)
        details = dict(solution.details)
        result = MergeResult(
            model=None, matches=matches, merged=merged, method=method, output=output,
            seconds={"matching": time.perf_counter() - started}, details=details,
            graph=self.graph, weights=weight,
        )  # fmt: skip
        refit = functools.partial(self._refit, entry, problem, hparams) if entry.refits else None
        return self._fold_result(result, normalize, loader, refit)

    def _refit(
        self,
        entry: matching_functions.Entry,
        problem: MatchingProblem,
        hparams: dict[str, object],
        result: MergeResult,
    ) -> None:
        """The method's own step on the folded model (PLeaS's least squares), if it has one."""
        maps = self._maps(result.matches, result.output, result.weights)
        result.model, found = entry.refit(
            result.model, problem, maps, result.weights, hparams, self.progress
        )
        result.details.update(found)

    def reweight(
        self,
        result: MergeResult,
        weights: float | Sequence[float] | None,
        normalize: str | None = None,
        loader: Iterable | None = None,
    ) -> MergeResult:
        """The same matching as ``result``, folded with new model ``weights`` (no re-matching).

        Walks an interpolation path at the cost of one fold per point: matching is done
        once. ``normalize`` / ``loader`` as in ``merge``.

        Example:
            >>> aligned = merger.merge("permute")
            >>> path = [merger.reweight(aligned, alpha).model for alpha in (0, 0.25, 0.5)]
        """
        normalization.check_data(normalization.check_name(normalize), loader)
        if matching_functions.entry(result.method).refits:
            raise ValueError(
                f"{result.method} refits the merged layers after the fold, so its matches "
                "alone do not give its model at other weights: merge again with weights= (and "
                "Merger.normalized normalizes its model)"
            )
        weight = None if weights is None else model_weights(weights, len(self.models))
        details = {k: v for k, v in result.details.items() if k != "normalization"}
        again = MergeResult(
            model=None, matches=result.matches, merged=list(result.merged),
            method=result.method, output=result.output,
            seconds={"matching": result.seconds.get("matching", 0.0)}, details=details,
            graph=self.graph, weights=weight,
        )  # fmt: skip
        return self._fold_result(again, normalize, loader)

    def normalized(self, result: MergeResult, normalize: str, loader: Iterable) -> MergeResult:
        """A copy of ``result`` whose model is normalized ("reset", "repair", "rescale") on
        ``loader``: no new fold, so a method's refit (PLeaS) is kept.

        Example:
            >>> repaired = merger.normalized(merger.merge("pleas", loader=loader), "repair", loader)
        """
        normalization.check_data(normalization.check_name(normalize), loader)
        if normalize is None:
            raise ValueError("normalized needs a normalization: 'reset', 'repair' or 'rescale'")
        again = dataclasses.replace(
            result, details=dict(result.details), seconds=dict(result.seconds)
        )
        started = time.perf_counter()
        self._normalize(again, normalize, loader)
        again.seconds["normalize"] = time.perf_counter() - started
        return again

    def _fold_result(
        self,
        result: MergeResult,
        normalize: str | None,
        loader: Iterable | None,
        refit: Callable[[MergeResult], None] | None = None,
    ) -> MergeResult:
        """Fill ``result.model`` with the fold of its matches, refitted by the method (if
        ``refit``) and normalized if asked."""
        started = time.perf_counter()
        result.model = self._fold(result.matches, result.output, result.weights)
        folded = time.perf_counter()
        result.seconds["fold"] = folded - started
        if refit is not None:
            refit(result)
            result.seconds["refit"] = time.perf_counter() - folded
            folded = time.perf_counter()
        if normalize is not None:
            self._normalize(result, normalize, loader)
            result.seconds["normalize"] = time.perf_counter() - folded
        return result

    def _normalize(self, result: MergeResult, normalize: str, loader: Iterable) -> None:
        """Replace ``result.model`` by its normalized copy (RESET, REPAIR or RESCALE)."""
        request = normalization.NormalizationRequest(
            result.model, self.models, loader, self.graph, result.matches,
            weights=result.weights, progress=self.progress,
            reference_cache=self._reference_moments,
        )  # fmt: skip
        report = normalization.normalize(normalize, request)
        result.model = report.model
        result.details["normalization"] = report
        result.normalize = normalize

    def _in_scope(self, spaces: Sequence[Space]) -> list[str]:
        """Names of ``spaces``, with the spaces of a block index following its first one (in
        or out of the scope together: they share one block permutation)."""
        names = {space.name for space in spaces}
        first_of: dict[str, bool] = {}
        for space in self.spaces:
            if space.blocks:
                first_of.setdefault(space.blocks, space.name in names)
        return [
            space.name
            for space in self.spaces
            if (first_of[space.blocks] if space.blocks else space.name in names)
        ]

    def scope(self, start_at: int | str | None, stop_at: int | str | None) -> tuple[int, int]:
        """Indices [first, last) into ``spaces`` of the spaces start_at / stop_at merge."""
        first = 0 if start_at is None else self._position(start_at, "start_at")
        last = len(self.spaces) if stop_at is None else self._position(stop_at, "stop_at")
        if first > last:
            raise ValueError(
                f"start_at={start_at!r} (space {first}) comes after stop_at={stop_at!r} (space "
                f"{last}): no space would be merged; for nothing merged (the ensemble) pass "
                "stop_at=0 alone"
            )
        return first, last

    def _position(self, key: int | str, name: str) -> int:
        count = len(self.spaces)
        if isinstance(key, str):
            names = [space.name for space in self.spaces]
            if key not in names:
                raise ValueError(
                    f"{name}={key!r} is not a mergeable space; mergeable: {', '.join(names)}"
                )
            return names.index(key)
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= count:
            raise ValueError(
                f"{name}={key!r} is out of range: this graph has {count} mergeable spaces, so "
                f"{name} must be an index in 0..{count} or a space name"
            )
        return key

    def _maps(
        self, matches: dict[str, Match], output: Output, weights: Tensor | None = None
    ) -> dict[str, SpaceMaps]:
        """The fold's maps of every matched space (and of the output for joint logits)."""
        count = len(self.models)
        if weights is not None:
            matches = {
                name: Match(reweighted(match.merge, weights), match.unmerge)
                for name, match in matches.items()
            }
        maps = {name: _space_maps(match, count) for name, match in matches.items()}
        if output == "concat":
            classes = self.graph.spaces[-1].width
            placement = torch.eye(count * classes, dtype=torch.float64)
            maps[self.graph.spaces[-1].name] = _space_maps(Match(placement, placement), count)
        return maps

    def _fold(
        self, matches: dict[str, Match], output: Output, weights: Tensor | None = None
    ) -> nn.Module:
        maps = self._maps(matches, output, weights)
        states = [state_tensors(model) for model in self.models]
        state = fold_state_dicts(
            states, self.graph.param_axes, maps, self.graph.aliases, weights=weights
        )
        merged = resized_copy(self.models[0], state)
        if self.example_input is not None:
            _check_runs(merged, _first_samples(self.example_input))
        return merged


def _space_maps(match: Match, count: int) -> SpaceMaps:
    width = match.merge.shape[1] // count
    block = [slice(i * width, (i + 1) * width) for i in range(count)]
    return SpaceMaps(
        write=[AxisMap.from_matrix(match.merge[:, b]) for b in block],
        read=[AxisMap.from_matrix(match.unmerge[b, :].T) for b in block],
    )


def _warn_mixing_through_layer_norm(
    graph: ModelGraph, matches: dict[str, Match], merged: list[str], count: int, method: str
) -> None:
    """A warning where a merge mixes channels (a merged unit takes several units of one
    model: cca, zip's clusters) of a space a LayerNorm normalises: LayerNorm commutes with
    permutations, not with mixing, so even aligned models do not merge exactly there."""
    mixed = []
    for name in merged:
        space = graph.space(name)
        norms = [
            axis.param
            for axis in space.param_axes
            if axis.param.endswith(".weight")
            and isinstance(_module(graph.model, axis.param.rsplit(".", 1)[0]), nn.LayerNorm)
        ]
        merge = matches[name].merge
        blocks = merge.reshape(merge.shape[0], count, -1)
        if norms and bool(((blocks != 0).sum(dim=2) > 1).any()):
            mixed.append(f"{name} (normalised by {norms[0].rsplit('.', 1)[0]})")
    if mixed:
        warnings.warn(
            f"{method} mixes channels of {len(mixed)} space{'s' if len(mixed) > 1 else ''} that "
            f"a LayerNorm normalises, e.g. "
            f"{', '.join(mixed[:3])}: LayerNorm commutes with permutations, not with mixing, so "
            "the merge is not exact there even for aligned models; permute and weight_matching "
            "are",
            RuntimeWarning,
            stacklevel=3,
        )


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:  # a parameter of the model itself, or of no module
        return None


def _index_match(
    graph: ModelGraph, index: Space, matches: dict[str, Match], count: int, method: str
) -> Match:
    """The match of a block index, from the spaces it structures (which must agree)."""
    found = [
        (space, structured.block_match(matches[space.name], space, index.width, count, method))
        for space in graph.structured(index.name)
    ]
    first_space, first = found[0]
    for space, match in found[1:]:
        if not torch.equal(match.merge != 0, first.merge != 0):
            raise ValueError(
                f"{method} paired the blocks of {first_space.name!r} and {space.name!r} "
                f"differently, but they share the block index {index.name!r} (one permutation "
                "of the heads or groups): match them together (the built-in methods do)"
            )
    return first


def _checked(match: Match | None, space: Space, count: int, method: str) -> Match:
    if not isinstance(match, Match):
        raise ValueError(f"{method} returned no Match for space {space.name!r}")
    total = count * space.width
    merge, unmerge = match.merge, match.unmerge
    if merge.dim() != 2 or unmerge.dim() != 2:
        raise ValueError(f"{method} returned non-matrix merge/unmerge for space {space.name!r}")
    merged_width = merge.shape[0]
    if merge.shape != (merged_width, total) or unmerge.shape != (total, merged_width):
        raise ValueError(
            f"{method} returned merge {tuple(merge.shape)} and unmerge {tuple(unmerge.shape)} "
            f"for space {space.name!r}; expected (d', {total}) and ({total}, d')"
        )
    if not 1 <= merged_width <= total:
        raise ValueError(f"{method} merged space {space.name!r} to width {merged_width}")
    if not (torch.isfinite(merge).all() and torch.isfinite(unmerge).all()):
        raise FloatingPointError(f"{method} returned NaN or Inf for space {space.name!r}")
    return Match(merge.detach().cpu().double(), unmerge.detach().cpu().double())


def _placed(example: object, device: torch.device) -> ModelInputs:
    """The example input(s) as one call's arguments on ``device``."""
    return moved_to(example_inputs(example), device)


def _first_samples(inputs: ModelInputs) -> ModelInputs:
    return first_samples(inputs, EXAMPLE_BATCH)


def _check_runs(model: nn.Module, example: ModelInputs) -> None:
    try:
        with evaluating(model), torch.no_grad():
            call_model(model, example)
    except RuntimeError as error:
        raise RuntimeError(
            f"the merged {type(model).__name__} does not run ({error}); a layer of this model "
            "hard-codes a width that merging changed"
        ) from error


def check_models(models: Sequence[nn.Module], same_device: bool = True) -> None:
    """Clear errors for anything that cannot be merged: count, classes, shapes, NaN, and
    (with ``same_device``) models on different devices."""
    if isinstance(models, nn.Module) or len(models) < 2:
        raise ValueError("merging needs at least 2 models (a list of nn.Modules)")
    for index, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model {index} is a {type(model).__name__}, not an nn.Module")
        check_plain_model(model, f"model {index}")
    reference = models[0].state_dict()
    for index, model in enumerate(models):
        if type(model) is not type(models[0]):
            raise ValueError(
                f"model {index} is a {type(model).__name__} but model 0 is a "
                f"{type(models[0]).__name__}: merge models of the same architecture"
            )
        state = model.state_dict()
        if list(state) != list(reference):
            missing = sorted(set(reference) - set(state))[:3]
            extra = sorted(set(state) - set(reference))[:3]
            raise ValueError(
                f"model {index} has different parameters than model 0 (missing {missing}, "
                f"extra {extra}): merge models of the same architecture"
            )
        for key, tensor in state.items():
            if tensor.shape != reference[key].shape:
                raise ValueError(
                    f"{key} has shape {tuple(tensor.shape)} in model {index} but "
                    f"{tuple(reference[key].shape)} in model 0: merge models of the same "
                    "architecture and width"
                )
            if same_device and tensor.device != reference[key].device:
                raise ValueError(
                    f"{key} is on {tensor.device} in model {index} but on "
                    f"{reference[key].device} in model 0: move the models to one device, or "
                    "pass device= to merge them there"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{key} of model {index} contains NaN or Inf values")


def merge(
    models: Sequence[nn.Module],
    loader: Iterable | None,
    method: str = "permute",
    *,
    start_at: int | str | None = None,
    stop_at: int | str | None = None,
    output: Output = "average",
    graph: ModelGraph | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    example_input: Tensor | None = None,
    normalize: str | None = None,
    weights: float | Sequence[float] | None = None,
    device: torch.device | str | None = None,
    **hparams: object,
) -> nn.Module:
    """Merge N >= 2 models of one architecture into one new model.

    Traces the first model (or uses ``graph``), collects feature statistics on
    ``loader`` (input tensors or (input, target) pairs), matches every mergeable
    space with ``method`` (see ``gm.matching_functions.available()``) and folds.
    ``method="weight_matching"`` needs no data: ``loader`` may be None, and then
    the models are traced on ``example_input`` (a batch of inputs) or ``graph``.
    ``normalize`` ("reset", "repair" or "rescale") repairs the merged model's
    statistics on the same loader (which must then be re-iterable: a DataLoader or
    a list); ``weights`` (one per model, or alpha for two) replace the plain average.
    ``device`` as in ``Merger``; under torch.distributed give each process its shard
    of the data (``gm.distributed.shard_loader``) and all get the same merged model.

    Example:
        >>> merged = gm.merge([model_a, model_b], data.train, method="permute")
        >>> repaired = gm.merge([model_a, model_b], data.train, "permute", normalize="repair")
        >>> ensemble = gm.merge([model_a, model_b], data.train, stop_at=0)  # nothing merged
        >>> rebasin = gm.merge([model_a, model_b], None, "weight_matching", example_input=x)
        >>> pfm = gm.merge([model_a, model_b], data.train, "preserve_first", inner="zip", k=3)
    """
    check_models(models, same_device=device is None)
    if loader is not None:
        check_loader(loader)
    normalization.check_data(normalization.check_name(normalize), loader)
    if normalize is not None and iter(loader) is loader:
        raise ValueError(
            f"normalize={normalize!r} passes over the data again after the statistics: "
            "give a DataLoader or a list of batches, not a one-shot iterator"
        )
    options = {"output": output, "weights": weights, "normalize": normalize, "loader": loader}
    needs_data = matching_functions.entry(method).needs_statistics
    if loader is None:
        if needs_data:
            raise ValueError(f"method {method!r} needs a data loader for its feature statistics")
        merger = Merger(models, graph, example_input, progress, device)
        return merger.merge(method, start_at=start_at, stop_at=stop_at, **options, **hparams).model
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        raise ValueError("the loader yielded no batches: merging needs data for statistics")
    example = batch_inputs(first) if example_input is None else example_input
    merger = Merger(models, graph, example, progress, device)
    if needs_data:
        merger.collect(
            itertools.chain([first], batches),
            max_batches=max_batches,
            max_samples=max_samples,
        )
    return merger.merge(method, start_at=start_at, stop_at=stop_at, **options, **hparams).model


def interpolate(
    models: Sequence[nn.Module],
    alpha: float | Sequence[float],
    loader: Iterable | None = None,
    method: str = "identity",
    normalize: str | None = None,
    **options: object,
) -> nn.Module:
    """The model at interpolation weights ``alpha`` between ``models``, aligned by ``method``.

    For two models alpha in [0, 1] gives weights (1 - alpha, alpha); for N, give N
    weights summing to 1. ``method="identity"`` interpolates the weights as they are
    (models already aligned); ``"permute"`` first aligns the models on ``loader``.
    ``normalize`` ("reset", "repair", "rescale") repairs the interpolated model, REPAIR
    toward the alpha-weighted statistics of the endpoints. For a whole curve, collect
    the statistics once with ``Merger`` and call ``merger.merge(method, weights=alpha)``.

    Example:
        >>> middle = gm.interpolate([a, b_aligned], 0.5, data.train, normalize="repair")
    """
    return merge(models, loader, method, normalize=normalize, weights=alpha, **options)
