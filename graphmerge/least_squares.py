"""PLeaS's least-squares step: refit the merged layers to the merge of the sources' outputs.

Layer by layer in the order the merged model calls them, each Linear / conv layer L is
refitted so that on the merged model's own inputs at L (upstream layers already
refitted) its outputs match the target T = fold of the source models' outputs of L
through the merge matrices of the spaces L writes (the same fold that merges L's bias:
T = sum_i M_i Y_i). Linear, Conv1d and Conv2d (one group, zero padding) are solved in
closed form (ridge regression on the unfolded inputs, normal equations accumulated in
float64 over the data); other convolutions take a bounded number of Adam steps. A fit is
kept only where it lowers the layer's mean squared error; the sources are never touched.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from graphmerge.batches import input_batches
from graphmerge.fold import SpaceMaps, fold_tensors
from graphmerge.graphs import ModelGraph
from graphmerge.runtime import (
    Inputs,
    call_model,
    evaluating,
    model_device,
    moved_to,
    sample_count,
)

# Above this many unfolded input features the normal equations (features^2 float64) would
# not fit comfortably in memory: such layers take gradient steps instead.
MAX_CLOSED_FORM_FEATURES = 16384
# The sources' targets of every layer are kept between the layers' passes up to this size.
CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class LayerFit:
    """One layer's fit: its mean squared error against the target before and after."""

    layer: str
    solver: str  # "ridge" or "gradient"
    loss_before: float
    loss_after: float
    kept: bool  # False where the fit did not lower the error (the folded weights stay)


@dataclass
class LeastSquaresReport:
    """Every fitted layer, in fitting order, and the samples each fit read."""

    layers: list[LayerFit]
    samples: int

    def format(self) -> str:
        lines = [f"{'layer':<28} {'solver':<8} {'mse before':>12} {'mse after':>12}"]
        for fit in self.layers:
            lines.append(
                f"{fit.layer:<28} {fit.solver:<8} {fit.loss_before:>12.4g} {fit.loss_after:>12.4g}"
            )
        return "\n".join(lines)


def fit_layers(
    merged: nn.Module,
    models: Sequence[nn.Module],
    graph: ModelGraph,
    maps: Mapping[str, SpaceMaps],
    loader: Iterable,
    *,
    weights: Tensor | None = None,
    ridge: float = 1e-4,
    steps: int = 50,
    lr: float = 1e-3,
    max_samples: int | None = 2048,
    cache_bytes: int = CACHE_BYTES,
    progress: bool = True,
) -> tuple[nn.Module, LeastSquaresReport]:
    """A copy of ``merged`` whose Linear / conv layers are refitted to the sources' merged
    outputs, one layer at a time in call order (``maps``: the fold's maps per space).

    The first ``max_samples`` of ``loader`` are read once and serve every layer's fit (so
    a shuffling loader gives every layer the same samples); the sources' targets are
    computed in one pass and kept while they take at most ``cache_bytes``, else
    recomputed for each layer.

    Example:
        >>> refitted, report = fit_layers(result.model, models, graph, maps, loader)
        >>> print(report.format())
    """
    model = copy.deepcopy(merged)
    device = model_device(model)
    found = input_batches(loader, None, max_samples, False, "least squares")
    batches = [moved_to(batch, device) for batch in found]
    if not batches:
        raise ValueError("pleas's least-squares step needs data: the loader yielded none")
    layers = _call_order(model, _fittable(model, graph), batches[0])
    targets = _Targets(models, graph, maps, weights, layers, cache_bytes)
    fits = []
    for name in tqdm(layers, desc="least squares", disable=not progress, leave=False):
        fits.append(_fit_layer(model, batches, targets, name, ridge=ridge, steps=steps, lr=lr))
    return model, LeastSquaresReport(fits, sum(sample_count(batch) for batch in batches))


def _fittable(model: nn.Module, graph: ModelGraph) -> list[str]:
    """Linear / conv layers whose weight writes graph spaces and is not shared."""
    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    found = []
    for name, module in model.named_modules():
        kinds = (nn.Linear, nn.modules.conv._ConvNd)
        if not isinstance(module, kinds) or isinstance(module, nn.modules.conv._ConvTransposeNd):
            continue
        key = f"{name}.weight"
        if key in graph.aliases or owners.get(id(module.weight), 0) != 1:
            continue
        if any(run.axis == 0 for _, run in graph.param_axes.get(key, ())):
            found.append(name)
    return found


def _call_order(model: nn.Module, names: Sequence[str], batch: Inputs) -> list[str]:
    """``names`` in the order one forward pass of ``model`` first calls them."""
    order: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _module, _args, name=name: order.append(name) if name not in order else None
        )
        for name in names
    ]
    try:
        with evaluating(model), torch.no_grad():
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _closed_form(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.in_features + 1 <= MAX_CLOSED_FORM_FEATURES
    if not isinstance(module, nn.Conv1d | nn.Conv2d):
        return False
    features = module.weight[0].numel() + 1
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and features <= MAX_CLOSED_FORM_FEATURES
    )


def _fit_layer(
    model: nn.Module,
    batches: Sequence[Inputs],
    targets: _Targets,
    name: str,
    *,
    ridge: float,
    steps: int,
    lr: float,
) -> LayerFit:
    layer = model.get_submodule(name)
    if _closed_form(layer):
        equations = _NormalEquations(layer)
        _stream(model, batches, targets, name, equations.add)
        return equations.solve(name, ridge)
    cache: list[tuple[Tensor, Tensor]] = []
    _stream(model, batches, targets, name, lambda inputs, wanted: cache.append((inputs, wanted)))
    return _gradient_fit(layer, name, cache, steps, lr)


class _Targets:
    """The merge of the sources' outputs of each layer, call by call, for each batch.

    A layer's target is folded like its bias: T = sum_i M_i Y_i over the spaces its
    weight writes. The first request runs the sources with every layer hooked and keeps
    all targets while they fit in ``cache_bytes``; past that, each layer's are recomputed.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        graph: ModelGraph,
        maps: Mapping[str, SpaceMaps],
        weights: Tensor | None,
        layers: Sequence[str],
        cache_bytes: int,
    ) -> None:
        self.models, self.maps, self.weights, self.layers = models, maps, weights, layers
        self.runs = {
            name: [
                (space, run) for space, run in graph.param_axes[f"{name}.weight"] if run.axis == 0
            ]
            for name in layers
        }
        self.cache: dict[tuple[str, int], list[Tensor]] | None = {}
        self.cache_bytes = cache_bytes

    def __call__(self, name: str, index: int, batch: Inputs) -> list[Tensor]:
        if self.cache is not None and (name, index) in self.cache:
            return self.cache.pop((name, index))
        keep = self.cache is not None and name == self.layers[0]
        found = self._compute(self.layers if keep else [name], batch)
        if keep:
            self.cache.update({(layer, index): found[layer] for layer in self.layers[1:]})
            used = sum(t.numel() * t.element_size() for ts in self.cache.values() for t in ts)
            if used > self.cache_bytes:
                self.cache = None
        return found[name]

    def _compute(self, names: Sequence[str], batch: Inputs) -> dict[str, list[Tensor]]:
        seen: dict[str, list[list[Tensor]]] = {name: [[] for _ in self.models] for name in names}
        handles = [
            source.get_submodule(name).register_forward_hook(
                lambda _m, _a, output, name=name, index=index: seen[name][index].append(
                    output.detach()
                )
            )
            for index, source in enumerate(self.models)
            for name in names
        ]
        try:
            with torch.no_grad(), contextlib.ExitStack() as modes:
                for source in self.models:
                    modes.enter_context(evaluating(source))
                    call_model(source, batch)
        finally:
            for handle in handles:
                handle.remove()
        return {
            name: [
                self._merged(name, [outputs[call] for outputs in seen[name]])
                for call in range(len(seen[name][0]))
            ]
            for name in names
        }

    def _merged(self, name: str, outputs: Sequence[Tensor]) -> Tensor:
        axis = outputs[0].dim() - 1 if outputs[0].dim() <= 2 else 1
        runs = [(space, replace(run, axis=axis)) for space, run in self.runs[name]]
        folded = fold_tensors(
            [output.double() for output in outputs], runs, self.maps, self.weights
        )
        return folded.float()


def _stream(
    model: nn.Module,
    batches: Sequence[Inputs],
    targets: _Targets,
    name: str,
    consume: Callable[[Tensor, Tensor], None],
) -> None:
    """One pass: hand ``consume`` the merged layer's inputs and their targets, call by call."""
    inputs_seen: list[Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda _module, args, _output: inputs_seen.append(args[0].detach())
    )
    try:
        with torch.no_grad(), evaluating(model):
            for index, batch in enumerate(batches):
                wanted = targets(name, index, batch)
                call_model(model, batch)
                for merged_input, target in zip(inputs_seen, wanted, strict=True):
                    consume(merged_input, target)
                inputs_seen.clear()
    finally:
        handle.remove()


class _NormalEquations:
    """A += X^T X, B += X^T T, and sum T^2 over the unfolded inputs X of one layer."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.bias = layer.bias is not None
        self.gram: Tensor | None = None
        self.cross: Tensor | None = None
        self.energy = 0.0
        self.rows = 0

    def _features(self, inputs: Tensor) -> Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            rows = inputs.reshape(-1, layer.in_features)
        else:
            rows = _unfolded(layer, inputs)
        rows = rows.double()
        if self.bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def add(self, inputs: Tensor, wanted: Tensor) -> None:
        features, wanted = self._features(inputs), wanted.double()
        if isinstance(self.layer, nn.Linear):
            goal = wanted.reshape(-1, wanted.shape[-1])
        else:
            goal = wanted.reshape(wanted.shape[0], wanted.shape[1], -1).transpose(1, 2)
            goal = goal.reshape(-1, wanted.shape[1])
        gram, cross = features.T @ features, features.T @ goal
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.energy += float((goal**2).sum())
        self.rows += goal.shape[0]

    def _current(self) -> Tensor:
        weight = self.layer.weight.detach().double().reshape(self.layer.weight.shape[0], -1).T
        if self.bias:
            weight = torch.cat([weight, self.layer.bias.detach().double()[None]], dim=0)
        return weight

    def _error(self, weight: Tensor) -> float:
        total = (weight * (self.gram @ weight)).sum() - 2 * (weight * self.cross).sum()
        return max(0.0, float(total) + self.energy) / (self.rows * weight.shape[1])

    def solve(self, name: str, ridge: float) -> LayerFit:
        before = self._error(self._current())
        features = self.gram.shape[0] - int(self.bias)
        scale = float(self.gram.diagonal()[:features].mean()) or 1.0
        regularised = self.gram.clone()
        regularised.diagonal()[:features] += ridge * scale
        solution = torch.linalg.solve(regularised, self.cross)
        after = self._error(solution)
        kept = bool(torch.isfinite(solution).all()) and after < before
        if kept:
            layer = self.layer
            weight = solution[:features].T.reshape(layer.weight.shape)
            with torch.no_grad():
                layer.weight.copy_(weight.to(layer.weight))
                if self.bias:
                    layer.bias.copy_(solution[features].to(layer.bias))
        return LayerFit(name, "ridge", before, after if kept else before, kept)


def _unfolded(layer: nn.Conv1d | nn.Conv2d, inputs: Tensor) -> Tensor:
    """The conv's input patches as rows (positions x in_channels * kernel), ordered as the
    weight's (in_channels, kernel...) flattening."""
    if isinstance(layer, nn.Conv1d):
        inputs = inputs.unsqueeze(2)
        kernel, dilation = (1, *layer.kernel_size), (1, *layer.dilation)
        padding, stride = (0, *layer.padding), (1, *layer.stride)
    else:
        kernel, dilation, padding, stride = (
            layer.kernel_size, layer.dilation, layer.padding, layer.stride,
        )  # fmt: skip
    patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _gradient_fit(
    layer: nn.Module, name: str, cache: Sequence[tuple[Tensor, Tensor]], steps: int, lr: float
) -> LayerFit:
    """``steps`` Adam steps on the mean squared error over the cached batches."""
    original = {key: value.detach().clone() for key, value in layer.named_parameters()}

    def error() -> Tensor:
        total = sum(((layer(inputs).double() - wanted) ** 2).sum() for inputs, wanted in cache)
        return total / sum(wanted.numel() for _, wanted in cache)

    with torch.no_grad():
        before = float(error())
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = error()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = float(error())
        kept = after < before and torch.isfinite(torch.tensor(after))
        if not kept:
            for key, value in layer.named_parameters():
                value.copy_(original[key])
    layer.zero_grad(set_to_none=True)
    return LayerFit(name, "gradient", before, after if kept else before, bool(kept))
