"""``graphmerge diagnose``: the variance-ratio table, its CSV and its plot."""

import csv

import pytest
import torch
from torch.utils.data import DataLoader

import graphmerge as gm
from graphmerge.cli import main

TRAIN = ["train", "--model", "mlp", "--hidden", "32,32", "--epochs", "2", "--quiet"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: small models on a shared 2-core machine run faster without contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for seed in (0, 1):
        path = folder / f"mlp{seed}.pt"
        assert main([*TRAIN, "--seed", str(seed), "--out", str(path)]) == 0
        paths.append(str(path))
    return paths


def test_diagnose_prints_the_table_and_writes_csv_and_plot(checkpoints, tmp_path, capsys):
    table, plot = tmp_path / "ratios.csv", tmp_path / "ratios.png"
    args = ["diagnose", *checkpoints, "--method", "permute", "--normalize", "none", "repair"]
    assert main([*args, "--csv", str(table), "--plot", str(plot), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "var ratio" in printed and "layers_fc2" in printed
    assert "variance ratio at the first / middle / last point:" in printed
    assert f"wrote {table}, {plot}" in printed
    assert plot.read_bytes().startswith(PNG)
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["normalize"], row["point"]) for row in rows] == [
        ("none", "layers_fc1"), ("none", "layers_fc2"),
        ("repair", "layers_fc1"), ("repair", "layers_fc2"),
    ]  # fmt: skip
    assert all(float(row["var_ratio"]) == pytest.approx(1, abs=0.01) for row in rows[2:])
    # the same numbers as the Python API on the same data (the training split, in order)
    models = [gm.load_checkpoint(path).model for path in checkpoints]
    data = gm.data.digits(remap_labels=False)
    loader = DataLoader(data.train.dataset, batch_size=256, shuffle=False)
    expected = gm.diagnose(models, loader, "permute", [None, "repair"])
    for row, want in zip(rows, expected.rows, strict=True):
        assert float(row["var_ratio"]) == pytest.approx(want["var_ratio"], rel=1e-6)
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_diagnose_without_files_and_with_commas(checkpoints, capsys):
    assert main(["diagnose", *checkpoints, "--normalize", "none,rescale", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "rescale" in printed and "wrote" not in printed
    summary = printed.split("variance ratio at the first / middle / last point:")[1]
    assert [line.split()[0] for line in summary.strip().splitlines()] == ["none", "rescale"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--normalize", "bad"], "unknown normalization 'bad'"),
        (["--normalize", "repair", "repair"], "--normalize names one twice"),
        (["--method", "nope"], "unknown matching function 'nope'"),
        (["--csv", "same.out", "--plot", "same.out"], "are the same file"),
        (["--csv", "missing/ratios.csv"], "does not exist"),
        (["--stop-at", "9"], "stop_at=9 is out of range"),
        (["--device", "cuda:9" if torch.cuda.is_available() else "cuda"], "cuda"),
    ],
)
def test_diagnose_errors_name_the_problem(checkpoints, tmp_path, capsys, monkeypatch, extra,
                                          message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(["diagnose", *checkpoints, *extra, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_diagnose_rejects_an_unknown_reference(checkpoints, capsys):
    assert main(["diagnose", *checkpoints, "--reference", "mean"]) == 2
    assert "invalid choice: 'mean'" in capsys.readouterr().err
