"""Trained digit models: aligned merging beats plain averaging (same task and disjoint tasks)."""

import pytest
from conftest import train_pair

import graphmerge as gm


def midpoints(models, data, output="average"):
    merger = gm.Merger(models, example_input=next(iter(data.train))[0])
    merger.collect(data.train, progress=False)
    return {
        method: gm.evaluation.evaluate(merger.merge(method, output=output).model, data.test)
        for method in ("identity", "permute")
    }


@pytest.fixture(scope="module")
def image_digits():
    return gm.data.digits(layout="image", image_size=8, channels=3)


def test_mlps_from_two_seeds(digits_flat):
    models = train_pair("mlp", {"hidden": (128, 128)}, [digits_flat] * 2, epochs=10, lr=0.1)
    results = midpoints(models, digits_flat)
    assert results["permute"]["loss"] < 0.5 * results["identity"]["loss"], results
    assert results["permute"]["accuracy"] > results["identity"]["accuracy"]


def test_layer_norm_resnets_from_two_seeds(image_digits):
    models = train_pair("resnet20", {"norm": "ln"}, [image_digits] * 2, epochs=8, lr=0.05)
    results = midpoints(models, image_digits)
    assert results["permute"]["loss"] < 0.5 * results["identity"]["loss"], results
    assert results["permute"]["accuracy"] > results["identity"]["accuracy"] + 0.3


def test_disjoint_halves_joint_logits_after_reset():
    """ZipIt! protocol: models for classes 0-4 and 5-9, joint logits, BatchNorm reset."""
    halves = [gm.data.digits(layout="image", classes=classes) for classes in ("0-4", "5-9")]
    models = train_pair("resnet20", {"width_multiplier": 4}, halves, epochs=8, lr=0.05)
    image_digits = gm.data.digits(layout="image")  # 1 x 8 x 8, all ten classes
    merger = gm.Merger(models, example_input=next(iter(image_digits.train))[0])
    merger.collect(image_digits.train, progress=False)
    accuracy = {}
    for method in ("identity", "permute"):
        merged = merger.merge(method, output="concat").model
        merged = gm.normalization.reset_bn(merged, image_digits.train)
        accuracy[method] = gm.evaluation.evaluate(merged, image_digits.test)["accuracy"]
    assert accuracy["permute"] > accuracy["identity"] + 0.15, accuracy
