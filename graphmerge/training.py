"""Deterministic training: the same model, data and seed give bit-identical weights.

``train`` runs a ``TrainingRun`` to the end; a ``TrainingRun`` can also be advanced step
by step (e.g. to measure the models as they train), with its own random stream, so that
runs interleaved with each other and with other work train the same weights as alone.

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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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
    left as it was. Returns test ``accuracy``/``loss`` when ``test_loader`` is given.
    """
    run = TrainingRun(model, train_loader, epochs=epochs, optimizer=optimizer, lr=lr,
                      momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                      warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, seed=seed,
                      device=device, progress=progress)  # fmt: skip
    trained = run.finish()
    metrics = {"train_loss": run.history[-1]["train_loss"]}
    if test_loader is not None:
        metrics.update(evaluate(trained, test_loader, run.device))
    return TrainResult(trained, metrics, run.history)


class TrainingRun:
    """One run of ``train``'s loop on a copy of ``model``, advanced step by step.

    Takes ``train``'s arguments (and checks them the same way). One step is one batch of
    ``train_loader``; ``total_steps = epochs * len(train_loader)``. ``advance(s)`` trains
    until ``s`` steps are done, ``finish()`` trains to the end and returns the model (in
    eval mode); ``model`` is the copy being trained, ``history`` the finished epochs.
    The run draws from its own random stream (seeded with ``seed``; torch's global RNG is
    left alone), so its weights equal ``train``'s bit for bit however it is interleaved.

    Example:
        >>> run = gm.training.TrainingRun(model, data.train, epochs=4, seed=0, progress=False)
        >>> run.advance(run.total_steps // 2)
        >>> halfway = copy.deepcopy(run.model)
        >>> trained = run.finish()  # the weights of gm.training.train(model, ..., seed=0)
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
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
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a whole number >= 1, got {epochs!r}")
        lr = DEFAULT_LR[optimizer] if lr is None else lr
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.steps_per_epoch: int = len(train_loader)  # type: ignore[arg-type]
        if self.steps_per_epoch == 0:
            raise ValueError("the training loader yields no batches: nothing to train on")
        self.epochs, self.total_steps = epochs, epochs * self.steps_per_epoch
        self.loader, self.label_smoothing, self.progress = train_loader, label_smoothing, progress
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).to(self.device)
        self.random = RandomStream(seed, self.device)
        self.optimizer = _make_optimizer(self.model, optimizer, lr, momentum, weight_decay)
        warmup_steps = round(warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(schedule, warmup_steps, self.total_steps)
        )
        self.smallest = smallest_training_batch(self.model)
        self.history: list[dict[str, float]] = []
        self.steps_done = 0  # batches consumed; an epoch's end rounds it up to its boundary
        self.model.train()
        self._steps = self._loop()

    @property
    def finished(self) -> bool:
        """Whether every epoch has been trained (the model is then in eval mode)."""
        return len(self.history) == self.epochs

    def advance(self, until_step: int) -> None:
        """Train until ``until_step`` steps (batches, over all epochs) are done; nothing if
        they already are."""
        if isinstance(until_step, bool) or not isinstance(until_step, int):
            raise TypeError(f"until_step must be a whole number of steps, got {until_step!r}")
        if not 0 <= until_step <= self.total_steps:
            raise ValueError(
                f"until_step must be in [0, {self.total_steps}] (epochs x batches per epoch), "
                f"got {until_step}"
            )
        with self.random.active():
            while self.steps_done < until_step:
                if next(self._steps, _ENDED) is _ENDED:
                    raise RuntimeError(
                        "this training run stopped with an error: start a new TrainingRun"
                    )

    def finish(self) -> nn.Module:
        """Train the remaining steps and return the trained model, in eval mode."""
        with self.random.active():
            for _ in self._steps:
                pass
        if not self.finished:
            raise RuntimeError("this training run stopped with an error: start a new TrainingRun")
        return self.model

    def _loop(self) -> Iterator[None]:
        """``train``'s loop, pausing after every batch (run only inside ``self.random``)."""
        bar = tqdm(range(1, self.epochs + 1), desc="train", unit="epoch", disable=not self.progress)
        for epoch in bar:
            loss_sum, correct, count = 0.0, 0, 0
            for step, (inputs, targets) in enumerate(labelled_batches(self.loader), start=1):
                self.steps_done += 1
                if sample_count(inputs) >= self.smallest:
                    targets = targets.to(self.device)
                    loss, outputs = self._step(moved_to(inputs, self.device), targets, epoch, step)
                    loss_sum += loss.item() * targets.numel()
                    correct += (outputs.argmax(dim=1) == targets).sum().item()
                    count += targets.numel()
                yield
            if count == 0:
                hint = (
                    " (batches of at least 2 samples for BatchNorm1d)" if self.smallest > 1 else ""
                )
                raise ValueError(f"the training loader yielded no samples to train on{hint}")
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / count,
                "train_accuracy": correct / count,
            }
            self.history.append(record)
            self.steps_done = max(self.steps_done, epoch * self.steps_per_epoch)
            bar.set_postfix(
                loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}"
            )
        self.model.eval()

    def _step(self, inputs: Any, targets: Tensor, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        outputs = logits_of(run_model(self.model, inputs))
        check_labels(outputs, targets)
        loss = F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training diverged: the loss became {loss.item()} at epoch {epoch}, step "
                f"{step}; lower the learning rate (now {self.scheduler.get_last_lr()[0]:.3g})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss, outputs


_ENDED = object()


class RandomStream:
    """A stream of torch's global RNG of its own (CPU, and the CUDA device's when ``device``
    is one), swapped in while ``active()``: work done in it draws the same numbers however
    it is interleaved with other work, and the caller's RNG state is restored afterwards.

    Example:
        >>> stream = gm.training.RandomStream(seed=0)
        >>> with stream.active():
        ...     first = torch.rand(1)  # what torch.manual_seed(0); torch.rand(1) draws
        >>> with stream.active():
        ...     second = torch.rand(1)  # the stream goes on where it stopped
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self._devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self._devices):
            torch.manual_seed(seed)
            self._states = self._current()

    def _current(self) -> tuple[Tensor, Tensor | None]:
        cuda = torch.cuda.get_rng_state(self._devices[0]) if self._devices else None
        return torch.get_rng_state(), cuda

    @contextmanager
    def active(self) -> Iterator[None]:
        """Draw from this stream inside the block."""
        with torch.random.fork_rng(devices=self._devices):
            cpu, cuda = self._states
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self._devices[0])
            try:
                yield
            finally:
                self._states = self._current()


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


def _lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then a cosine to zero (or constant), per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


__all__ = [
    "RandomStream",
    "TrainResult",
    "TrainingRun",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
