"""torch.distributed: 2 gloo processes on loopback give the single-process statistics and merge."""

import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

import graphmerge as gm
from graphmerge.cli import main
from graphmerge.distributed import ShardSampler, local_samples
from graphmerge.statistics import collect_statistics

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RELATIVE = 1e-6


def torchrun(arguments: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*TORCHRUN, *arguments], capture_output=True, text=True, cwd=cwd,
                          env=environment, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_relative(found: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    error = (found.double() - expected.double()).abs().max() / scale
    assert error <= RELATIVE, f"{what}: relative error {error:.2e}"


def assert_same_statistics(found: dict, expected: dict) -> None:
    assert set(found) == set(expected)
    for name, (count, total, outer) in expected.items():
        assert found[name][0] == count, name
        assert_relative(found[name][1], total, f"{name} total")
        assert_relative(found[name][2], outer, f"{name} outer")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 worker processes saved."""
    out = tmp_path_factory.mktemp("distributed")
    torchrun([str(Path(worker.__file__)), str(out)])
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.fixture(scope="module")
def single():
    """The same work in this one process, on the whole data in order."""
    loader = torch.utils.data.DataLoader(worker.dataset(), batch_size=worker.BATCH)
    a, b = worker.models("none")
    merger = gm.Merger([a, b], example_input=next(iter(loader))[0], progress=False)
    merger.collect(loader)
    found = {"statistics": worker.plain(merger.statistics)}
    limited = collect_statistics(
        [a, b], merger.graph, loader, max_samples=worker.LIMITED, progress=False
    )
    found["limited"] = worker.plain(limited)
    found["merges"] = worker.merges(merger, loader)
    return found


def test_shard_sampler_reads_every_sample_once():
    shards = [list(ShardSampler(10, shard, 3)) for shard in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(ShardSampler(10, shard, 3)) for shard in range(3)] == [4, 3, 3]
    assert list(ShardSampler(5)) == [0, 1, 2, 3, 4]  # no process group: everything
    with pytest.raises(ValueError, match=r"shard 3 is not in 0\.\.2"):
        ShardSampler(10, 3, 3)


def test_without_a_process_group_nothing_changes():
    assert not gm.distributed.active()
    assert (gm.distributed.rank(), gm.distributed.world_size()) == (0, 1)
    assert local_samples(301) == 301
    assert gm.distributed.total(7) == 7


def test_statistics_equal_the_single_process_ones(ranks, single):
    for found in ranks:
        assert_same_statistics(found["statistics"], single["statistics"])
        assert_same_statistics(found["limited"], single["limited"])
    # The ranks hold bit-identical sums (one all_reduce), so they match identically.
    for name, (_, total, outer) in ranks[0]["statistics"].items():
        assert torch.equal(total, ranks[1]["statistics"][name][1])
        assert torch.equal(outer, ranks[1]["statistics"][name][2])


def test_a_process_without_data_adds_nothing(ranks, single):
    for found in ranks:
        assert_same_statistics(found["uneven"], single["statistics"])


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_merged_models_are_identical(ranks, single, method):
    expected_matrices, expected_state = single["merges"][method]
    states = []
    for found in ranks:
        matrices, state = found["merges"][method]
        for name, matrix in expected_matrices.items():
            assert torch.equal(matrices[name], matrix), f"{method}: match of {name} differs"
        for key, value in expected_state.items():
            assert_relative(state[key], value, f"{method} + repair: {key}")
        states.append(state)
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f"ranks differ at {key}"


def test_reset_combines_the_processes_batches(ranks):
    """RESET averages over batches: 2 processes equal one process reading both shards."""
    a, b = worker.models("bn")
    batches = worker.shard_batches(0, 2) + worker.shard_batches(1, 2)
    loader = torch.utils.data.DataLoader(worker.dataset(), batch_size=worker.BATCH)
    merger = gm.Merger([a, b], example_input=batches[0], progress=False)
    merger.collect(loader)
    expected = merger.merge("permute", normalize="reset", loader=batches).model.state_dict()
    for found in ranks:
        for key, value in expected.items():
            if key.endswith("num_batches_tracked"):
                assert int(found["reset"][key]) == int(value) == len(batches), key
            else:
                assert_relative(found["reset"][key], value, f"reset: {key}")
    assert all(torch.equal(v, ranks[1]["reset"][k]) for k, v in ranks[0]["reset"].items())


def test_cli_merge_under_torchrun_writes_the_single_process_model(tmp_path):
    """`graphmerge merge` unchanged under torchrun: rank 0 writes the same merged model."""
    train = ["train", "--model", "mlp", "--hidden", "32,32", "--epochs", "2", "--quiet"]
    for seed in (0, 1):
        assert main([*train, "--seed", str(seed), "--out", str(tmp_path / f"{seed}.pt")]) == 0
    merge = ["merge", "0.pt", "1.pt", "--method", "zip", "--normalize", "repair", "--quiet"]
    assert main([*merge[:1], *(str(tmp_path / p) for p in merge[1:3]), *merge[3:],
                 "--out", str(tmp_path / "one.pt")]) == 0  # fmt: skip
    done = torchrun(["-m", "graphmerge", *merge, "--out", "two.pt"], cwd=tmp_path)
    assert "on 2 processes" in done.stdout
    assert done.stdout.count("wrote two.pt") == 1  # rank 0 alone reports and writes
    one = gm.load_checkpoint(tmp_path / "one.pt")
    two = gm.load_checkpoint(tmp_path / "two.pt")
    for key, value in one.model.state_dict().items():
        assert_relative(two.model.state_dict()[key], value, key)
    assert two.metadata["metrics"]["accuracy"] == pytest.approx(
        one.metadata["metrics"]["accuracy"], abs=1e-9
    )


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["matchers"]) == 2
    assert "only `graphmerge merge` runs under torchrun" in capsys.readouterr().err
