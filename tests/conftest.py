"""Shared fixtures: the digits data in both layouts, built once per session."""

import hashlib

import pytest
import torch

import graphmerge as gm


@pytest.fixture(scope="session")
def digits_flat() -> gm.data.DataSplits:
    return gm.data.digits(layout="flat")


@pytest.fixture(scope="session")
def digits_image() -> gm.data.DataSplits:
    return gm.data.digits(layout="image")


def state_hash(model: torch.nn.Module) -> str:
    """A hash of every tensor in the model's state_dict (names, shapes and values)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
