"""Checkpoints that rebuild their model from the file alone, written atomically.

A checkpoint holds the architecture name and its arguments (``ModelSpec``), the
state_dict (on CPU) and free-form metadata (test metrics, data spec, seed). A path ending
in ``.safetensors`` is written and read in that format (the ``safetensors`` package): the
tensors, and everything else as JSON in the header's metadata; a plain safetensors file
(no graphmerge header) reads as a state_dict. A HuggingFace model saved to a path without
a suffix becomes a HuggingFace folder (``config.json``, ``model.safetensors``, and
``graphmerge.json`` with the spec and metadata), which ``transformers`` loads as well;
any folder ``save_pretrained`` wrote loads back.

Example:
    >>> import graphmerge as gm
    >>> model = gm.models.build("mlp", hidden=(32,), seed=0)
    >>> path = gm.save_checkpoint(model, "/tmp/mlp.pt", metadata={"seed": 0})
    >>> gm.load_checkpoint(path).metadata["seed"]
    0
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphmerge import models
from graphmerge._atomic import atomic_write
from graphmerge.fold import tensor_aliases
from graphmerge.resize import resized_copy

CHECKPOINT_FORMAT = "graphmerge.checkpoint"
CHECKPOINT_VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"
# The header fields of a graphmerge safetensors file, each a JSON string.
HEADER_FIELDS = ("version", "architecture", "kwargs", "resized", "metadata", "layer_versions")
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
GRAPHMERGE_FILE = "graphmerge.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model, how it was built, and its metadata."""

    model: nn.Module
    architecture: str
    kwargs: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    spec: models.ModelSpec | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` atomically to ``path`` with what it takes to rebuild it.

    ``spec`` defaults to the one ``graphmerge.models.build`` recorded on the model. A
    merged model whose widths changed (zip to a larger width, spaces kept unmerged,
    joint logits) has lost that record: pass the spec of the models it was merged
    from, and the file stores it with ``resized=True``; loading builds that
    architecture and gives every layer the widths of the stored weights.

    Example:
        >>> merged = gm.merge([a, b], loader, "zip", output="concat")
        >>> gm.save_checkpoint(merged, "joint.pt", spec=gm.models.spec_of(a))
    """
    own = models.spec_of(model)
    spec = spec if spec is not None else own
    folder = is_hf_model(model) and Path(path).suffix == ""
    if spec is None and folder:
        spec = models.ModelSpec(models.HF_CONFIG, {"config": models.zoo.hf_config(model)})
        own = spec
    if spec is None:
        raise ValueError(
            "cannot tell how to rebuild this model: build it with graphmerge.models.build(...) "
            "or pass spec=graphmerge.models.ModelSpec(architecture, kwargs) (for a merged "
            "model: the spec of the models it was merged from, gm.models.spec_of(model_a))"
        )
    own_state = model.state_dict()
    state = OrderedDict((key, value.detach().cpu()) for key, value in own_state.items())
    # Layer versions: loading hooks read them (torchvision's MNASNet refuses a file without).
    state._metadata = getattr(own_state, "_metadata", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **spec.to_dict(),
        # A spec given explicitly may describe other widths than this model's own.
        "resized": spec is not own and _resized(spec, state),
        "state_dict": state,
        "metadata": dict(metadata or {}),
    }
    if folder:
        return _save_hf_folder(model, Path(path), payload)
    with atomic_write(path) as handle:
        if Path(path).suffix == SAFETENSORS_SUFFIX:
            handle.write(_safetensors_bytes(payload))
        else:
            torch.save(payload, handle)
    return Path(path)


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a HuggingFace transformers model (it has ``save_pretrained``)."""
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder a HuggingFace model was saved to (holds config.json)."""
    return Path(path).is_dir() and (Path(path) / HF_CONFIG_FILE).is_file()


def _save_hf_folder(model: nn.Module, path: Path, payload: dict[str, Any]) -> Path:
    """``model.save_pretrained`` into a new folder beside ``path``, then swapped into place
    (an old folder at ``path`` is replaced only once the new one is complete)."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.exists() and not is_hf_folder(path):
        raise ValueError(f"{path} exists and is not a HuggingFace folder: choose a new path")
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.with_name(f".{path.name}.old")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        header = {key: payload[key] for key in ("format", "version", "architecture", "kwargs")}
        header.update(resized=payload["resized"], metadata=payload["metadata"])
        (staging / GRAPHMERGE_FILE).write_text(json.dumps(_tagged(header), indent=1))
        staging.chmod(0o777 & ~_umask())
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_hf_folder(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """The checkpoint payload of a HuggingFace folder: graphmerge's spec and metadata where
    it wrote one, else the folder's config (architecture ``hf-config``)."""
    weights = path / HF_WEIGHTS_FILE
    if not weights.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir()))
        raise ValueError(
            f"{path} holds no {HF_WEIGHTS_FILE} (found: {found}): save the model with "
            "model.save_pretrained(folder) (safetensors, the default)"
        )
    state = _safetensors().load_file(str(weights), device=str(map_location))
    if (path / GRAPHMERGE_FILE).is_file():
        header = json.loads((path / GRAPHMERGE_FILE).read_text(), object_hook=_untagged)
    else:
        config = json.loads((path / HF_CONFIG_FILE).read_text())
        header = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "architecture": models.HF_CONFIG,
            "kwargs": {"config": config},
            "resized": False,
            "metadata": {},
        }
    return {**header, "state_dict": _tied_state(header, state)}


def _tied_state(header: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """save_pretrained stores a tied weight once (GPT-2's lm_head.weight is wte.weight):
    the missing names are filled in from the model's own aliases."""
    model = models.build(header["architecture"], **header["kwargs"])
    aliases = tensor_aliases(model)
    filled = dict(state)
    for name, canonical in aliases.items():
        if name not in filled and canonical in filled:
            filled[name] = filled[canonical]
        elif canonical not in filled and name in filled:
            filled[canonical] = filled[name]
    return filled


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:  # an optional dependency: only .safetensors paths need it
        raise ImportError(
            "reading or writing .safetensors files needs the safetensors package: "
            "pip install safetensors (or the graphmerge[hf] extra)"
        ) from error
    return safetensors.torch


def _safetensors_bytes(payload: dict[str, Any]) -> bytes:
    """The payload as safetensors: the state_dict's tensors (each its own copy: tied weights
    are stored under each name) and the rest as JSON strings in the header."""
    state = payload["state_dict"]
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
    header = {"format": CHECKPOINT_FORMAT}
    versions = getattr(state, "_metadata", None)
    fields = {**payload, "layer_versions": dict(versions) if versions is not None else None}
    for name in HEADER_FIELDS:
        try:
            header[name] = json.dumps(_tagged(fields[name]))
        except TypeError as error:
            raise ValueError(
                f"cannot store {name} in a safetensors header (it must be JSON: numbers, "
                f"strings, lists, dicts): {error}; save to a .pt path instead"
            ) from error
    return _safetensors().save(tensors, metadata=header)


def _read_safetensors(path: Path, map_location: str | torch.device) -> Any:
    """A graphmerge safetensors file as the payload ``torch.load`` gives for a .pt one; a
    plain safetensors file as its state_dict."""
    library = _safetensors()
    try:
        data = path.read_bytes()
        tensors = library.load(data)
        header = _safetensors_header(data)
    except Exception as error:  # the library reports a damaged file in many ways
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    state = OrderedDict((key, value.to(map_location)) for key, value in tensors.items())
    if header.get("format") != CHECKPOINT_FORMAT:
        return state
    fields = {
        name: json.loads(header[name], object_hook=_untagged)
        for name in HEADER_FIELDS
        if name in header
    }
    if fields.get("layer_versions") is not None:
        state._metadata = fields["layer_versions"]
    return {
        "format": CHECKPOINT_FORMAT,
        "version": fields.get("version"),
        "architecture": fields.get("architecture"),
        "kwargs": fields.get("kwargs", {}),
        "resized": fields.get("resized", False),
        "state_dict": state,
        "metadata": fields.get("metadata", {}),
    }


TUPLE_TAG = "__tuple__"  # JSON has lists only: tuples (hidden=(64, 64)) are tagged


def _tagged(value: Any) -> Any:
    if isinstance(value, tuple):
        return {TUPLE_TAG: [_tagged(item) for item in value]}
    if isinstance(value, list):
        return [_tagged(item) for item in value]
    if isinstance(value, dict):
        return {key: _tagged(item) for key, item in value.items()}
    return value


def _untagged(value: dict) -> Any:
    return tuple(value[TUPLE_TAG]) if set(value) == {TUPLE_TAG} else value


def _safetensors_header(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (8-byte length first)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Rebuild the model stored at ``path`` and load its weights (strictly)."""
    path = Path(path)
    payload = read_file(path, map_location)
    if not is_checkpoint(payload):
        raise ValueError(
            f"{path} is not a graphmerge checkpoint (a plain state_dict?): rebuild the model with "
            "graphmerge.models.build(name, ...) and load_state_dict it, or on the command line "
            "name the architecture with --model NAME"
        )
    return rebuild(payload, path)


def read_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """What a PyTorch file holds (tensors and plain containers only: ``weights_only``), or a
    ``.safetensors`` file (a checkpoint's payload, or a plain state_dict)."""
    path = Path(path)
    if is_hf_folder(path):
        return _read_hf_folder(path, map_location)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder, not a checkpoint file (nor a HuggingFace folder with "
            f"{HF_CONFIG_FILE})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path, map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # classes pickled, not only tensors
            raise ValueError(
                f"{path} holds pickled Python objects, not only tensors (a whole model saved "
                "with torch.save(model)?): graphmerge reads checkpoints and state_dicts; save "
                "model.state_dict() or gm.save_checkpoint(model, path) instead"
            ) from error
        raise ValueError(f"{path} is not a readable PyTorch file ({error})") from error
    except Exception as error:  # torch.load fails in many ways on a file of another kind
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"{path} is not a readable PyTorch file ({type(error).__name__}: {first})"
        ) from error


def is_checkpoint(payload: Any) -> bool:
    """Whether ``payload`` (from ``read_file``) is a graphmerge checkpoint."""
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def rebuild(payload: dict[str, Any], path: str | os.PathLike) -> Checkpoint:
    """The Checkpoint of a payload read by ``read_file`` (``path`` for messages)."""
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint version {payload.get('version')!r}; this graphmerge reads "
            f"version {CHECKPOINT_VERSION}"
        )
    model = models.build(payload["architecture"], **payload["kwargs"])
    if payload.get("resized", False):
        check_keys(model, payload["state_dict"], source=str(path))
        model = resized_copy(model, payload["state_dict"])
    else:
        load_state_dict_strictly(model, payload["state_dict"], source=str(path))
    return Checkpoint(model, payload["architecture"], payload["kwargs"], payload["metadata"])


def _resized(spec: models.ModelSpec, state: dict[str, Any]) -> bool:
    """Whether ``state`` has other shapes than the architecture ``spec`` builds."""
    template = models.build(spec.architecture, **spec.kwargs).state_dict()
    if set(template) != set(state):
        extra = sorted(set(state) ^ set(template))[:5]
        raise ValueError(
            f"the model's parameters do not belong to {spec.architecture} (keys differ: "
            f"{', '.join(extra)}): pass the spec of the architecture it was built or merged from"
        )
    return any(tuple(template[key].shape) != tuple(value.shape) for key, value in state.items())


def check_keys(model: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """Raise an error naming the missing and unexpected keys of ``state_dict``, if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    problems = _problems([("missing keys", missing), ("unexpected keys", extra)])
    if problems:
        raise ValueError(
            f"the weights in {source} do not fit the architecture: " + "; ".join(problems)
        )


def load_state_dict_strictly(model: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """Load ``state_dict`` into ``model``; name missing, extra and mis-shaped keys if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    )
    problems = _problems(
        [
            ("missing keys", missing),
            ("unexpected keys", extra),
            ("shape mismatches, file vs model", shapes),
        ]
    )
    if problems:
        raise ValueError(
            f"the weights in {source} do not fit the architecture: " + "; ".join(problems)
        )
    versioned = OrderedDict(state_dict)
    # A file without layer versions (an older checkpoint, a plain dict) takes the model's own:
    # it is the same architecture, and version hooks (torchvision's MNASNet) need them.
    versioned._metadata = getattr(state_dict, "_metadata", None) or getattr(
        expected, "_metadata", None
    )
    model.load_state_dict(versioned)


def _problems(found: list[tuple[str, list[str]]]) -> list[str]:
    return [
        f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in found
        if items
    ]
