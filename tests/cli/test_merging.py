"""CLI round trips: train checkpoints, merge, evaluate the merged file; compare; interpolate."""

import csv
import re

import pytest
import torch
from torch.utils.data import DataLoader

import graphmerge as gm
from graphmerge.cli import main

TRAIN = ["train", "--model", "mlp", "--hidden", "32,32", "--epochs", "4", "--quiet"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two all-class MLPs (seeds 0, 1) and two on disjoint halves (0-4, 5-9)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, extra in {
        "a": ["--seed", "0"],
        "b": ["--seed", "1"],
        "low": ["--seed", "0", "--classes", "0-4"],
        "high": ["--seed", "1", "--classes", "5-9"],
    }.items():
        paths[name] = folder / f"{name}.pt"
        assert main([*TRAIN, *extra, "--out", str(paths[name])]) == 0
    return paths


def statistics_loader(classes=None):
    data = gm.data.digits(classes=classes, remap_labels=False)
    return DataLoader(data.train.dataset, batch_size=256, shuffle=False)


def accuracy_printed(text):
    return float(re.search(r"test accuracy ([0-9.]+)%", text).group(1))


def test_merge_writes_the_merged_model_and_evaluate_reads_it_back(checkpoints, tmp_path, capsys):
    out = tmp_path / "merged.pt"
    args = ["merge", str(checkpoints["a"]), str(checkpoints["b"]), "--method", "permute"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    merged = gm.load_checkpoint(out)
    sources = [gm.load_checkpoint(checkpoints[name]).model for name in ("a", "b")]
    expected = gm.merge(sources, statistics_loader(), "permute", progress=False)
    for key, value in expected.state_dict().items():
        assert torch.equal(merged.model.state_dict()[key], value), key
    metrics = gm.evaluation.evaluate(expected, gm.data.digits().test)
    assert accuracy_printed(printed) == pytest.approx(100 * metrics["accuracy"], abs=0.006)
    assert merged.metadata["merge"]["method"] == "permute" and f"wrote {out}" in printed
    assert main(["evaluate", str(out)]) == 0
    assert accuracy_printed(capsys.readouterr().out) == accuracy_printed(printed)


def test_merge_of_disjoint_tasks_gives_joint_logits_and_per_task_accuracy(
    checkpoints, tmp_path, capsys
):
    out = tmp_path / "joint.pt"
    args = ["merge", str(checkpoints["high"]), str(checkpoints["low"]), "--method", "zip"]
    assert main([*args, "--set", "alpha=0.5", "--normalize", "repair", "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    merged = gm.load_checkpoint(out)
    assert merged.model.head.out_features == 10
    # model 0 learned 5-9: its logits come first
    assert merged.metadata["classes"] == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert merged.metadata["tasks"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    sources = [gm.load_checkpoint(checkpoints[name]).model for name in ("high", "low")]
    loader = statistics_loader()
    expected = gm.merge(sources, loader, "zip", output="concat", normalize="repair", alpha=0.5,
                        progress=False)  # fmt: skip
    test = gm.data.Relabelled(gm.data.digits(remap_labels=False).test, merged.metadata["classes"])
    metrics = gm.evaluation.evaluate(expected, test, tasks=merged.metadata["tasks"])
    assert accuracy_printed(printed) == pytest.approx(100 * metrics["accuracy"], abs=0.006)
    assert "per task" in printed
    assert main(["evaluate", str(out)]) == 0
    again = capsys.readouterr().out
    assert accuracy_printed(again) == accuracy_printed(printed)
    tasks = re.search(r"per task ([0-9.]+)%, ([0-9.]+)%", again).groups()
    assert [float(t) for t in tasks] == pytest.approx(
        [100 * a for a in metrics["task_accuracy"]], abs=0.006
    )


def test_plain_state_dicts_need_model(checkpoints, tmp_path, capsys):
    plain = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}_state.pt"
        torch.save(gm.load_checkpoint(checkpoints[name]).model.state_dict(), path)
        plain.append(str(path))
    out = str(tmp_path / "m.pt")
    assert main(["merge", *plain, "--out", out, "--quiet"]) == 2
    assert "plain state_dict" in capsys.readouterr().err
    status = main(["merge", *plain, "--model", "mlp", "--hidden", "32,32", "--out", out,
                   "--quiet"])  # fmt: skip
    assert status == 0
    from_checkpoints = tmp_path / "c.pt"
    main(["merge", str(checkpoints["a"]), str(checkpoints["b"]), "--out", str(from_checkpoints),
          "--quiet"])  # fmt: skip
    first, second = gm.load_checkpoint(out).model, gm.load_checkpoint(from_checkpoints).model
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "foo"], "unknown matching function 'foo'"),
        (["--normalize", "bad"], "unknown normalization 'bad'"),
        (["--set", "alpha"], "--set needs KEY=VALUE"),
        (["--method", "zip", "--set", "gamma=1"], "gamma"),
        (["--stop-at", "9"], "stop_at=9 is out of range"),
        (["--start-at", "nope"], "start_at='nope' is not a mergeable space"),
        (["--method", "preserve_first", "--set", "k=99"], "preserve_first k=99 is out of range"),
        (["--method", "weight_matching", "--set", "seed=1.5"], "seed must be a whole number"),
        (["--device", "cuda:9" if torch.cuda.is_available() else "cuda"], "cuda"),
    ],
)
def test_merge_errors_name_the_problem(checkpoints, tmp_path, capsys, extra, message):
    args = ["merge", str(checkpoints["a"]), str(checkpoints["b"]), *extra]
    assert main([*args, "--out", str(tmp_path / "m.pt"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_merge_refuses_missing_incompatible_and_overwriting(checkpoints, tmp_path, capsys):
    a, b, low = (str(checkpoints[name]) for name in ("a", "b", "low"))
    before = checkpoints["a"].read_bytes()
    assert main(["merge", a, b, "--out", a]) == 2
    assert "is one of the input checkpoints" in capsys.readouterr().err
    assert checkpoints["a"].read_bytes() == before
    assert main(["merge", a, str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["merge", a, low, "--out", str(tmp_path / "m.pt")]) == 2
    assert "num_classes=5" in capsys.readouterr().err
    assert main(["merge", a, "--out", str(tmp_path / "m.pt")]) == 2
    assert "at least 2 checkpoints" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    assert main(["merge", a, str(garbage), "--out", str(tmp_path / "m.pt")]) == 2
    assert "not a readable PyTorch file" in capsys.readouterr().err
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["merge", a, b, "--out", str(folder), "--quiet"]) == 2  # before any work
    assert f"--out {folder} is a folder: give the file to write" in capsys.readouterr().err
    assert main(["evaluate", str(folder)]) == 2
    assert "is a folder, not a checkpoint file" in capsys.readouterr().err


def test_an_interrupted_compare_leaves_no_table_without_its_plot(
    checkpoints, tmp_path, capsys, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gm.plots, "plot_comparison", interrupted)
    out = tmp_path / "results"
    args = ["compare", str(checkpoints["a"]), str(checkpoints["b"]), "--methods", "identity"]
    assert main([*args, "--out", str(out), "--quiet"]) == 130
    assert "graphmerge compare: interrupted" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # neither the CSV nor a temporary file


def test_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        f"{sys.executable} -m graphmerge models | head -1", shell=True, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.stdout.strip() == "mlp" and "Traceback" not in done.stderr


def test_compare_prints_the_grid_and_writes_csv_and_png(checkpoints, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["compare", str(checkpoints["a"]), str(checkpoints["b"]), "--methods",
            "identity,permute", "--normalize", "none,repair", "--stop-at", "1"]  # fmt: skip
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    names = [row["name"] for row in rows]
    assert names[:3] == ["model 0", "model 1", "ensemble"]
    assert names[3:] == [
        "identity", "identity + repair", "identity (stop_at=1)", "identity + repair (stop_at=1)",
        "permute", "permute + repair", "permute (stop_at=1)", "permute + repair (stop_at=1)",
    ]  # fmt: skip
    for row in rows:
        assert f"{100 * float(row['accuracy']):.2f}%" in printed
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")


def test_interpolate_reports_barriers_identity_above_permute(checkpoints, tmp_path, capsys):
    out = tmp_path / "curves"
    args = ["interpolate", str(checkpoints["a"]), str(checkpoints["b"]), "--points", "5"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    barriers = dict(re.findall(r"^  (\w+)\s+([0-9.]+)", printed, flags=re.MULTILINE))
    assert float(barriers["identity"]) > 2 * float(barriers["permute"])
    with open(out / "curves.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["alpha"]) for row in rows[:5]] == [0, 0.25, 0.5, 0.75, 1]
    endpoint = gm.evaluation.evaluate(gm.load_checkpoint(checkpoints["a"]).model,
                                      gm.data.digits().test)  # fmt: skip
    assert float(rows[0]["loss"]) == pytest.approx(endpoint["loss"], rel=1e-5)
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert main(["interpolate", str(checkpoints["low"]), str(checkpoints["high"]), "--out",
                 str(out)]) == 2  # fmt: skip
    assert "interpolate runs between 2 checkpoints" in capsys.readouterr().err


def test_merged_checkpoints_merge_again_and_refuse_conflicting_class_orders(
    checkpoints, tmp_path, capsys
):
    low, high = str(checkpoints["low"]), str(checkpoints["high"])
    first, second, third = (str(tmp_path / name) for name in ("j1.pt", "j2.pt", "j3.pt"))
    assert main(["merge", low, high, "--out", first, "--quiet"]) == 0
    assert main(["merge", high, low, "--out", second, "--quiet"]) == 0
    assert main(["merge", low, high, "--method", "zip", "--out", third, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["merge", first, second, "--out", str(tmp_path / "x.pt"), "--quiet"]) == 2
    assert "output classes overlap but differ" in capsys.readouterr().err
    again = tmp_path / "again.pt"
    assert main(["merge", first, third, "--out", str(again), "--quiet"]) == 0
    assert gm.load_checkpoint(again).model.head.out_features == 10
    assert main(["graph", "--checkpoint", str(again)]) == 0
    assert "exact" in capsys.readouterr().out


def test_a_method_registered_at_run_time_merges_from_the_command_line(
    checkpoints, tmp_path, capsys, monkeypatch
):
    from graphmerge.matching_functions import Entry, Solution, permutation_match, registry

    class Averaged(Entry):
        needs_statistics = False
        provided = frozenset({"problem"})

        def solve(self, problem, hparams):
            return Solution({
                s.name: gm.Match(*permutation_match([torch.arange(s.width)] * 2))
                for s in problem.spaces
            })  # fmt: skip

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_entry(Averaged("averaged", lambda problem: None))
    out = tmp_path / "merged.pt"
    args = ["merge", str(checkpoints["a"]), str(checkpoints["b"]), "--method", "averaged"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    sources = [gm.load_checkpoint(checkpoints[name]).model for name in ("a", "b")]
    expected = gm.merge(sources, [torch.randn(8, 64)], "identity", progress=False)
    for key, value in expected.state_dict().items():
        assert torch.allclose(gm.load_checkpoint(out).model.state_dict()[key], value), key


def test_merge_reads_and_writes_safetensors(checkpoints, tmp_path, capsys):
    sources = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.safetensors"
        loaded = gm.load_checkpoint(checkpoints[name])
        gm.save_checkpoint(loaded.model, path, metadata=loaded.metadata)
        sources.append(path)
    out = tmp_path / "merged.safetensors"
    assert (
        main(["merge", *map(str, sources), "--method", "permute", "--out", str(out), "--quiet"])
        == 0
    )
    from_pt = tmp_path / "merged.pt"
    args = ["merge", str(checkpoints["a"]), str(checkpoints["b"]), "--method", "permute"]
    assert main([*args, "--out", str(from_pt), "--quiet"]) == 0
    capsys.readouterr()
    merged, expected = gm.load_checkpoint(out), gm.load_checkpoint(from_pt)
    for key, value in expected.model.state_dict().items():
        assert torch.equal(merged.model.state_dict()[key], value), key
    assert merged.metadata["merge"]["method"] == "permute"


def test_pleas_under_a_budget_from_the_command_line(checkpoints, tmp_path, capsys):
    out = tmp_path / "partial.pt"
    args = ["merge", str(checkpoints["a"]), str(checkpoints["b"]), "--method", "pleas"]
    assert main([*args, "--set", "budget=1.5", "--out", str(out), "--quiet"]) == 0
    merged = gm.load_checkpoint(out).model
    sources = [gm.load_checkpoint(checkpoints[name]).model for name in ("a", "b")]
    expected = gm.merge(sources, statistics_loader(), "pleas", budget=1.5, progress=False)
    assert merged.layers.fc1.out_features == 48  # 32 + 16 units kept apart
    for key, value in expected.state_dict().items():
        assert torch.allclose(merged.state_dict()[key], value, atol=1e-6), key
    assert main(["matchers"]) == 0
    listing = capsys.readouterr().out
    for name in ("pleas", "ste", "ot_fusion"):
        assert f"{name} (" in listing
    assert "Nasery et al. 2025" in listing and "budget=1.0" in listing
