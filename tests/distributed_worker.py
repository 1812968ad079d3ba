"""One process of the torch.distributed tests (run by torchrun from test_distributed.py).

Every rank reads its ShardSampler shard of the digits training split, collects the
statistics, merges, and saves what it got to OUT/rank{RANK}.pt for the test to compare
with a single process. The models and data are built here exactly as the test builds them.
"""

import sys
from pathlib import Path

import torch

import graphmerge as gm
from graphmerge.statistics import collect_statistics

BATCH = 64
LIMITED = 301  # odd: the two ranks take 151 and 150 samples


def models(norm: str) -> list[torch.nn.Module]:
    """Two random MLPs (seeds 0, 1) with fitted BatchNorm statistics where there is BatchNorm."""
    built = [gm.models.build("mlp", hidden=(32, 16), norm=norm, seed=seed) for seed in (0, 1)]
    data = gm.data.digits(layout="flat").train.dataset
    inputs = torch.stack([data[i][0] for i in range(256)])
    return [gm.normalization.reset_bn(model, [inputs]) for model in built]


def dataset():
    return gm.data.digits(layout="flat").train.dataset


def shard_batches(rank: int, world: int) -> list[torch.Tensor]:
    """The input batches rank ``rank`` of ``world`` reads."""
    data = dataset()
    loader = torch.utils.data.DataLoader(
        data, batch_size=BATCH, sampler=gm.distributed.ShardSampler(len(data), rank, world)
    )
    return [inputs for inputs, _ in loader]


def plain(stats: dict) -> dict:
    return {name: (s.count, s.total, s.outer) for name, s in stats.items()}


def merges(merger: gm.Merger, loader) -> dict:
    """Merge matrices and merged state of permute and zip, each with REPAIR."""
    found = {}
    for method in ("permute", "zip"):
        result = merger.merge(method, normalize="repair", loader=loader)
        matrices = {name: match.merge for name, match in result.matches.items()}
        found[method] = (matrices, result.model.state_dict())
    return found


def run(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.set_num_threads(1)
    loader = gm.distributed.shard_loader(dataset(), BATCH)
    a, b = models("none")
    merger = gm.Merger([a, b], example_input=next(iter(loader))[0], progress=False)
    merger.collect(loader)
    found = {"statistics": plain(merger.statistics)}
    found["limited"] = plain(
        collect_statistics([a, b], merger.graph, loader, max_samples=LIMITED, progress=False)
    )
    everything = torch.utils.data.DataLoader(dataset(), batch_size=BATCH)
    found["uneven"] = plain(  # rank 1 reads nothing: the sums are rank 0's
        collect_statistics([a, b], merger.graph, everything if rank == 0 else [], progress=False)
    )
    found["merges"] = merges(merger, loader)
    norm_a, norm_b = models("bn")
    norm_merger = gm.Merger([norm_a, norm_b], example_input=next(iter(loader))[0], progress=False)
    norm_merger.collect(loader)
    reset = norm_merger.merge("permute", normalize="reset", loader=loader)
    found["reset"] = reset.model.state_dict()
    torch.save(found, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
