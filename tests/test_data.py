import numpy as np
import pytest
import torch

import graphmerge as gm
from graphmerge.data import digits_split, parse_classes


def all_samples(loader):
    inputs, targets = zip(*loader, strict=True)
    return torch.cat(inputs), torch.cat(targets)


def test_digits_split_is_fixed_disjoint_and_stratified():
    train, test = digits_split()
    again_train, again_test = digits_split()
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert len(train) + len(test) == 1797 and not set(train) & set(test)
    labels = gm.data._digits_arrays()[1]
    for label in range(10):
        share = (labels[test] == label).sum() / (labels == label).sum()
        assert abs(share - 0.2) < 0.01


def test_flat_layout_is_standardized_and_complete(digits_flat):
    x, y = all_samples(digits_flat.train)
    assert x.shape == (1438, 64) and digits_flat.input_shape == (64,)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert sorted(y.unique().tolist()) == list(range(10))
    assert len(digits_flat.test.dataset) == 359
    assert digits_flat.num_classes == 10


def test_test_loader_has_a_fixed_order(digits_flat):
    first = all_samples(digits_flat.test)
    second = all_samples(gm.data.digits().test)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_image_layout_resizes_and_repeats_channels(digits_flat):
    small = gm.data.digits(layout="image")
    big = gm.data.digits(layout="image", image_size=32, channels=3)
    xs, _ = all_samples(small.test)
    xb, _yb = all_samples(big.test)
    assert xs.shape[1:] == (1, 8, 8) and small.input_shape == (1, 8, 8)
    assert xb.shape[1:] == (3, 32, 32) and big.input_shape == (3, 32, 32)
    assert torch.equal(xb[:, 0], xb[:, 2])
    # the 8x8 images are the flat vectors reshaped
    flat, _ = all_samples(digits_flat.test)
    assert torch.equal(xs.reshape(len(xs), -1), flat)
    # resizing is smooth: pooling the 32x32 image back gives roughly the original
    pooled = torch.nn.functional.avg_pool2d(xb[:, :1], 4)
    assert (pooled - xs).abs().mean() < 0.2


@pytest.mark.parametrize(
    "selection, expected",
    [
        ("0-4", (0, 1, 2, 3, 4)),
        ("5-9", (5, 6, 7, 8, 9)),
        ("0,2,7-9", (0, 2, 7, 8, 9)),
        ([7, 2], (2, 7)),
    ],
)
def test_class_subsets_contain_only_their_classes(selection, expected):
    kept = gm.data.digits(classes=selection, remap_labels=False, shuffle_train=False)
    remapped = gm.data.digits(classes=selection, shuffle_train=False)
    assert kept.classes == remapped.classes == expected
    assert remapped.num_classes == len(expected) and kept.num_classes == 10
    for split in ("train", "test"):
        xk, yk = all_samples(getattr(kept, split))
        xr, yr = all_samples(getattr(remapped, split))
        assert set(yk.tolist()) == set(expected)
        assert torch.equal(xk, xr)
        assert torch.equal(torch.tensor(expected)[yr], yk)  # label k <-> classes[k]
    full_labels = gm.data._digits_arrays()[1][digits_split()[1]]
    assert len(kept.test.dataset) == np.isin(full_labels, expected).sum()


def test_disjoint_splits_partition_the_data():
    a = gm.data.digits(classes="0-4")
    b = gm.data.digits(classes="5-9")
    assert len(a.train.dataset) + len(b.train.dataset) == 1438
    assert len(a.test.dataset) + len(b.test.dataset) == 359


@pytest.mark.parametrize(
    "selection, message",
    [
        ("3-1", "end is below the start"),
        ("0-12", r"classes \[10, 11, 12\] are outside"),
        ("a-b", "bad class selection"),
        ("1,1,2", "names a class twice"),
        ("4", "at least 2 classes"),
        ([1.5, 2], "whole numbers"),
        ("", "bad class selection"),
    ],
)
def test_bad_class_selections_are_rejected(selection, message):
    with pytest.raises(ValueError, match=message):
        parse_classes(selection, total=10)
    with pytest.raises(ValueError, match=message):
        gm.data.digits(classes=selection)


def test_bad_digits_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown layout 'grid'"):
        gm.data.digits(layout="grid")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        gm.data.digits(layout="image", channels=2)
    with pytest.raises(ValueError, match="apply to layout='image' only"):
        gm.data.digits(layout="flat", image_size=16)
    with pytest.raises(ValueError, match="batch_size must be"):
        gm.data.digits(batch_size=0)
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        gm.data.load("mnist")


def test_missing_cifar_root_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        gm.data.cifar(tmp_path, "cifar10")
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "never downloads" in message
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        gm.data.load("cifar100", root=tmp_path)
    with pytest.raises(ValueError, match="needs root="):
        gm.data.load("cifar10")


def test_corrupted_cifar_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete or corrupted"):
        gm.data.cifar(tmp_path, "cifar10")


def test_spec_rebuilds_the_same_splits():
    splits = gm.data.digits(layout="image", image_size=16, classes="2-6")
    again = gm.data.load(**splits.spec)
    assert again.classes == splits.classes and again.input_shape == splits.input_shape
    assert torch.equal(all_samples(again.test)[0], all_samples(splits.test)[0])


def test_tokens_layout_gives_huggingface_dict_batches_of_pixel_intensities():
    text = gm.data.digits(layout="tokens", batch_size=32, shuffle_train=False)
    flat = gm.data.digits(layout="flat", batch_size=32, shuffle_train=False)
    batch = next(iter(text.train))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == (32, 65) and text.input_shape == (65,)
    assert (batch["input_ids"][:, 0] == 17).all()  # [CLS]
    pixels = batch["input_ids"][:, 1:]
    assert pixels.min() >= 0 and pixels.max() == 16 and len(pixels.unique()) == 17
    inputs, targets = next(iter(flat.train))
    assert torch.equal(targets, batch["labels"])
    assert torch.equal(batch["attention_mask"], torch.ones(32, 65, dtype=torch.long))
    order = torch.argsort(inputs[0])  # the standardized pixels, in the tokens' order
    assert (pixels[0][order].diff() >= 0).all()
    bare = gm.data.digits(layout="tokens", cls_token=False)
    assert bare.input_shape == (64,) and gm.data.input_shape(bare.spec) == (64,)
