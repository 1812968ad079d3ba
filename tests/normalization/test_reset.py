"""reset_bn: BatchNorm statistics recomputed on data, in a copy."""

import pytest
import torch
from conftest import state_hash
from torch import nn
from torch.nn.utils import prune

import graphmerge as gm


def test_reset_bn_equals_statistics_by_hand():
    model = gm.models.build("resnet20", seed=0)
    x = torch.randn(32, 3, 8, 8)
    seen = {}
    hook = model.layer2[0].norm1.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    before = state_hash(model)
    reset = gm.normalization.reset_bn(model, [(x, torch.zeros(32))])
    with torch.no_grad():
        model.eval()(x)  # the hook sees the input of the same BN (running stats do not matter)
    hook.remove()
    # reset's conv weights equal the model's, and earlier BNs are reset too: compare by hand
    inputs = {}
    hook = reset.layer2[0].norm1.register_forward_hook(lambda m, a, o: inputs.setdefault("x", a[0]))
    reset.train()
    with torch.no_grad():
        reset(x)
    hook.remove()
    channels = inputs["x"].transpose(0, 1).reshape(inputs["x"].shape[1], -1)
    norm = reset.layer2[0].norm1
    assert torch.allclose(norm.running_mean, channels.mean(1), atol=1e-5)
    assert torch.allclose(norm.running_var, channels.var(1, unbiased=True), atol=1e-5)
    assert state_hash(model) == before and reset is not model


def test_reset_bn_averages_batches_and_leaves_dropout_alone():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).eval()
    batches = [torch.randn(10, 4), torch.randn(10, 4) + 2]
    reset = gm.normalization.reset_bn(model, batches)
    with torch.no_grad():
        means = [model[0](b).mean(0) for b in batches]
    assert torch.allclose(reset[1].running_mean, (means[0] + means[1]) / 2, atol=1e-5)
    assert reset[1].momentum == model[1].momentum and not reset.training
    assert not reset[2].training
    with pytest.raises(ValueError, match="no samples"):
        gm.normalization.reset_bn(model, [])


def test_reset_bn_names_a_wrong_input_shape_and_copies_pruned_models():
    model = gm.models.build("resnet20", seed=0)
    with pytest.raises(ValueError, match=r"cannot run on inputs of shape \(4, 10\)"):
        gm.normalization.reset_bn(model, [torch.randn(4, 10)])
    prune.l1_unstructured(model.conv1, "weight", amount=0.5)  # weight non-leaf
    before = state_hash(model)
    reset = gm.normalization.reset_bn(model, [torch.randn(8, 3, 8, 8)])
    assert state_hash(model) == before
    assert torch.equal(reset.conv1.weight_mask, model.conv1.weight_mask)


def test_one_sample_batches_are_left_out_under_batchnorm1d_only():
    """A loader's last batch of one sample would make BatchNorm1d fail in train mode."""
    flat = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(21, 4)
    with_last = gm.normalization.reset_bn(flat, [x[:10], x[10:20], x[20:]])
    without = gm.normalization.reset_bn(flat, [x[:10], x[10:20]])
    assert torch.equal(with_last[1].running_mean, without[1].running_mean)
    assert with_last[1].num_batches_tracked == 2
    with pytest.raises(ValueError, match=r"no samples: .*at least 2 samples for BatchNorm1d"):
        gm.normalization.reset_bn(flat, [x[:1]])
    image = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()
    single = gm.normalization.reset_bn(image, [torch.randn(1, 2, 4, 4)])  # 16 values a channel
    assert single[1].num_batches_tracked == 1
