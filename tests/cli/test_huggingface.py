"""CLI round trip with HuggingFace folders: train two BERTs on the digit tokens into
folders (config.json + model.safetensors), merge them into a folder, evaluate it, and
read a folder that transformers alone wrote."""

import json
import re

import pytest
import torch

import graphmerge as gm
from graphmerge.cli import main

TRAIN = ["train", "--model", "hf:bert", "--epochs", "2", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = [root / f"bert{seed}" for seed in (0, 1)]
    for seed, path in enumerate(paths):
        assert main([*TRAIN, "--seed", str(seed), "--out", str(path)]) == 0
    return paths


def accuracy_printed(text: str) -> float:
    return float(re.search(r"test accuracy (\d+\.\d+)%", text).group(1))


def test_train_merge_and_evaluate_huggingface_folders(folders, tmp_path, capsys):
    for path in folders:
        assert sorted(p.name for p in path.iterdir()) == [
            "config.json", "graphmerge.json", "model.safetensors",
        ]  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", *map(str, folders), "--method", "weight_matching", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]
    assert main(["evaluate", str(out)]) == 0
    assert accuracy_printed(capsys.readouterr().out) == accuracy_printed(printed)
    merged = gm.load_checkpoint(out)
    assert merged.metadata["merge"]["method"] == "weight_matching"
    assert merged.metadata["data"]["layout"] == "tokens"


def test_a_folder_transformers_wrote_merges_like_ours(folders, tmp_path, capsys):
    ours = gm.load_checkpoint(folders[0]).model
    foreign = tmp_path / "foreign"
    ours.save_pretrained(foreign)  # config.json and model.safetensors, no graphmerge.json
    loaded = gm.load_checkpoint(foreign)
    assert loaded.architecture == "hf-config"
    ids = torch.randint(0, 18, (3, 65))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, ours(input_ids=ids).logits)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(foreign), str(foreign), "--quiet", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with torch.no_grad():
        merged = gm.load_checkpoint(out).model
        assert torch.allclose(merged(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)


def test_a_folder_without_weights_is_refused_with_the_fix(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds no model\.safetensors .*save_pretrained"):
        gm.load_checkpoint(folder)
