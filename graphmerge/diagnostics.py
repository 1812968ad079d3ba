"""Vanishing Feature diagnostics: how much feature variance a merged model keeps, by depth.

Merged networks lose activation variance with depth (Qu & Horvath, "Vanishing Feature:
Diagnosing Model Merging and Beyond"; "variance collapse" in REPAIR). This module
measures it. At every **point** (each layer output that REPAIR corrects, and each
residual sum; ``diagnostic_points``) in a merged space, one pass over the data reads
the merged model's and the source models' per-unit moments (float64, streamed) and
compares them:

- ``merged_var``: the merged model's unit variance, averaged over the point's units;
- ``source_var``: the same average of each merged unit's **source variance**, what the
  unit would have if merging lost nothing. With ``reference="std"`` (default) that is
  REPAIR's target, ``(sum_i std(M_i,k x_i))^2`` for row k of model i's block of the merge
  matrix (weighted as in the merge): the variance of the merge of perfectly correlated
  units. For permute and identity: the squared average of the matched units' stds;
  zip: of the cluster's. With ``reference="variance"``: the merge-weighted average of the
  source units' variances, ``w_k @ var`` with ``w_k = |M_k| / sum |M_k|`` (permute: the
  average over the models of the matched units' variances); it also counts the scale
  differences between the models as loss, so even REPAIR stays below 1 (Jensen);
- ``var_ratio = merged_var / source_var``: a **ratio of the means** over units (robust
  to dead units; eps keeps a dead point finite: 0 / 0 gives 1). 1 is no loss;
- ``merged_rms``, ``source_rms``, ``rms_ratio``: the same for the feature norm, the root
  mean square sqrt(E[x^2]) over units and samples, means included (the source's:
  source variance + squared merged source mean; ``"variance"``: the average E[x^2]);
- ``dead_units``: merged units whose variance is below 1e-5 of the point's source_var.

After REPAIR (or RESCALE) ``var_ratio`` is 1 at every point REPAIR corrects, on the
data it corrected on; residual sums with an identity shortcut are measured too (REPAIR
cannot correct them; they are near 1 when their inputs are).

Example:
    >>> merger = gm.Merger([a, b], example_input=x); merger.collect(loader)
    >>> table = gm.diagnostics.variance_ratios(merger.merge("permute"), [a, b], loader)
    >>> print(table.format()); table.write_csv("ratios.csv")
    >>> table = gm.diagnostics.diagnose([a, b], loader, "permute", [None, "repair"])
    >>> gm.plots.plot_variance_ratios(table.rows, "ratios.png")
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from graphmerge import matching_functions, normalization
from graphmerge._atomic import atomic_write
from graphmerge.batches import batch_inputs, check_loader
from graphmerge.fold import Match
from graphmerge.graphs import ModelGraph, trace
from graphmerge.merge import Merger, MergeResult, check_models
from graphmerge.runtime import evaluating, first_samples, model_device, moved_to, on_device
from graphmerge.statistics import ChannelMoments, DataPass, FeatureReader, ReadPoint
from graphmerge.weighting import model_weights

COLUMNS = (
    "method", "normalize", "depth", "point", "space", "kind", "repairable", "units", "merged_var",
    "source_var", "var_ratio", "merged_rms", "source_rms", "rms_ratio", "dead_units",
)  # fmt: skip
DEFAULT_NORMALIZATIONS = (None, "repair", "rescale", "reset")
REFERENCES = ("std", "variance")
EPS = 1e-12
DEAD_RELATIVE = 1e-5
EXAMPLE_BATCH = 8


@dataclass(frozen=True)
class DiagnosticPoint:
    """A graph node whose output channels are measured: its space, its kind ("layer" for a
    layer's output, "sum" for a residual sum) and whether REPAIR corrects it (``repairable``;
    a sum with an identity shortcut, say, is measured but not corrected)."""

    node: str
    space: str
    kind: str
    repairable: bool


@dataclass
class VarianceTable:
    """Rows (dicts with the keys of ``COLUMNS``), one per (variant, point) in depth order."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def ratios(self, normalize: str | None = None, column: str = "var_ratio") -> list[float]:
        """``column`` of the rows of normalization ``normalize`` (None: "none"), by depth."""
        label = normalize or "none"
        return [row[column] for row in self.rows if row["normalize"] == label]

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write the rows as CSV, atomically (a temporary file, then a rename)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_write(path, "w") as handle:
            handle.write(text.getvalue())

    def format(self) -> str:
        """A plain-text table: variant, depth, point, the ratios and the variances."""
        header = ["normalize", "depth", "point", "var ratio", "rms ratio", "merged var",
                  "source var", "dead"]  # fmt: skip
        lines = [header]
        for row in self.rows:
            lines.append([
                row["normalize"], str(row["depth"]), row["point"], f"{row['var_ratio']:.3f}",
                f"{row['rms_ratio']:.3f}", f"{row['merged_var']:.4g}",
                f"{row['source_var']:.4g}", str(row["dead_units"]),
            ])  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        left = (0, 2)
        formatted = [
            "  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines
        ]  # fmt: skip
        formatted.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(formatted)


def diagnostic_points(graph: ModelGraph, spaces: Iterable[str]) -> list[DiagnosticPoint]:
    """The points of ``spaces`` (names) in topological order: REPAIR's points (layer outputs
    and correctable residual sums) and the places it skips (identity-shortcut sums).

    Example:
        >>> [p.node for p in diagnostic_points(graph, [s.name for s in graph.mergeable_spaces])]
        ['norm1', 'layer1_0_norm1', 'layer1_0_norm2', 'add', ...]
    """
    points, skipped = normalization.repair_points(graph, list(spaces))
    found = {p.node: DiagnosticPoint(p.node, p.space, p.kind, True) for p in points}
    for skip in skipped:
        data = graph.node(skip.node)
        kind = "sum" if len(data.inputs) > 1 else "layer"
        found.setdefault(skip.node, DiagnosticPoint(skip.node, skip.space, kind, False))
    order = {key: index for index, key in enumerate(nx.topological_sort(graph.graph))}
    return sorted(found.values(), key=lambda point: order[point.node])


def variance_ratios(
    merged: MergeResult | nn.Module,
    models: Sequence[nn.Module],
    loader: Iterable,
    *,
    graph: ModelGraph | None = None,
    matches: Mapping[str, Match] | None = None,
    weights: float | Sequence[float] | Tensor | None = None,
    reference: str = "std",
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> VarianceTable:
    """Merged vs source feature variance and RMS at every point, in depth order; one pass.

    ``merged`` is a ``MergeResult`` (its model, graph, matches and weights are used) or a
    merged nn.Module with ``graph`` (the sources' graph; traced on the loader's first batch
    when omitted) and ``matches`` (None: unit k of the merged model combines unit k of
    every source, same widths: interpolation of aligned models). ``weights`` override the
    merge's (one per model, or alpha for two). ``reference`` is what the source variance
    means: "std" (REPAIR's target) or "variance" (the average source variance); see the
    module docstring for both and for the columns. The models run on ``device`` (default:
    the merged model's); a one-shot iterator is fine when ``graph`` is known.

    Example:
        >>> result = merger.merge("permute")
        >>> table = variance_ratios(result, [model_a, model_b], data.train)
        >>> table.ratios()[-1]   # the last point's variance ratio (well below 1)
    """
    _check_reference(reference)
    model, graph, matches, weights, labels = _unpacked(merged, graph, matches, weights)
    models = _checked_sources(models)
    check_loader(loader)
    device = model_device(model) if device is None else torch.device(device)
    if graph is None:
        if iter(loader) is loader:
            raise ValueError(
                "without graph= the models are traced on the loader's first batch, which a "
                "one-shot iterator would lose: pass graph= or a DataLoader / list of batches"
            )
        graph = trace(models[0], moved_to(first_samples(_first_inputs(loader), EXAMPLE_BATCH),
                                          model_device(models[0])))  # fmt: skip
    plan = _Plan(graph, matches, len(models), weights, reference)
    limits = {"max_batches": max_batches, "max_samples": max_samples, "progress": progress}
    sources, (measured,) = _measure(models, [model], plan, loader, device, limits)
    return VarianceTable(plan.rows(sources, measured, *labels))


def diagnose(
    models: Sequence[nn.Module] | Merger,
    loader: Iterable,
    method: str = "permute",
    normalizations: Sequence[str | None] = DEFAULT_NORMALIZATIONS,
    *,
    start_at: int | str | None = None,
    stop_at: int | str | None = None,
    output: str = "average",
    weights: float | Sequence[float] | None = None,
    reference: str = "std",
    example_input: Tensor | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    **hparams: object,
) -> VarianceTable:
    """Merge once with ``method``, normalize it each way, and measure every variant.

    ``models`` are the sources, or a ``Merger`` (its statistics are reused; collected on
    ``loader`` when it holds none). The matching runs once; each normalization ("repair",
    "rescale", "reset", None for none) is one fold and its correction; then one pass over
    ``loader`` (re-iterable, fixed order) measures the sources and every variant. Rows
    carry ``method`` and ``normalize`` ("none" for None). ``start_at``, ``stop_at``,
    ``output``, ``weights`` and ``hparams`` as in ``Merger.merge``; ``reference`` as in
    ``variance_ratios``. ``max_samples`` / ``max_batches`` limit the statistics and the
    measurement, not the normalizations (they correct on the whole loader).

    Example:
        >>> table = gm.diagnostics.diagnose([a, b], data.train, "permute", [None, "repair"])
        >>> table.ratios(None)[-1], table.ratios("repair")[-1]
    """
    normalizations = _checked_normalizations(normalizations)
    _check_reference(reference)
    check_loader(loader)
    if iter(loader) is loader:
        raise ValueError(
            "diagnose passes over the data several times (statistics, normalization, "
            "measurement): give a DataLoader or a list of batches, not a one-shot iterator"
        )
    entry = matching_functions.entry(method)
    entry.check_hyperparameters(hparams)
    merger = _merger(models, loader, example_input, progress, device)
    merger.scope(start_at, stop_at)
    if entry.needs_statistics and merger.statistics is None:
        merger.collect(loader, max_batches=max_batches, max_samples=max_samples)
    base = merger.merge(method, start_at=start_at, stop_at=stop_at, output=output,
                        weights=weights, **hparams)  # fmt: skip
    results = [
        base if normalize is None else merger.reweight(base, base.weights, normalize, loader)
        for normalize in normalizations
    ]
    plan = _Plan(merger.graph, base.matches, len(merger.models), base.weights, reference)
    limits = {"max_batches": max_batches, "max_samples": max_samples, "progress": progress}
    merged = [result.model for result in results]
    target = model_device(merged[0]) if device is None else torch.device(device)
    sources, measured = _measure(merger.models, merged, plan, loader, target, limits)
    rows = [
        row
        for normalize, found in zip(normalizations, measured, strict=True)
        for row in plan.rows(sources, found, method, normalize or "none")
    ]
    return VarianceTable(rows)


class _Plan:
    """The points of a merge, the merged width of each, and how the sources combine."""

    def __init__(
        self,
        graph: ModelGraph,
        matches: Mapping[str, Match] | None,
        count: int,
        weights: float | Sequence[float] | Tensor | None,
        reference: str,
    ) -> None:
        _check_reference(reference)
        self.count, self.reference, self.graph = count, reference, graph
        if isinstance(weights, Tensor):
            weights = weights.tolist()
        weight = None if weights is None else model_weights(weights, count)
        self.merges: dict[str, Tensor] = normalization.merge_matrices(graph, matches, count, weight)
        names = list(self.merges)
        self.points = diagnostic_points(graph, names)
        if not self.points:
            raise ValueError(
                "no point to measure: the merged spaces have no layer output or residual sum "
                "the tracer can read (a hand-built graph without layers?)"
            )
        self.source_points = [
            ReadPoint(p.node, p.node, graph.space(p.space).width,
                      covariance=reference == "std" and self._mixes(p.space))
            for p in self.points
        ]  # fmt: skip
        self.merged_points = [
            ReadPoint(p.node, p.node, self.merges[p.space].shape[0]) for p in self.points
        ]

    def _mixes(self, space: str) -> bool:
        """Whether a merged unit combines several units of one model (needs covariance)."""
        merge = self.merges[space]
        blocks = merge.reshape(merge.shape[0], self.count, -1)
        return bool(((blocks != 0).sum(dim=2) > 1).any())

    def source_moments(self, space: str, found: Sequence[ChannelMoments]) -> tuple[Tensor, Tensor]:
        """Per merged unit: the source variance and the source mean square E[x^2]."""
        merge = self.merges[space]
        variances = torch.cat([m.variance.cpu().clamp_min(0) for m in found])
        means = torch.cat([m.mean.cpu() for m in found])
        if self.reference == "variance":
            magnitude = merge.abs()
            weights = magnitude / magnitude.sum(1, keepdim=True).clamp_min(EPS)
            return weights @ variances, weights @ (variances + means.square())
        width = merge.shape[1] // self.count
        std = torch.zeros(merge.shape[0], dtype=torch.float64)
        for index, moments in enumerate(found):
            block = merge[:, index * width : (index + 1) * width]
            if moments.comoment is None:
                std += block.abs() @ moments.variance.cpu().clamp_min(0).sqrt()
            else:
                own = ((block @ moments.covariance.cpu()) * block).sum(dim=1)
                std += own.clamp_min(0).sqrt()
        variance = std.square()
        return variance, variance + (merge @ means).square()

    def rows(
        self,
        sources: list[dict[str, ChannelMoments]],
        merged: dict[str, ChannelMoments],
        method: str | None,
        normalize: str,
    ) -> list[dict[str, Any]]:
        rows = []
        for depth, point in enumerate(self.points):
            source_var, source_square = self.source_moments(
                point.space, [moments[point.node] for moments in sources]
            )
            mine = merged[point.node]
            merged_var = mine.variance.cpu().clamp_min(0)
            merged_square = merged_var + mine.mean.cpu().square()
            mean_source = source_var.mean().item()
            mean_merged = merged_var.mean().item()
            merged_rms = merged_square.mean().sqrt().item()
            source_rms = source_square.mean().sqrt().item()
            dead = merged_var <= DEAD_RELATIVE * mean_source + EPS
            rows.append({
                "method": method, "normalize": normalize, "depth": depth, "point": point.node,
                "space": point.space, "kind": point.kind, "repairable": point.repairable,
                "units": merged_var.numel(),
                "merged_var": mean_merged, "source_var": mean_source,
                "var_ratio": (mean_merged + EPS) / (mean_source + EPS),
                "merged_rms": merged_rms, "source_rms": source_rms,
                "rms_ratio": (merged_rms + EPS) / (source_rms + EPS),
                "dead_units": int(dead.sum().item()),
            })  # fmt: skip
        return rows


def _measure(
    sources: Sequence[nn.Module],
    merged: Sequence[nn.Module],
    plan: _Plan,
    loader: Iterable,
    device: torch.device,
    limits: dict[str, Any],
) -> tuple[list[dict[str, ChannelMoments]], list[dict[str, ChannelMoments]]]:
    """One pass over ``loader``: the moments at the plan's points of every source and every
    merged model (eval mode, no gradients, float64)."""
    models = on_device([*sources, *merged], device)
    plans = [plan.source_points] * len(sources) + [plan.merged_points] * len(merged)
    readers = [
        FeatureReader(model, plan.graph, points, reuse=True)
        for model, points in zip(models, plans, strict=True)
    ]
    moments = [
        {p.name: ChannelMoments.empty(p.width, device, p.covariance) for p in points}
        for points in plans
    ]
    data = DataPass(loader, device, max_batches=limits["max_batches"],
                    max_samples=limits["max_samples"], progress=limits["progress"],
                    description="variance ratios")  # fmt: skip
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(evaluating(model))
        for inputs in data:
            for reader, found in zip(readers, moments, strict=True):
                for name, rows in reader(inputs).items():
                    found[name].update(rows)
    data.check_samples("variance ratios need data")
    for index, found in enumerate(moments):
        for name, moment in found.items():
            if not moment.finite:
                which = f"source model {index}" if index < len(sources) else "the merged model"
                raise FloatingPointError(
                    f"non-finite features (NaN or Inf) at {name!r} of {which}: check the "
                    "model's weights and the data"
                )
    return moments[: len(sources)], moments[len(sources) :]


def _unpacked(
    merged: MergeResult | nn.Module,
    graph: ModelGraph | None,
    matches: Mapping[str, Match] | None,
    weights: float | Sequence[float] | Tensor | None,
) -> tuple[nn.Module, ModelGraph | None, Mapping[str, Match] | None, Any, tuple[Any, str]]:
    """(model, graph, matches, weights, (method, normalize)) of a MergeResult or a model."""
    if isinstance(merged, MergeResult):
        if merged.model is None or merged.graph is None:
            raise ValueError("the MergeResult holds no model or graph: pass one from Merger.merge")
        weights = merged.weights if weights is None else weights
        labels = (merged.method, merged.normalize or "none")
        return merged.model, merged.graph, merged.matches, weights, labels
    if not isinstance(merged, nn.Module):
        raise TypeError(
            f"merged must be a MergeResult (from gm.Merger.merge) or an nn.Module, got a "
            f"{type(merged).__name__}"
        )
    return merged, graph, matches, weights, (None, "none")


def _check_reference(reference: str) -> None:
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")


def _checked_sources(models: Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        raise TypeError("models must be a list of the source nn.Modules, got one nn.Module")
    models = list(models)
    if not models:
        raise ValueError("give the source models the merged model was made from")
    for index, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"source model {index} is a {type(model).__name__}, not an nn.Module")
    return models


def _checked_normalizations(normalizations: Sequence[str | None]) -> list[str | None]:
    if isinstance(normalizations, str) or normalizations is None:
        raise ValueError(
            f"normalizations must be a list such as [None, 'repair'], got {normalizations!r}"
        )
    chosen = list(normalizations)
    if not chosen:
        raise ValueError("normalizations must name at least one (None for none)")
    for name in chosen:
        normalization.check_name(name)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"normalizations name one twice: {chosen}")
    return chosen


def _merger(
    models: Sequence[nn.Module] | Merger,
    loader: Iterable,
    example_input: Tensor | None,
    progress: bool,
    device: torch.device | str | None,
) -> Merger:
    if isinstance(models, Merger):
        return models
    check_models(_checked_sources(models), same_device=device is None)
    example = _first_inputs(loader) if example_input is None else example_input
    return Merger(models, example_input=example, progress=progress, device=device)


def _first_inputs(loader: Iterable) -> Any:
    first = next(iter(itertools.islice(loader, 1)), None)
    if first is None:
        raise ValueError("the loader yielded no batches: variance ratios need data")
    return batch_inputs(first)
