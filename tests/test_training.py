import pytest
import torch
from conftest import assert_same_state, state_hash

import graphmerge as gm


def test_mlp_reaches_90_percent_on_digits(digits_flat):
    model = gm.models.build("mlp", hidden=(128, 128), seed=0)
    result = gm.training.train(
        model, digits_flat.train, digits_flat.test, epochs=8, lr=0.1, progress=False
    )
    assert result.metrics["accuracy"] > 0.9
    assert result.metrics["num_samples"] == 359
    assert len(result.history) == 8
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_resnet20_reaches_90_percent_on_digits(digits_image):
    model = gm.models.build("resnet20", in_channels=1, seed=0)
    result = gm.training.train(
        model, digits_image.train, digits_image.test, epochs=4, progress=False
    )
    assert result.metrics["accuracy"] > 0.9


def test_same_seed_gives_bit_identical_weights(digits_image):
    model = gm.models.build("resnet20", width_multiplier=0.5, in_channels=1, seed=0)
    runs = [
        gm.training.train(model, digits_image.train, epochs=1, seed=seed, progress=False).model
        for seed in (3, 3, 4)
    ]
    assert_same_state(runs[0], runs[1])  # includes BatchNorm running statistics
    assert state_hash(runs[0]) != state_hash(runs[2])


def test_training_leaves_the_input_model_and_global_rng_alone(digits_flat):
    model = gm.models.build("mlp", hidden=(16,), seed=0)
    before = state_hash(model)
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    result = gm.training.train(model, digits_flat.train, epochs=1, progress=False)
    assert torch.equal(torch.rand(2), expected)
    assert state_hash(model) == before and result.model is not model
    assert state_hash(result.model) != before
    assert gm.models.spec_of(result.model) == gm.models.spec_of(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"schedule": "step"}, "unknown schedule"),
        ({"epochs": 0}, "epochs must be"),
        ({"lr": -1.0}, "lr must be"),
    ],
)
def test_bad_training_arguments(digits_flat, kwargs, message):
    model = gm.models.build("mlp", hidden=(8,))
    with pytest.raises(ValueError, match=message):
        gm.training.train(model, digits_flat.train, progress=False, **kwargs)


def test_empty_loader_is_rejected():
    model = gm.models.build("mlp", hidden=(8,))
    empty = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(0, 64), torch.zeros(0).long())
    )
    with pytest.raises(ValueError, match="yields no batches"):
        gm.training.train(model, empty, progress=False)
    with pytest.raises(ValueError, match="yielded no samples"):
        gm.evaluation.evaluate(model, empty)


def test_divergence_is_reported_not_returned(digits_flat):
    model = gm.models.build("mlp", hidden=(64, 64), seed=0)
    with pytest.raises(FloatingPointError, match="training diverged"):
        gm.training.train(
            model, digits_flat.train, epochs=3, lr=1e12, warmup_epochs=0, progress=False
        )


def test_labels_beyond_the_outputs_are_a_clear_error(digits_flat):
    model = gm.models.build("mlp", hidden=(8,), num_classes=5)
    with pytest.raises(ValueError, match="model has 5 outputs"):
        gm.training.train(model, digits_flat.train, progress=False)


def test_wrong_input_layout_is_a_clear_error(digits_flat):
    model = gm.models.build("resnet20", in_channels=1)
    with pytest.raises(ValueError, match=r"cannot run on inputs of shape \(64, 64\)"):
        gm.evaluation.evaluate(model, digits_flat.test)


def test_evaluate_restores_train_mode_and_counts_correctly(digits_flat):
    model = gm.models.build("mlp", hidden=(8,), norm="bn", seed=0)
    model.train()
    metrics = gm.evaluation.evaluate(model, digits_flat.test)
    assert model.training and model.layers.norm1.training
    x, y = map(torch.cat, zip(*digits_flat.test, strict=True))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert metrics["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5
    )


def test_one_sample_batches_are_left_out_under_batchnorm1d():
    """A loader's last batch of one sample would make BatchNorm1d fail in train mode."""
    model = gm.models.build("mlp", hidden=(8,), norm="bn", seed=0)
    x, y = torch.randn(33, 64), torch.randint(0, 10, (33,))
    fixed = {"epochs": 1, "schedule": "constant", "warmup_epochs": 0, "progress": False}
    full = gm.training.train(model, [(x[:32], y[:32]), (x[32:], y[32:])], **fixed)
    cut = gm.training.train(model, [(x[:32], y[:32])], **fixed)
    assert_same_state(full.model, cut.model)
    with pytest.raises(ValueError, match=r"no samples to train on \(batches of at least 2"):
        gm.training.train(model, [(x[:1], y[:1])], epochs=1, progress=False)
