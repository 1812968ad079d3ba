"""device=: models copied (never moved) to the device asked for; clear errors for mix-ups."""

import pytest
import torch

import graphmerge as gm
from graphmerge.cli import main
from graphmerge.runtime import model_device, on_device
from graphmerge.statistics import collect_statistics


@pytest.fixture
def pair(digits_flat):
    return [gm.models.build("mlp", hidden=(16,), norm="bn", seed=seed) for seed in (0, 1)]


@pytest.fixture
def loader(digits_flat):
    return torch.utils.data.DataLoader(digits_flat.train.dataset, batch_size=128)


def test_on_device_copies_only_the_models_elsewhere(pair):
    placed = on_device(pair, "cpu")
    assert placed[0] is pair[0] and placed[1] is pair[1]
    moved = on_device(pair, "meta")
    assert all(model_device(model).type == "meta" for model in moved)
    assert all(model_device(model).type == "cpu" for model in pair)  # the caller's stay
    assert on_device(pair, None) == pair


def test_models_on_two_devices_are_refused(pair):
    elsewhere = [pair[0], on_device([pair[1]], "meta")[0]]
    with pytest.raises(ValueError, match=r"on meta in model 1 but on cpu .*pass device="):
        gm.Merger(elsewhere, example_input=torch.zeros(2, 64))


def test_device_argument_runs_everything_there(pair, loader):
    merger = gm.Merger(pair, example_input=torch.zeros(2, 64), progress=False, device="cpu")
    assert merger.models[0] is pair[0]  # already there: no copy
    stats = merger.collect(loader)
    assert all(s.outer.device.type == "cpu" for s in stats.values())
    for normalize in ("reset", "repair"):
        result = merger.merge("permute", normalize=normalize, loader=loader)
        assert model_device(result.model).type == "cpu"
    direct = collect_statistics(pair, merger.graph, loader, progress=False, device="cpu")
    for name, found in direct.items():
        assert torch.equal(found.outer, stats[name].outer)


def test_merge_on_a_device_equals_the_merge_where_the_models_are(pair, loader):
    """device= picks where the work runs, not what it computes."""
    here = gm.merge(pair, loader, "permute", progress=False, normalize="repair")
    there = gm.merge(pair, loader, "permute", progress=False, normalize="repair", device="cpu")
    for key, value in here.state_dict().items():
        assert torch.equal(value, there.state_dict()[key]), key


def test_reset_bn_device(pair, loader):
    reset = gm.normalization.reset_bn(pair[0], loader, device="cpu")
    assert reset is not pair[0] and model_device(reset).type == "cpu"


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu9", "is not a device"), ("meta", "only cpu and cuda are supported")],
)
def test_cli_device_errors(device, message, tmp_path, capsys):
    assert main(["merge", "a.pt", "b.pt", "--device", device, "--out", str(tmp_path / "m.pt")]) == 2
    assert message in capsys.readouterr().err


def test_cli_cuda_needs_cuda(tmp_path, capsys):
    code = main(["merge", "a.pt", "b.pt", "--device", "cuda", "--out", str(tmp_path / "m.pt")])
    assert code == 2
    error = capsys.readouterr().err
    if torch.cuda.is_available():  # then the device is fine and the missing file is reported
        assert "checkpoint not found: a.pt" in error
    else:
        assert "CUDA is not available here" in error
