"""Deterministic training: the same model, data and seed give bit-identical weights.

Example:
    >>> import graphmerge as gm
    >>> data = gm.data.digits()
    >>> model = gm.models.build("mlp", hidden=(64, 64), seed=0)
    >>> result = gm.training.train(model, data.train, data.test, epochs=5, seed=0, progress=False)
    >>> result.metrics["accuracy"] > 0.9
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graphmerge.batches import labelled_batches
from graphmerge.checkpoints import load_checkpoint, save_checkpoint
from graphmerge.evaluation import check_labels, evaluate
from graphmerge.runtime import (
    logits_of,
    moved_to,
    run_model,
    sample_count,
    smallest_training_batch,
)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}


@dataclass
class TrainResult:
    """The trained model (a new object), its test metrics, and per-epoch training history."""

    model: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def train(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None = None,
    *,
    epochs: int = 10,
    optimizer: str = "sgd",
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train a copy of ``model`` with cross-entropy; ``model`` itself is not modified.

    SGD (Nesterov momentum) or Adam; the learning rate warms up linearly for
    ``warmup_epochs`` and then follows a cosine to zero (``schedule="cosine"``) or
    stays constant. The seed fixes data order and dropout; torch's global RNG is
    restored afterwards. Returns test ``accuracy``/``loss`` when ``test_loader`` is given.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a whole number >= 1, got {epochs!r}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches: nothing to train on")
    device = torch.device(device)
    trained = copy.deepcopy(model).to(device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        history = _fit(
            trained,
            train_loader,
            epochs,
            steps_per_epoch,
            device,
            progress,
            _make_optimizer(trained, optimizer, lr, momentum, weight_decay),
            schedule,
            warmup_epochs,
            label_smoothing,
        )
    metrics = {"train_loss": history[-1]["train_loss"]}
    if test_loader is not None:
        metrics.update(evaluate(trained, test_loader, device))
    return TrainResult(trained, metrics, history)


def _make_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=momentum,
            nesterov=momentum > 0,
            weight_decay=weight_decay,
        )
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def _fit(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    steps_per_epoch: int,
    device: torch.device,
    progress: bool,
    optimizer: torch.optim.Optimizer,
    schedule: str,
    warmup_epochs: float,
    label_smoothing: float,
) -> list[dict[str, float]]:
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    history = []
    smallest = smallest_training_batch(model)
    model.train()
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        loss_sum, correct, count = 0.0, 0, 0
        for step, (inputs, targets) in enumerate(labelled_batches(loader), start=1):
            if sample_count(inputs) < smallest:
                continue
            inputs, targets = moved_to(inputs, device), targets.to(device)
            outputs = logits_of(run_model(model, inputs))
            check_labels(outputs, targets)
            loss = F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged: the loss became {loss.item()} at epoch {epoch}, step "
                    f"{step}; lower the learning rate (now {scheduler.get_last_lr()[0]:.3g})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * targets.numel()
            correct += (outputs.argmax(dim=1) == targets).sum().item()
            count += targets.numel()
        if count == 0:
            raise ValueError(
                "the training loader yielded no samples to train on"
                + (" (batches of at least 2 samples for BatchNorm1d)" if smallest > 1 else "")
            )
        record = {"epoch": epoch, "train_loss": loss_sum / count, "train_accuracy": correct / count}
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
    model.eval()
    return history


__all__ = ["TrainResult", "load_checkpoint", "save_checkpoint", "train"]
