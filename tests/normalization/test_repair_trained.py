"""Trained digit models: REPAIR, RESCALE and RESET repair merged and pruned networks."""

import pytest
import torch
from conftest import train_pair
from torch import nn
from torch.nn.utils import prune

import graphmerge as gm


def fixed_order(data):
    """The training set in a fixed order: every pass of the repair sees the same samples."""
    return torch.utils.data.DataLoader(data.train.dataset, batch_size=128, shuffle=False)


def midpoints(models, data, normalizations):
    loader = fixed_order(data)
    merger = gm.Merger(models, example_input=next(iter(loader))[0], progress=False)
    merger.collect(loader)
    return {
        normalize: gm.evaluation.evaluate(
            merger.merge("permute", normalize=normalize, loader=loader).model, data.test
        )
        for normalize in normalizations
    }


@pytest.fixture(scope="module")
def vgg_digits():
    return gm.data.digits(layout="image", image_size=32)


def test_repair_lowers_the_loss_of_merged_vgg_without_normalization(vgg_digits):
    models = train_pair("vgg11", {"width_multiplier": 0.25}, [vgg_digits] * 2, epochs=3, lr=0.02)
    results = midpoints(models, vgg_digits, (None, "repair", "rescale"))
    assert results["repair"]["loss"] < 0.75 * results[None]["loss"], results
    assert results["repair"]["accuracy"] > results[None]["accuracy"] + 0.03, results
    assert results["rescale"]["loss"] < results[None]["loss"], results


def test_reset_and_repair_rescue_merged_batch_norm_resnets(digits_image):
    models = train_pair("resnet20", {}, [digits_image] * 2, epochs=3, lr=0.05)
    results = midpoints(models, digits_image, (None, "reset", "repair"))
    for normalize in ("reset", "repair"):
        assert results[normalize]["loss"] < 0.75 * results[None]["loss"], results
        assert results[normalize]["accuracy"] > results[None]["accuracy"] + 0.2, results


def test_match_statistics_repairs_a_pruned_resnet(digits_image):
    (model,) = train_pair("resnet20", {}, [digits_image], epochs=3, lr=0.05)
    pruned = gm.models.build("resnet20", seed=0, in_channels=1)
    pruned.load_state_dict(model.state_dict())
    for module in pruned.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(module, "weight", amount=0.5)
    fixed = gm.normalization.match_statistics(pruned, model, fixed_order(digits_image),
                                              progress=False)  # fmt: skip
    before = gm.evaluation.evaluate(pruned, digits_image.test)
    after = gm.evaluation.evaluate(fixed, digits_image.test)
    assert after["loss"] < 0.75 * before["loss"], (before, after)
    assert after["accuracy"] > before["accuracy"], (before, after)
