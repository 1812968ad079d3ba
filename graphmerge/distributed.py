"""Statistics over several processes with torch.distributed (launched with ``torchrun``).

Every pass over data in graphmerge (merge statistics, REPAIR / RESCALE moments,
RESET) sums over samples, so it runs unchanged under an initialised process group:
each rank reads its own shard of the data, the sums are ``all_reduce``d once at the
end of the pass, and every rank holds the same statistics, hence the same matches and
the same merged model. Without a process group (or with one process) nothing changes.

Shard the data with ``ShardSampler`` (each sample read exactly once, unlike
``DistributedSampler``, which pads or drops samples to give every rank the same count)
or give each rank a loader of its own shard. ``max_samples`` counts the samples of all
ranks together; ``max_batches`` limits each rank's loader.

Example (run with ``torchrun --nproc_per_node=2 script.py``):
    >>> torch.distributed.init_process_group("gloo")
    >>> loader = gm.distributed.shard_loader(dataset, batch_size=256)
    >>> merged = gm.merge([model_a, model_b], loader, "permute")   # same model on every rank
    >>> torch.distributed.destroy_process_group()  # before exit (gloo may abort otherwise)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence, Sized

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


def active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints and writes files (rank 0)."""
    return rank() == 0


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over all processes, in place (nothing without a process group)."""
    if not active():
        return
    device = _reduce_device()
    for tensor in tensors:
        if device.type == "cuda" and tensor.device.type != "cuda":
            summed = tensor.to(device)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            tensor.copy_(summed)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def total(value: int) -> int:
    """The sum of an integer over all processes."""
    if not active():
        return value
    summed = torch.tensor([value], dtype=torch.int64)
    all_reduce_sum([summed])
    return int(summed.item())


def local_samples(max_samples: int | None) -> int | None:
    """This rank's share of ``max_samples`` taken over all ranks.

    With ``ShardSampler``'s interleaved shards (rank r reads samples r, r + W, ...),
    the shares are the first ``max_samples`` samples of the data, as in one process.
    """
    if max_samples is None or not active():
        return max_samples
    return max(0, math.ceil((max_samples - rank()) / world_size()))


class ShardSampler(Sampler[int]):
    """Rank r of W reads samples r, r + W, r + 2W, ... in order: every sample exactly once.

    Statistics are summed over ranks once, after the pass, so shards may differ in
    length by one (``DistributedSampler`` pads or drops to equalise them, which would
    count some samples twice or not at all).
    """

    def __init__(self, length: int, shard: int | None = None, shards: int | None = None):
        """``shard`` / ``shards`` default to this process's rank / the world size."""
        self.length = length
        self.shard = rank() if shard is None else shard
        self.shards = world_size() if shards is None else shards
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} is not in 0..{self.shards - 1}")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.shard, self.length, self.shards))

    def __len__(self) -> int:
        return len(range(self.shard, self.length, self.shards))


def shard_loader(dataset: Dataset, batch_size: int, **options: object) -> DataLoader:
    """A fixed-order DataLoader over this rank's ``ShardSampler`` shard of ``dataset``
    (the whole data set without a process group)."""
    if not isinstance(dataset, Sized):
        raise TypeError("shard_loader needs a map-style dataset with a length")
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset)),
                      **options)  # fmt: skip


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Does nothing (returns False) unless ``WORLD_SIZE`` > 1 is set; uses nccl for a
    CUDA ``device`` and gloo otherwise. Returns whether a group was initialised here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: run in one process")
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # nccl reduces on the current device
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def device_for_rank(device: str) -> str:
    """``cuda`` becomes this process's ``cuda:LOCAL_RANK`` under torchrun; others stay."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _reduce_device() -> torch.device:
    """Where small bookkeeping tensors live for the backend (nccl reduces CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
