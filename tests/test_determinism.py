"""Determinism: the same inputs and seed give bit-identical merged weights, run after run.

Two runs are two processes with different Python hash seeds (dict and set orders of
strings change with it), for every matching function and normalization. Across
thread counts, float32 reductions (BatchNorm batch statistics in RESET, large matrix
products) may round differently: the results then agree to rounding, not bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from determinism_worker import MERGES

WORKER = Path(__file__).with_name("determinism_worker.py")


def run_worker(threads: int, out: Path, hash_seed: int) -> dict[str, str]:
    environment = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    finished = subprocess.run(
        [sys.executable, str(WORKER), str(threads), str(out)],
        capture_output=True, text=True, env=environment, timeout=600, check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_thread(tmp_path_factory) -> tuple[dict[str, str], Path]:
    out = tmp_path_factory.mktemp("determinism") / "one_thread.pt"
    return run_worker(1, out, hash_seed=1), out


def test_two_runs_give_bit_identical_merged_weights(one_thread, tmp_path):
    hashes, _ = one_thread
    assert len(hashes) == len(MERGES)
    again = run_worker(1, tmp_path / "again.pt", hash_seed=2)
    assert again == hashes


def test_other_thread_counts_change_the_merged_weights_only_by_rounding(one_thread, tmp_path):
    _, out = one_thread
    run_worker(2, tmp_path / "two_threads.pt", hash_seed=1)
    single = torch.load(out, weights_only=True)
    double = torch.load(tmp_path / "two_threads.pt", weights_only=True)
    assert list(double) == list(single)
    for label, state in single.items():
        for key, value in state.items():
            other = double[label][key]
            if value.is_floating_point():
                torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-6, msg=f"{label} {key}")
            else:
                assert torch.equal(other, value), f"{label} {key}"
