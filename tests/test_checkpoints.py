import os

import pytest
import torch
from conftest import assert_same_state

import graphmerge as gm


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    model = gm.models.build(
        "resnet20", width_multiplier=0.5, norm="bn", num_classes=5, in_channels=1, seed=3
    )
    with torch.no_grad():
        model.norm1.running_mean.uniform_()  # buffers must travel too
    path = gm.save_checkpoint(model, tmp_path / "a.pt", metadata={"seed": 3, "classes": [0, 1]})
    loaded = gm.load_checkpoint(path)
    assert type(loaded.model) is type(model)
    assert loaded.architecture == "resnet20" and loaded.kwargs["num_classes"] == 5
    assert loaded.metadata == {"seed": 3, "classes": [0, 1]}
    assert_same_state(loaded.model, model)
    x = torch.randn(2, 1, 8, 8)
    model.eval(), loaded.model.eval()
    assert torch.equal(model(x), loaded.model(x))


def test_torchvision_checkpoint_round_trip(tmp_path):
    model = gm.models.build("torchvision:resnet18", num_classes=3, width_multiplier=0.25, seed=0)
    loaded = gm.load_checkpoint(gm.save_checkpoint(model, tmp_path / "r.pt"))
    assert loaded.architecture == "torchvision:resnet18"
    assert_same_state(loaded.model, model)


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    model = gm.models.build("mlp", hidden=(8,), seed=0)
    gm.save_checkpoint(model, path, metadata={"version": "good"})
    good = path.read_bytes()

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        gm.save_checkpoint(model, path, metadata={"version": "bad"})
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind


def test_plain_state_dict_is_not_mistaken_for_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(gm.models.build("mlp", hidden=(8,)).state_dict(), path)
    with pytest.raises(ValueError, match=r"not a graphmerge checkpoint.*--model NAME"):
        gm.load_checkpoint(path)


def test_checkpoint_with_wrong_keys_names_them(tmp_path):
    model = gm.models.build("mlp", hidden=(8,))
    path = gm.save_checkpoint(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["extra.weight"] = payload["state_dict"].pop("head.bias")
    payload["state_dict"]["head.weight"] = torch.zeros(3, 3)
    torch.save(payload, path)
    with pytest.raises(ValueError) as error:
        gm.load_checkpoint(path)
    message = str(error.value)
    assert "missing keys (1): head.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "head.weight (3, 3) vs (10, 8)" in message


def test_missing_garbage_and_unbuilt_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        gm.load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        gm.load_checkpoint(garbage)
    with pytest.raises(ValueError, match="cannot tell how to rebuild this model"):
        gm.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gm.save_checkpoint(gm.models.build("mlp", hidden=(8,)), tmp_path / "no" / "x.pt")
