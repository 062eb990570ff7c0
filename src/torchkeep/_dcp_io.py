"""Reading and writing ``torch.distributed.checkpoint`` (DCP) folders safely.

A DCP folder holds one ``.distcp`` file per rank and a pickled ``.metadata`` index. torch
reads that index with a plain ``pickle.load``; here it goes through torchkeep's allowlist,
extended only by DCP's own metadata classes. Non-tensor items (which DCP pickles and unpickles
with ``torch.load(weights_only=False)``) are never read: torchkeep stores the non-tensor part
of a training state as JSON in its commit marker, ``torchkeep-dcp.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from torchkeep._manifest import check_format
from torchkeep._tensors import TensorInfo, dtype_name, numel
from torchkeep._tree import TAG, Flattener, index, join
from torchkeep._unpickle import safe_pickle_load
from torchkeep.errors import CheckpointNotFoundError, CorruptFileError, UnsupportedValueError
from torchkeep.storage.remote import RemoteFolder, split_url

METADATA_FILE = ".metadata"
MARKER = "torchkeep-dcp.json"
FORMAT = "torchkeep-dcp"
VERSION = 1
Location = Path | str

# What DCP's .metadata pickle references, beyond torch's tensor basics on the allowlist.
_METADATA_GLOBALS = (
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.distributed.checkpoint.filesystem._StoragePrefix",
    "torch.serialization._get_layout",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence DCP's warning that a process without a group saves or loads alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated")
        yield


class _SafeMetadata:
    """Mixin: read ``.metadata`` through the allowlist, once per reader."""

    _cached: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._cached is None:
            path = self._get_metadata_path(kwargs.get("rank"))  # type: ignore[attr-defined]
            with self.fs.create_stream(path, "rb") as stream:  # type: ignore[attr-defined]
                data = stream.read()
            found = safe_pickle_load(data, path=str(path), allow_globals=_METADATA_GLOBALS)
            if not isinstance(found, Metadata):
                raise CorruptFileError(
                    f"{str(path)!r} is not a torch.distributed.checkpoint metadata file "
                    f"(it holds a {type(found).__name__})"
                )
            if getattr(found, "storage_meta", None) is None:
                found.storage_meta = StorageMeta()
            self._cached = found
        assert self._cached.storage_meta is not None
        self._cached.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return self._cached


class SafeReader(_SafeMetadata, FileSystemReader):
    """A local DCP reader whose metadata never runs code."""


def reader(location: Location, options: Mapping[str, Any] | None = None) -> FileSystemReader:
    """A safe DCP reader for a local folder or an fsspec URL."""
    if isinstance(location, Path):
        if not (location / METADATA_FILE).is_file():
            raise CheckpointNotFoundError(
                f"{str(location)!r} is not a torch.distributed.checkpoint folder: it has no "
                f"{METADATA_FILE}"
            )
        return SafeReader(location)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class SafeFsspecReader(_SafeMetadata, FsspecReader):
        pass

    return SafeFsspecReader(location, **dict(options or {}))


def writer(location: Location, options: Mapping[str, Any] | None = None) -> FileSystemWriter:
    """A DCP writer (fsynced files) for a local folder or an fsspec URL."""
    if isinstance(location, Path):
        return FileSystemWriter(location, sync_files=True)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(location, sync_files=True, **dict(options or {}))


def is_dcp_folder(path: Path) -> bool:
    """Whether ``path`` is a DCP folder (it holds ``.metadata``)."""
    return path.is_dir() and (path / METADATA_FILE).is_file()


def tensor_infos(metadata: Metadata) -> dict[str, TensorInfo]:
    """``{name: TensorInfo}`` for every tensor item (global shape) of a DCP checkpoint."""
    out: dict[str, TensorInfo] = {}
    for name, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            shape = tuple(int(d) for d in item.size)
            dtype = item.properties.dtype
            out[name] = TensorInfo(name, shape, dtype_name(dtype), numel(shape) * dtype.itemsize)
    return out


def empty_like_stored(metadata: Metadata, name: str, where: str) -> torch.Tensor:
    """A full CPU tensor to load the stored item ``name`` into."""
    item = metadata.state_dict_metadata.get(name)
    if not isinstance(item, TensorStorageMetadata):
        raise CorruptFileError(
            f"checkpoint {where!r} refers to tensor {name!r}, which its DCP metadata does not "
            "hold as a tensor: the checkpoint is damaged or was not written by torchkeep"
        )
    return torch.empty(tuple(item.size), dtype=item.properties.dtype)


# ------------------------------------------------------------------------- state encoding


def encode(value: object, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON node for ``value``; its tensors (DTensors too) go into ``tensors`` by path.

    String-keyed dicts and lists are walked so every tensor is its own DCP item, named by
    its path (``optimizer.state.fc.weight.exp_avg``); other values are tagged JSON.
    """
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach()
        return {TAG: "tensor", "name": path}
    if isinstance(value, dict) and all(type(k) is str for k in value) and TAG not in value:
        return {k: encode(v, join(path, k), tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [encode(v, index(path, i), tensors) for i, v in enumerate(value)]
    flattener = Flattener()
    node = flattener.encode(value, path)
    if flattener.tensors:
        raise UnsupportedValueError(
            f"the tensor at {next(iter(flattener.tensors))!r} sits in a tuple, set or a dict "
            "with non-string keys, which a distributed checkpoint cannot shard: use a list or "
            "a dict with string keys",
            path=path,
        )
    return node


def tensor_names(node: Any) -> list[str]:
    """The tensor names a JSON node refers to."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get(TAG) in ("tensor", "ndarray") and isinstance(item.get("name"), str):
                found.append(item["name"])
            else:
                stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return found


# ---------------------------------------------------------------------------------- marker


def read_marker(location: Location, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parsed commit marker of a torchkeep DCP checkpoint, checked for its version."""
    where = str(location)
    try:
        if isinstance(location, Path):
            raw = (location / MARKER).read_bytes()
        else:
            parent, name = split_url(location)
            raw = RemoteFolder(parent, options).read_bytes(f"{name}/{MARKER}")
    except FileNotFoundError as exc:
        raise CorruptFileError(
            f"{where!r} has no {MARKER}, so it is not a committed checkpoint: the save that "
            "wrote it did not finish on every rank"
        ) from exc
    try:
        marker = json.loads(raw)
    except ValueError as exc:
        raise CorruptFileError(f"{MARKER} of {where!r} is not valid JSON: {exc}") from exc
    return check_format(
        marker, format=FORMAT, version=VERSION, what=f"{MARKER} of {where!r}", where=where
    )


def write_marker_file(folder: Path, marker: Mapping[str, Any]) -> None:
    """Write the commit marker into a local folder and fsync it."""
    data = json.dumps(marker, indent=1, allow_nan=False).encode()
    with open(folder / MARKER, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
