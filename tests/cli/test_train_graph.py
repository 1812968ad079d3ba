import re
import subprocess
import sys

import pytest
import torch

import graphmerge as gm
from graphmerge.cli import format_classes, main


def test_train_writes_a_checkpoint_and_prints_test_accuracy(tmp_path, capsys):
    out = tmp_path / "a.pt"
    status = main(
        [
            "train",
            "--model",
            "resnet20",
            "--width",
            "2",
            "--data",
            "digits",
            "--classes",
            "0-4",
            "--seed",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0 and out.is_file()
    checkpoint = gm.load_checkpoint(out)
    assert checkpoint.kwargs["width_multiplier"] == 2 and checkpoint.kwargs["num_classes"] == 5
    assert checkpoint.metadata["classes"] == [0, 1, 2, 3, 4] and checkpoint.metadata["seed"] == 1
    data = gm.data.load(**checkpoint.metadata["data"])
    metrics = gm.evaluation.evaluate(checkpoint.model, data.test)
    assert metrics["accuracy"] > 0.9
    assert f"test accuracy {100 * metrics['accuracy']:.2f}%" in printed
    assert "classes 0-4" in printed and f"wrote {out}" in printed


def test_train_is_deterministic_and_honours_mlp_options(tmp_path, capsys):
    paths = [tmp_path / "m1.pt", tmp_path / "m2.pt"]
    for path in paths:
        assert (
            main(
                [
                    "train",
                    "--model",
                    "mlp",
                    "--hidden",
                    "32,32",
                    "--width",
                    "0.5",
                    "--epochs",
                    "2",
                    "--seed",
                    "4",
                    "--out",
                    str(path),
                    "--quiet",
                ]
            )
            == 0
        )
    first, second = (gm.load_checkpoint(p) for p in paths)
    assert first.model.layers.fc1.out_features == 16
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "resnet18"], "Did you mean torchvision:resnet18"),
        (["--model", "mlp", "--width", "0"], "argument --width: must be a finite number > 0"),
        (["--model", "mlp", "--width", "1e-9"], "leaves a layer of 512 units with 5.12e-07"),
        (["--model", "mlp", "--warmup-epochs", "-1"], "--warmup-epochs: must be a finite number"),
        (["--model", "mlp", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["--model", "mlp", "--lr", "nan"], "argument --lr: must be a finite number > 0"),
        (["--model", "mlp", "--device", "cuda"], "CUDA is not available here"),
        (["--model", "mlp", "--classes", "5-3"], "end is below the start"),
        (["--model", "mlp", "--classes", "0-10"], r"classes \[10\] are outside"),
        (["--model", "resnet20", "--hidden", "8"], "--hidden applies to --model mlp only"),
        (["--model", "mlp", "--image-size", "16"], "apply to image models"),
        (["--model", "mlp", "--data", "cifar10"], "needs --data-root"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    status = main(["train", *args, "--out", str(tmp_path / "x.pt"), "--quiet"])
    assert status == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.pt").exists()


def test_missing_output_folder_is_reported(tmp_path, capsys):
    status = main(["train", "--model", "mlp", "--out", str(tmp_path / "no" / "x.pt")])
    assert status == 2 and "does not exist" in capsys.readouterr().err


def test_help_reads_well_and_entry_point_runs():
    help_text = subprocess.run(
        [sys.executable, "-m", "graphmerge", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--classes" in help_text and "example: graphmerge train" in help_text
    version = subprocess.run(
        [sys.executable, "-m", "graphmerge", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert version.strip() == f"graphmerge {gm.__version__}"


def test_help_says_how_many_checkpoints_each_command_takes(capsys):
    for command, expected in [
        ("evaluate", "a checkpoint (from `graphmerge train`"),
        ("interpolate", "2 checkpoints of one architecture"),
        ("merge", "2 or more checkpoints of one architecture"),
        ("models", "example: graphmerge models"),
        ("matchers", "example: graphmerge matchers"),
    ]:
        assert main([command, "--help"]) == 0
        assert expected in " ".join(capsys.readouterr().out.split()), command


def test_models_command_lists_architectures(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "resnet20" in names and "torchvision:resnet50" in names


def test_matchers_command_lists_functions_with_papers_and_defaults(capsys):
    assert main(["matchers"]) == 0
    out = capsys.readouterr().out
    for name in ("identity", "permute", "zip", "cca", "weight_matching", "preserve_first"):
        assert f"\n{name} (" in f"\n{out}", name
    assert "alpha=0.3, beta=0.125" in out and "gamma=1.0" in out and "ZipIt!" in out
    assert "weight_matching (weights)" in out and "seed=0, max_sweeps=100" in out


def test_format_classes():
    assert format_classes((0, 1, 2, 3, 7, 9)) == "0-3,7,9"
    assert format_classes((5,)) == "5"


def test_graph_command_prints_spaces_proves_and_draws(tmp_path, capsys):
    png, dot = tmp_path / "g.png", tmp_path / "g.dot"
    status = main(["graph", "--model", "resnet20", "--out", str(png), "--dot", str(dot)])
    printed = capsys.readouterr().out
    assert status == 0
    assert "coverage 100.0% (448 of 448 hidden channels)" in printed
    assert re.search(r"symmetry check: max output change \S+ \(relative \S+\) .*: exact", printed)
    assert png.read_bytes()[:4] == b"\x89PNG" and dot.read_text().startswith("digraph")


def test_graph_command_hand_written_and_from_checkpoint(tmp_path, capsys):
    assert (
        main(["graph", "--model", "vgg11", "--width", "0.25", "--norm", "bn", "--hand-written"])
        == 0
    )
    assert "VGG (built)" in capsys.readouterr().out
    model = gm.models.build("mlp", hidden=(16, 8), input_dim=64, num_classes=4, seed=0)
    gm.save_checkpoint(
        model, tmp_path / "m.pt", metadata={"data": {"name": "digits", "layout": "flat"}}
    )
    assert main(["graph", "--checkpoint", str(tmp_path / "m.pt")]) == 0
    printed = capsys.readouterr().out
    assert "MLP (traced)" in printed and "24 of 24 hidden channels" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["graph", "--model", "resnet21"], "unknown"),
        (["graph", "--model", "resnet20", "--hand-written", "--hidden", "4"], "--hidden applies"),
        (["graph", "--checkpoint", "missing.pt"], "checkpoint not found"),
        (["graph", "--model", "torchvision:resnet18", "--hand-written"], "no hand-written graph"),
        (["graph", "--model", "mlp", "--trials", "0"], "argument --trials: must be >= 1, got 0"),
        (["graph", "--model", "mlp", "--trials", "x"], "must be a whole number, got 'x'"),
    ],
)
def test_graph_command_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err
