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
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import (
    FileSystemReader,
    FileSystemWriter,
    _StorageInfo,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from torchkeep._common import DCP_MARKER
from torchkeep._facts import TensorInfo, numel
from torchkeep._tensors import dtype_name
from torchkeep.errors import CheckpointNotFoundError, CorruptFileError, UnsupportedValueError
from torchkeep.formats.manifest import check_format
from torchkeep.formats.tree import TAG, Flattener, index, join
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.contain import check_name, member
from torchkeep.safety.unpickle import safe_pickle_load
from torchkeep.storage.remote import RemoteFolder, split_url

METADATA_FILE = ".metadata"
MARKER = DCP_MARKER
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


def parse_metadata(raw: bytes, *, path: str) -> Metadata:
    """Unpickle a DCP ``.metadata`` file through the allowlist and validate what it holds.

    Pure: nothing but ``raw`` is read. Every tensor item must have a dtype, a shape of
    non-negative integers and chunks that lie inside it and cover it exactly once; every
    storage record a relative file name inside the checkpoint folder and a non-negative
    integer offset and length, at least as long as the chunk it holds.

    Args:
        raw: the bytes of ``.metadata``.
        path: the file, for messages.

    Raises:
        UnsafeFileError: a global outside the allowlist, or a data file name that leads out
            of the checkpoint folder.
        CorruptFileError: anything else malformed.
    """
    found = safe_pickle_load(raw, path=path, allow_globals=_METADATA_GLOBALS)
    if not isinstance(found, Metadata):
        raise CorruptFileError(
            f"{path!r} is not a torch.distributed.checkpoint metadata file "
            f"(it holds a {type(found).__name__})"
        )

    def bad(problem: str) -> CorruptFileError:
        return CorruptFileError(f"DCP metadata {path!r} is damaged: {problem}")

    storage = found.storage_data if found.storage_data is not None else {}
    if not isinstance(found.state_dict_metadata, dict) or not isinstance(storage, dict):
        raise bad("its item table or storage table is not a mapping")
    for key, info in storage.items():
        if not isinstance(key, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad(f"storage record {key!r} is not a DCP storage record")
        check_name(info.relative_path, path=path, what="data file")
        if not (_is_count(info.offset) and _is_count(info.length)):
            raise bad(
                f"storage record {key.fqn!r} has offset {info.offset!r}, length {info.length!r}"
            )
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors is not None and (
            not isinstance(descriptors, list | tuple)
            or not all(isinstance(d, str) for d in descriptors)
        ):
            raise bad(f"storage record {key.fqn!r} has invalid transforms {descriptors!r}")
    for name, item in found.state_dict_metadata.items():
        if not isinstance(name, str):
            raise bad(f"item name {name!r} is not a string")
        if isinstance(item, TensorStorageMetadata):
            _check_tensor(name, item, storage, bad)
        elif not isinstance(item, BytesStorageMetadata):
            raise bad(f"item {name!r} is a {type(item).__name__}, not a DCP item")
    if found.storage_meta is not None and not isinstance(found.storage_meta, StorageMeta):
        raise bad("its storage_meta is not a StorageMeta")
    return found


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < (1 << 63)


def _is_shape(value: object) -> bool:
    return isinstance(value, tuple) and all(_is_count(d) for d in value)


def _check_tensor(
    name: str,
    item: TensorStorageMetadata,
    storage: Mapping[Any, Any],
    bad: Callable[[str], CorruptFileError],
) -> None:
    properties = getattr(item, "properties", None)
    if not isinstance(getattr(properties, "dtype", None), torch.dtype):
        raise bad(f"tensor {name!r} has no valid dtype")
    size = item.size
    if not _is_shape(size) or numel(tuple(size)) >= (1 << 63):
        raise bad(f"tensor {name!r} has an invalid shape {size!r}")
    chunks = item.chunks
    if not isinstance(chunks, list) or not all(isinstance(c, ChunkStorageMetadata) for c in chunks):
        raise bad(f"tensor {name!r} has an invalid chunk list")
    itemsize = properties.dtype.itemsize  # type: ignore[union-attr]
    covered = 0
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for chunk in chunks:
        offsets, sizes = chunk.offsets, chunk.sizes
        if (
            not _is_shape(offsets)
            or not _is_shape(sizes)
            or len(offsets) != len(size)
            or len(sizes) != len(size)
            or any(o + n > d for o, n, d in zip(offsets, sizes, size, strict=True))
        ):
            raise bad(f"tensor {name!r} has a chunk {offsets!r}+{sizes!r} outside {size!r}")
        record = storage.get(MetadataIndex(name, offsets))
        if record is None:
            raise bad(f"tensor {name!r} has a chunk at {list(offsets)} stored nowhere")
        nbytes = numel(tuple(sizes)) * itemsize
        if not getattr(record, "transform_descriptors", None) and record.length < nbytes:
            raise bad(
                f"tensor {name!r}: its chunk at {list(offsets)} needs {nbytes} bytes but its "
                f"storage record holds {record.length}"
            )
        covered += numel(tuple(sizes))
        boxes.append((tuple(offsets), tuple(sizes)))
    if covered != numel(tuple(size)) or (len(boxes) <= _MAX_PAIRWISE and _overlap(boxes)):
        # A region no chunk covers would be loaded as uninitialised memory.
        raise bad(f"the chunks of tensor {name!r} do not cover its shape {list(size)} exactly")


_MAX_PAIRWISE = 256


def _overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    nonempty = [b for b in boxes if all(b[1])]
    for i, (a_off, a_len) in enumerate(nonempty):
        for b_off, b_len in nonempty[i + 1 :]:
            if all(
                ao < bo + bl and bo < ao + al
                for ao, al, bo, bl in zip(a_off, a_len, b_off, b_len, strict=True)
            ):
                return True
    return False


def check_data_files(folder: Path, metadata: Metadata, *, path: str) -> None:
    """Check that every storage record of a local DCP folder lies inside one of its files.

    Names are resolved inside ``folder`` (symlinks out of it are refused, never followed),
    and each record's end is checked against its file's length before anything is read.

    Raises:
        UnsafeFileError: a data file name that leads out of ``folder``.
        CorruptFileError: a missing data file, or a record past its file's end.
    """
    sizes: dict[str, int] = {}
    for key, info in (metadata.storage_data or {}).items():
        name = info.relative_path
        if name not in sizes:
            file = member(folder, name, path=path, what="data file")
            if not file.is_file():
                raise CorruptFileError(
                    f"DCP checkpoint {str(folder)!r} is incomplete: its data file {name!r} is "
                    "missing"
                )
            sizes[name] = file.stat().st_size
        if info.offset + info.length > sizes[name]:
            raise CorruptFileError(
                f"DCP checkpoint {str(folder)!r} is truncated: {key.fqn!r} is stored at bytes "
                f"{info.offset} to {info.offset + info.length} of {name!r}, which is only "
                f"{sizes[name]} bytes long"
            )


class _SafeMetadata:
    """Mixin: read ``.metadata`` through the allowlist, once per reader, and validate it."""

    _cached: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._cached is None:
            path = self._get_metadata_path(kwargs.get("rank"))  # type: ignore[attr-defined]
            with self.fs.create_stream(path, "rb") as stream:  # type: ignore[attr-defined]
                data = stream.read()
            found = parse_metadata(data, path=str(path))
            folder = getattr(self, "path", None)
            if isinstance(folder, Path):
                check_data_files(folder, found, path=str(path))
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
            raw = member(location, MARKER, path=where, what="marker", flat=True).read_bytes()
        else:
            parent, name = split_url(location)
            raw = RemoteFolder(parent, options).read_bytes(f"{name}/{MARKER}")
    except FileNotFoundError as exc:
        raise CorruptFileError(
            f"{where!r} has no {MARKER}, so it is not a committed checkpoint: the save that "
            "wrote it did not finish on every rank"
        ) from exc
    marker = _json.loads(raw, path=f"{where}/{MARKER}", what="commit marker")
    checked = check_format(
        marker, format=FORMAT, version=VERSION, what=f"{MARKER} of {where!r}", where=where
    )
    state = checked.get("state")
    if not isinstance(state, dict) or not all(isinstance(e, dict) for e in state.values()):
        raise CorruptFileError(f"{MARKER} of {where!r} has no valid 'state' section")
    return checked


def marker_bytes(marker: Mapping[str, Any]) -> bytes:
    """The commit marker's bytes (strict JSON: no NaN or infinity)."""
    return json.dumps(marker, indent=1, allow_nan=False).encode()
