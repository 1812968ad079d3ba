import os
import signal
import subprocess
import sys
import textwrap

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


def test_layer_versions_survive_the_file_mnasnet_reads_back(tmp_path):
    """torchvision's MNASNet checks a version in the state dict's metadata when it loads."""
    model = gm.models.build("torchvision:mnasnet0_5", num_classes=3, seed=0)
    path = gm.save_checkpoint(model, tmp_path / "m.pt")
    assert_same_state(gm.load_checkpoint(path).model, model)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = dict(payload["state_dict"])  # a file written without versions
    torch.save(payload, path)
    assert_same_state(gm.load_checkpoint(path).model, model)


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


# Writes half of a checkpoint over PATH, says so, then waits to be killed.
KILLED_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    import graphmerge as gm

    def slow_save(payload, handle):
        handle.write(b"half a checkpoint")
        handle.flush()
        print("writing", flush=True)
        time.sleep(600)

    torch.save = slow_save
    gm.save_checkpoint(gm.models.build("mlp", hidden=(8,), seed=1), sys.argv[1])
    """
)


def test_a_save_killed_midway_leaves_the_old_checkpoint_in_place(tmp_path):
    """SIGKILL runs no cleanup: the old file stays whole and loadable; what is left is a
    hidden temporary file beside it (.model.pt.*.tmp), never a truncated model.pt."""
    path = tmp_path / "model.pt"
    model = gm.models.build("mlp", hidden=(8,), seed=0)
    gm.save_checkpoint(model, path)
    good = path.read_bytes()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    assert path.read_bytes() == good
    assert_same_state(gm.load_checkpoint(path).model, model)
    leftovers = sorted(name for name in os.listdir(tmp_path) if name != "model.pt")
    assert len(leftovers) == 1 and leftovers[0].startswith(".model.pt.")


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


# Merged models whose widths differ from what their spec builds (resized checkpoints)


def merged_pair(name="mlp", kwargs=None, shape=(64,), method="permute", **options):
    kwargs = {"hidden": (16, 8)} if kwargs is None else kwargs
    models = [gm.models.build(name, seed=seed, **kwargs) for seed in (0, 1)]
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(0))
    merger = gm.Merger(models, example_input=x, progress=False)
    merger.collect([x[:16], x[16:]])
    return models, x, merger.merge(method, **options).model


def widths(model):
    """The shape attributes of every layer, by name."""
    found = {}
    for name, module in model.named_modules():
        for attribute in ("in_features", "out_features", "in_channels", "out_channels",
                          "num_features", "normalized_shape", "groups"):  # fmt: skip
            if hasattr(module, attribute):
                found[f"{name}.{attribute}"] = getattr(module, attribute)
    return found


def test_joint_logit_merge_round_trips_with_the_spec_of_its_sources(tmp_path):
    (a, _), x, merged = merged_pair(output="concat")
    assert merged.head.out_features == 20 and gm.models.spec_of(merged) is None
    spec = gm.models.spec_of(a)
    path = gm.save_checkpoint(merged, tmp_path / "joint.pt", spec=spec, metadata={"tasks": 2})
    payload = torch.load(path, weights_only=True)
    assert payload["resized"] is True and payload["architecture"] == "mlp"
    loaded = gm.load_checkpoint(path)
    assert type(loaded.model) is type(a)
    assert loaded.architecture == "mlp" and loaded.kwargs == spec.kwargs
    assert loaded.metadata == {"tasks": 2}
    assert loaded.model.head.out_features == 20 and loaded.model.head.in_features == 8
    assert widths(loaded.model) == widths(merged)
    assert_same_state(loaded.model, merged)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), merged.eval()(x))
    # the rebuilt model is resized too: saving it again needs the spec again
    assert gm.models.spec_of(loaded.model) is None
    again = gm.load_checkpoint(gm.save_checkpoint(loaded.model, tmp_path / "again.pt", spec=spec))
    assert_same_state(again.model, merged)


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "method", "options"),
    [
        ("mlp", {"hidden": (12, 12)}, (64,), "zip", {"merged_width": 18}),  # d' > d
        ("mlp", {"hidden": (12, 8), "norm": "bn"}, (64,), "permute", {"start_at": 1}),
        ("mlp", {"hidden": (12, 8), "norm": "ln"}, (64,), "permute", {"stop_at": 1}),
        ("resnet20", {}, (3, 8, 8), "permute", {"start_at": 3}),
    ],
)
def test_wider_merges_round_trip(tmp_path, name, kwargs, shape, method, options):
    (a, _), x, merged = merged_pair(name, kwargs, shape, method, **options)
    assert gm.models.spec_of(merged) is None
    assert widths(merged) != widths(a)
    path = gm.save_checkpoint(merged, tmp_path / "wide.pt", spec=gm.models.spec_of(a))
    assert torch.load(path, weights_only=True)["resized"] is True
    loaded = gm.load_checkpoint(path).model
    assert widths(loaded) == widths(merged)
    assert_same_state(loaded, merged)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), merged.eval()(x))


def test_a_merge_of_unchanged_widths_is_not_marked_resized(tmp_path):
    (a, _), x, merged = merged_pair()
    assert gm.models.spec_of(merged) == gm.models.spec_of(a)
    for spec in (None, gm.models.spec_of(a)):
        path = gm.save_checkpoint(merged, tmp_path / "merged.pt", spec=spec)
        assert torch.load(path, weights_only=True)["resized"] is False
        loaded = gm.load_checkpoint(path).model
        assert gm.models.spec_of(loaded) == gm.models.spec_of(a)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), merged.eval()(x))


def test_resized_models_need_the_spec_of_their_architecture(tmp_path):
    _, _, merged = merged_pair(output="concat")
    with pytest.raises(ValueError, match=r"cannot tell how to rebuild.*pass spec="):
        gm.save_checkpoint(merged, tmp_path / "x.pt")
    resnet = gm.models.spec_of(gm.models.build("resnet20"))
    with pytest.raises(ValueError, match=r"do not belong to resnet20 \(keys differ: .*conv1"):
        gm.save_checkpoint(merged, tmp_path / "x.pt", spec=resnet)
    normed = gm.models.spec_of(gm.models.build("mlp", hidden=(16, 8), norm="bn"))
    with pytest.raises(ValueError, match=r"do not belong to mlp \(keys differ: layers\.norm1"):
        gm.save_checkpoint(merged, tmp_path / "x.pt", spec=normed)
    assert os.listdir(tmp_path) == []


def test_a_spec_other_than_the_models_own_round_trips_with_the_models_widths(tmp_path):
    model = gm.models.build("mlp", hidden=(16, 8), seed=0)
    other = gm.models.spec_of(gm.models.build("mlp", hidden=(4, 4)))
    path = gm.save_checkpoint(model, tmp_path / "m.pt", spec=other)
    loaded = gm.load_checkpoint(path).model
    assert loaded.layers.fc1.out_features == 16 and loaded.layers.fc2.out_features == 8
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_safetensors_checkpoints_round_trip_with_their_metadata(tmp_path):
    import safetensors.torch

    model = gm.models.build("mlp", hidden=(32,), norm="bn", seed=0)
    path = gm.save_checkpoint(model, tmp_path / "mlp.safetensors", metadata={"seed": 3})
    assert sorted(os.listdir(tmp_path)) == ["mlp.safetensors"]  # written atomically
    plain = safetensors.torch.load_file(path)  # an ordinary safetensors file
    assert set(plain) == set(model.state_dict())
    loaded = gm.load_checkpoint(path)
    assert loaded.architecture == "mlp" and loaded.metadata == {"seed": 3}
    assert gm.models.spec_of(loaded.model) == gm.models.spec_of(model)
    assert_same_state(loaded.model, model)


@pytest.mark.parametrize("name", ["resnet20", "torchvision:mnasnet0_5"])
def test_safetensors_keep_resized_merges_and_layer_versions(tmp_path, name):
    if name == "resnet20":
        (a, _), x, model = merged_pair("resnet20", {}, (3, 8, 8), "permute", start_at=3)
        spec = gm.models.spec_of(a)
    else:  # MNASNet refuses a state dict without its layer versions
        model, spec, x = gm.models.build(name, num_classes=10, seed=0), None, None
    path = gm.save_checkpoint(model, tmp_path / "model.safetensors", spec=spec)
    loaded = gm.load_checkpoint(path).model
    assert_same_state(loaded, model)
    if x is not None:
        assert widths(loaded) == widths(model)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_plain_and_damaged_safetensors_files(tmp_path):
    import safetensors.torch

    model = gm.models.build("mlp", hidden=(32,), seed=0)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, plain)
    with pytest.raises(ValueError, match="not a graphmerge checkpoint"):
        gm.load_checkpoint(plain)
    assert set(gm.checkpoints.read_file(plain)) == set(model.state_dict())
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        gm.load_checkpoint(damaged)
    with pytest.raises(ValueError, match="cannot store metadata in a safetensors header"):
        gm.save_checkpoint(model, tmp_path / "bad.safetensors", metadata={"model": model})
    assert not (tmp_path / "bad.safetensors").exists()


def test_huggingface_folders_round_trip_and_replace_an_old_folder_whole(tmp_path, monkeypatch):
    model = gm.graphs.randomize_statistics(gm.models.build("hf:gpt2", seed=0))  # tied weights
    path = tmp_path / "gpt2"
    gm.save_checkpoint(model, path, metadata={"classes": (0, 1)})
    loaded = gm.load_checkpoint(path)
    assert loaded.architecture == "hf:gpt2" and loaded.metadata == {"classes": (0, 1)}
    assert_same_state(model, loaded.model)
    other = gm.models.build("hf:gpt2", seed=1)

    def failing(self, folder, **options):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(other), "save_pretrained", failing)
    with pytest.raises(KeyboardInterrupt):
        gm.save_checkpoint(other, path)
    assert_same_state(model, gm.load_checkpoint(path).model)  # the old folder, whole
    assert sorted(os.listdir(tmp_path)) == ["gpt2"]  # no staging folder left behind
    monkeypatch.undo()
    gm.save_checkpoint(other, path)
    assert_same_state(other, gm.load_checkpoint(path).model)
    assert sorted(os.listdir(tmp_path)) == ["gpt2"]
