"""Data sets as DataLoaders: the bundled digits, class-subset splits, and local CIFAR.

The digits (scikit-learn's 1797 handwritten 8x8 images, 10 classes) need no
download. The train/test split is fixed (stratified, 80/20, seed ``SPLIT_SEED``),
so every model and every run sees the same test set.

Class subsets (disjoint-task merging). ``classes=(5, 6, 7, 8, 9)`` keeps only
those classes. With ``remap_labels=True`` (default) labels are renumbered
0..k-1 in ascending class order (5 -> 0, ..., 9 -> 4), so a model for the subset
has k outputs; ``DataSplits.classes[label]`` gives the original class back.
With ``remap_labels=False`` the original ids are kept (the model then needs
outputs for every class of the data set). For joint evaluation of two models
trained on 0-4 and 5-9, concatenated logits [model A, model B] line up with the
original ids.

Example:
    >>> import graphmerge as gm
    >>> data = gm.data.digits(layout="image", image_size=16, classes="0-4")
    >>> data.input_shape, data.num_classes
    ((1, 16, 16), 5)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from graphmerge.batches import formatted, labelled_batches  # noqa: F401 (data.formatted)

DIGITS_NUM_CLASSES = 10
DIGITS_TEST_FRACTION = 0.2
SPLIT_SEED = 0
LAYOUTS = ("flat", "image", "tokens")
# The digits as text: each pixel's intensity 0..16 is a token id; [CLS] comes first.
DIGIT_LEVELS = 17
CLS_TOKEN = DIGIT_LEVELS
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

ClassSelection = str | Sequence[int] | None


@dataclass(frozen=True)
class DataSplits:
    """Train and test loaders of one data set, with what a model for them needs to know.

    ``classes`` are the original class ids in label order; ``num_classes`` is the
    number of outputs a model needs; ``spec`` rebuilds the same splits with ``load(**spec)``.
    """

    train: DataLoader
    test: DataLoader
    classes: tuple[int, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    spec: dict[str, Any]


def parse_classes(selection: ClassSelection, total: int) -> tuple[int, ...]:
    """Turn "0-4", "0,2,7-9", a list of ids or None (all) into sorted class ids in [0, total).

    Example:
        >>> parse_classes("0-2,7", total=10)
        (0, 1, 2, 7)
    """
    if selection is None:
        return tuple(range(total))
    if isinstance(selection, str):
        ids = []
        for part in selection.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if match is None:
                raise ValueError(
                    f"bad class selection {selection!r}: use ids and ranges like '0-4' or '0,2,7-9'"
                )
            first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
            if last < first:
                raise ValueError(f"bad class range {part.strip()!r}: the end is below the start")
            ids.extend(range(first, last + 1))
    else:
        ids = list(selection)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"class ids must be whole numbers, got {selection!r}")
    outside = sorted({int(i) for i in ids if not 0 <= i < total})
    if outside:
        raise ValueError(f"classes {outside} are outside this data set's range 0-{total - 1}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"class selection {selection!r} names a class twice")
    if len(ids) < 2:
        raise ValueError(f"class selection {selection!r} must name at least 2 classes")
    return tuple(sorted(int(i) for i in ids))


def select_classes(
    labels: np.ndarray, classes: Sequence[int], remap_labels: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the samples whose label is in ``classes``, and their (remapped) labels."""
    indices = np.flatnonzero(np.isin(labels, classes))
    selected = labels[indices]
    if remap_labels:
        selected = np.searchsorted(np.asarray(classes), selected)
    return indices, selected


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits data set ships with scikit-learn: `pip install 'graphmerge[digits]'`"
        ) from error
    bunch = load_digits()
    return bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split of the 1797 digits: (train indices, test indices)."""
    _, labels = _digits_arrays()
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for label in range(DIGITS_NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = round(len(members) * DIGITS_TEST_FRACTION)
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digits(
    layout: str = "flat",
    image_size: int = 8,
    channels: int = 1,
    classes: ClassSelection = None,
    remap_labels: bool = True,
    batch_size: int = 64,
    shuffle_train: bool = True,
    cls_token: bool = True,
) -> DataSplits:
    """The digits as flat 64-vectors (``layout="flat"``), images (``layout="image"``) or
    token sequences (``layout="tokens"``, for text transformers).

    Images are 1x8x8, bilinearly resized to ``image_size`` and repeated to
    ``channels`` (1 or 3). Pixels are standardized with the training set's mean/std.
    Tokens: each pixel's intensity 0..16 is a token id, 64 tokens in reading order, after
    a [CLS] token (id 17) unless ``cls_token=False``; batches are dicts of
    ``input_ids``, ``attention_mask`` and ``labels``, as HuggingFace models take them.
    Shuffling of the training loader draws from torch's global RNG (seeded by
    ``graphmerge.training.train``).

    Example:
        >>> text = digits(layout="tokens", batch_size=32)
        >>> sorted(next(iter(text.train)))
        ['attention_mask', 'input_ids', 'labels']
    """
    if layout not in LAYOUTS:
        raise ValueError(
            f"unknown layout {layout!r}: choose 'flat' (MLPs), 'image' (CNNs) or 'tokens' "
            "(text transformers)"
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a whole number >= 1, got {image_size!r}")
    _check_batch_size(batch_size)
    class_ids = parse_classes(classes, DIGITS_NUM_CLASSES)
    pixels, labels = _digits_arrays()
    train_index, test_index = digits_split()
    mean, std = pixels[train_index].mean(), pixels[train_index].std()
    inputs = torch.from_numpy((pixels - mean) / std)
    if layout == "image":
        inputs = inputs.reshape(-1, 1, 8, 8)
        if image_size != 8:
            inputs = F.interpolate(inputs, size=(image_size, image_size), mode="bilinear")
        inputs = inputs.expand(-1, channels, -1, -1).contiguous()
    elif image_size != 8 or channels != 1:
        raise ValueError("image_size and channels apply to layout='image' only")
    if layout == "tokens":
        inputs = torch.from_numpy(pixels * (DIGIT_LEVELS - 1)).round().long()  # 0..16
        if cls_token:
            inputs = torch.cat([torch.full((len(inputs), 1), CLS_TOKEN), inputs], dim=1)

    def loader(split_index: np.ndarray, shuffle: bool) -> DataLoader:
        keep, targets = select_classes(labels[split_index], class_ids, remap_labels)
        chosen, targets = inputs[split_index[keep]], torch.from_numpy(targets)
        dataset = (
            TokenDataset(chosen, targets) if layout == "tokens" else TensorDataset(chosen, targets)
        )
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)

    spec = dict(
        name="digits",
        layout=layout,
        **({"cls_token": cls_token} if layout == "tokens" else {}),
        image_size=image_size,
        channels=channels,
        classes=list(class_ids),
        remap_labels=remap_labels,
        batch_size=batch_size,
    )
    return DataSplits(
        train=loader(train_index, shuffle_train),
        test=loader(test_index, False),
        classes=class_ids,
        num_classes=len(class_ids) if remap_labels else DIGITS_NUM_CLASSES,
        input_shape=tuple(inputs.shape[1:]),
        spec=spec,
    )


class TokenDataset(Dataset):
    """Token sequences and their labels, one HuggingFace-style dict per sample (the
    DataLoader stacks them into dict batches)."""

    def __init__(self, tokens: torch.Tensor, targets: torch.Tensor) -> None:
        self.tokens, self.targets = tokens, targets
        self.mask = torch.ones(tokens.shape[1], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.tokens[index],
            "attention_mask": self.mask,
            "labels": self.targets[index],
        }


class _Relabelled(Dataset):
    """A subset of a dataset whose targets are replaced by ``targets``."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, targets: np.ndarray) -> None:
        self.subset = Subset(dataset, indices.tolist())
        self.targets = torch.from_numpy(targets)

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.subset[index][0], self.targets[index]


def cifar(
    root: str | Path,
    name: str = "cifar10",
    classes: ClassSelection = None,
    remap_labels: bool = True,
    batch_size: int = 128,
    shuffle_train: bool = True,
    augment: bool = False,
    num_workers: int = 0,
) -> DataSplits:
    """CIFAR-10/100 from a local torchvision root (never downloaded).

    ``root`` must hold ``cifar-10-batches-py`` (or ``cifar-100-python``), the folder
    ``torchvision.datasets.CIFAR10(root, download=True)`` creates.
    """
    if name not in CIFAR_FOLDERS:
        raise ValueError(f"unknown CIFAR variant {name!r}: choose 'cifar10' or 'cifar100'")
    _check_batch_size(batch_size)
    expected = Path(root) / CIFAR_FOLDERS[name]
    if not expected.is_dir():
        raise FileNotFoundError(
            f"{name} not found: expected the folder {expected} (the python version of {name}, "
            f"as torchvision.datasets.{name.upper()}(root={str(root)!r}, download=True) creates it "
            "on a machine with internet). graphmerge never downloads data."
        )
    from graphmerge.models.torchvision_models import import_torchvision

    torchvision = import_torchvision()
    transforms = torchvision.transforms
    normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    dataset_class = getattr(torchvision.datasets, name.upper())
    class_ids = parse_classes(classes, CIFAR_NUM_CLASSES[name])

    def loader(train: bool, shuffle: bool) -> DataLoader:
        steps = (augmentation if train and augment else []) + normalize
        try:
            dataset = dataset_class(
                str(root), train=train, download=False, transform=transforms.Compose(steps)
            )
        except RuntimeError as error:
            raise FileNotFoundError(
                f"{name} under {expected} is incomplete or corrupted ({error}); "
                "replace it with a fresh copy of the python version of the data set"
            ) from error
        indices, targets = select_classes(np.asarray(dataset.targets), class_ids, remap_labels)
        subset = _Relabelled(dataset, indices, targets)
        return DataLoader(subset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)

    spec = dict(
        name=name,
        root=str(root),
        classes=list(class_ids),
        remap_labels=remap_labels,
        batch_size=batch_size,
    )
    return DataSplits(
        train=loader(True, shuffle_train),
        test=loader(False, False),
        classes=class_ids,
        num_classes=len(class_ids) if remap_labels else CIFAR_NUM_CLASSES[name],
        input_shape=(3, 32, 32),
        spec=spec,
    )


def load(name: str, **kwargs: Any) -> DataSplits:
    """Load a data set by name: ``digits`` (bundled), ``cifar10`` or ``cifar100`` (``root=``)."""
    if name == "digits":
        return digits(**kwargs)
    if name in CIFAR_FOLDERS:
        if "root" not in kwargs:
            raise ValueError(f"{name} needs root=<folder holding {CIFAR_FOLDERS[name]}>")
        return cifar(name=name, **kwargs)
    raise ValueError(f"unknown data set {name!r}: choose digits, cifar10 or cifar100")


class Relabelled:
    """A loader whose labels (original class ids) are replaced by their position in
    ``classes``: the output column of a model whose ``classes[column]`` is the class id
    (e.g. joint logits of a 5-9 model and a 0-4 model: classes 5..9, 0..4).

    Example:
        >>> test = Relabelled(digits(remap_labels=False).test, [5, 6, 7, 8, 9, 0, 1, 2, 3, 4])
    """

    def __init__(self, loader: Iterable, classes: Sequence[int]) -> None:
        classes = [int(class_id) for class_id in classes]
        if len(set(classes)) != len(classes) or not classes or min(classes) < 0:
            raise ValueError(f"classes must be distinct ids >= 0, got {classes}")
        self.loader = loader
        self.classes = classes
        self.columns = torch.full((max(classes) + 1,), -1, dtype=torch.long)
        self.columns[torch.tensor(classes)] = torch.arange(len(classes))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for inputs, targets in labelled_batches(self.loader):
            if targets.numel() and (targets.min() < 0 or targets.max() >= len(self.columns)):
                raise ValueError(f"labels outside the known classes {self.classes}")
            columns = self.columns[targets]
            if (columns < 0).any():
                unknown = sorted(set(targets[columns < 0].tolist()))
                raise ValueError(f"labels {unknown} are not among the classes {self.classes}")
            yield inputs, columns


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")


def input_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one sample of the data described by ``spec`` (a ``DataSplits.spec``)."""
    if spec.get("name") == "digits":
        if spec.get("layout", "flat") == "flat":
            return (64,)
        if spec["layout"] == "tokens":
            return (64 + bool(spec.get("cls_token", True)),)
        size = spec.get("image_size", 8)
        return (spec.get("channels", 1), size, size)
    if spec.get("name") in ("cifar10", "cifar100"):
        return (3, 32, 32)
    raise ValueError(f"unknown data spec {spec!r}: expected name digits, cifar10 or cifar100")
