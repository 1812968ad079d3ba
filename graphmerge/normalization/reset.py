"""RESET: recompute BatchNorm running statistics of a (merged) model on data."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from graphmerge import distributed
from graphmerge.batches import check_loader
from graphmerge.normalization.registry import NormalizationRequest, Renormalized, register
from graphmerge.runtime import copy_model, model_device, run_model, smallest_training_batch
from graphmerge.statistics import DataPass


def reset_bn(
    model: nn.Module,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running mean/var are recomputed on ``loader``.

    Cumulative average over the loader's batches (momentum=None), one pass without
    gradients; only the BatchNorm layers run in train mode, so dropout and everything
    else are unaffected. The copy keeps the model's train/eval mode and lives on
    ``device`` (default: the model's). A model without BatchNorm comes back unchanged.
    Under torch.distributed the processes' averages are combined, weighted by their
    batch counts, so every process gets the same statistics. With a BatchNorm1d, batches
    of one sample (a loader's last batch, say) are left out: in train mode it cannot
    normalize a single sample.

    Example:
        >>> merged = gm.normalization.reset_bn(merged, data.train)
    """
    check_loader(loader)
    reset = copy_model(model)
    if device is not None:
        reset = reset.to(device)
    norms = [m for m in reset.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return reset
    modes = {module: module.training for module in reset.modules()}
    momenta = [norm.momentum for norm in norms]
    device = model_device(reset)
    reset.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    smallest = smallest_training_batch(reset)
    data = DataPass(loader, device, max_batches=max_batches, smallest=smallest)
    try:
        with torch.no_grad():
            for inputs in data:
                run_model(reset, inputs)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    data.check_samples(
        "reset_bn needs data"
        + (" (batches of at least 2 samples for BatchNorm1d)" if smallest > 1 else "")
    )
    if distributed.active():
        _combine_processes(norms)
    return reset


@register("reset")
def _reset(request: NormalizationRequest) -> Renormalized:
    """RESET-BN: BatchNorm running statistics recomputed on the data."""
    return Renormalized(reset_bn(request.model, request.loader), "reset")


def _combine_processes(norms: list[nn.Module]) -> None:
    """Average the processes' running statistics, each weighted by its number of batches."""
    for norm in norms:
        if not norm.track_running_stats:
            continue
        batches = norm.num_batches_tracked.to(norm.running_mean.dtype)
        sums = [norm.running_mean * batches, norm.running_var * batches, batches.clone()]
        distributed.all_reduce_sum(sums)
        norm.running_mean.copy_(sums[0] / sums[2].clamp_min(1))
        norm.running_var.copy_(sums[1] / sums[2].clamp_min(1))
        norm.num_batches_tracked.copy_(sums[2].round().long())
