"""Native checkpoint folders (``checkpoint.json`` + safetensors shards): the reader.

:class:`NativeCheckpoint` opens a folder written by ``save_checkpoint`` or a
``CheckpointManager`` (the writer is :mod:`torchkeep.training.checkpoint`), validating the
manifest, every file's length and every tensor's header before any data is read.
:class:`NativeSource`, on top of it, lets ``load``, ``load_state_dict`` and ``inspect`` read
the model weights out of a training checkpoint: every module entry of the state (``model``,
``ema``, ...) is one entry; the other entries (optimizer, scheduler, plain values) are
``extras``, as plain values without their tensor data, and the manifest's own fields (step,
metrics, creation time) are ``extras["__torchkeep__"]``, where a ``.pt`` checkpoint keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import xxhash

from torchkeep._common import BOOKKEEPING, MANIFEST, OBJECTS
from torchkeep._facts import TensorInfo, numel
from torchkeep._tensors import copy_into
from torchkeep.errors import (
    ChecksumError,
    CorruptFileError,
    UnknownFormatError,
    UnsafeFileError,
)
from torchkeep.formats._base import OpenOptions, Source, WriteRequest
from torchkeep.formats.manifest import read_manifest
from torchkeep.formats.safetensors import SafetensorsSource
from torchkeep.formats.tree import TAG
from torchkeep.io.read import Landed, ReadExtent, check_spans, read_extents, xxh3_hook
from torchkeep.safety.contain import member
from torchkeep.safety.unpickle import safe_pickle_load

PathLike = str | os.PathLike[str]
# Where a .pt checkpoint keeps torchkeep's own fields; a folder's manifest fields go there too.


class NativeCheckpoint:
    """An opened native checkpoint: manifest, shard headers and lengths validated.

    Args:
        path: the checkpoint folder.
        verify: hash every tensor read (and, on :meth:`verify_rest`, the others) against
            the manifest's xxh3.
    """

    def __init__(self, path: PathLike, *, verify: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._verify = verify
        self._checked: set[str] = set()
        self._sources: dict[str, SafetensorsSource] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _corrupt(self, problem: str) -> CorruptFileError:
        return CorruptFileError(f"checkpoint {str(self.path)!r} is damaged: {problem}")

    def _open(self) -> None:
        where = str(self.path / MANIFEST)
        for name, info in self.manifest["files"].items():
            file = member(self.path, name, path=where, what="file", flat=True)
            if not file.is_file():
                raise self._corrupt(f"its file {name!r} is missing")
            size = file.stat().st_size
            if size != info.get("bytes"):
                raise self._corrupt(
                    f"{name!r} is {size} bytes but {info.get('bytes')} were written (truncated?)"
                )
            self._sources[name] = SafetensorsSource(file, OpenOptions())
        for name, info in self.manifest["tensors"].items():
            source = self._sources.get(info.get("file"))
            if source is None:
                raise self._corrupt(f"tensor {name!r} is in unlisted file {info.get('file')!r}")
            stored = source.entries()[""].get(name)
            if stored is None:
                raise self._corrupt(f"tensor {name!r} is missing from {info['file']!r}")
            if stored.dtype != info.get("dtype") or list(stored.shape) != info.get("shape"):
                raise self._corrupt(
                    f"tensor {name!r} is {stored.dtype}{list(stored.shape)} in {info['file']!r} "
                    f"but the manifest says {info.get('dtype')}{info.get('shape')}"
                )

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (to CPU), checking its checksum when opened with ``verify``."""
        return self.read([name])[name]

    def read(self, names: Iterable[str], *, verify: bool | None = None) -> dict[str, torch.Tensor]:
        """Read tensors (to CPU) all at once, in parallel across the shard files.

        Each is allocated with its stored dtype and shape and read straight into; with
        ``verify`` (default: as opened) its bytes are hashed in the reading thread as they
        land and compared with the manifest's xxh3.

        Raises:
            CorruptFileError: a name the manifest does not list, or a file shorter than
                its header says.
            ChecksumError: a tensor's bytes differ from their recorded checksum.
        """
        verify = self._verify if verify is None else verify
        out: dict[str, torch.Tensor] = {}
        extents: list[ReadExtent] = []
        for name in names:
            if name in out:
                continue
            info = self.manifest["tensors"].get(name)
            if info is None:
                raise self._corrupt(f"its structure refers to tensor {name!r}, which is not stored")
            source = self._sources[info["file"]]
            out[name] = source.empty(name)
            landed = self._checker(name, info) if verify else None
            extents.append(source.extent(name, out[name], landed))
        read_extents(extents)
        if verify:
            self._checked.update(out)
        return out

    def placeholder(self, name: str) -> torch.Tensor | None:
        """A meta tensor of stored tensor ``name``'s dtype and shape, or None when ``name``
        is not a plain tensor whose bytes can be read straight into a destination."""
        info = self.manifest["tensors"].get(name)
        if info is None:
            return None
        stored = self._sources[info["file"]].entries()[""][name]
        dtype = getattr(torch, stored.dtype, None)
        if not isinstance(dtype, torch.dtype) or dtype.itemsize * numel(stored.shape) != (
            stored.nbytes
        ):
            return None  # sub-byte dtypes count their elements differently
        return torch.empty(stored.shape, dtype=dtype, device="meta")

    def read_into(
        self, pairs: Sequence[tuple[str, torch.Tensor]], *, started: set[str] | None = None
    ) -> None:
        """Read stored tensors into existing tensors, all at once and in parallel.

        A contiguous CPU destination of the stored dtype and shape is read into directly;
        any other (another dtype, device or layout) gets a new tensor read and copied in.
        Nothing is hashed here: with ``verify``, call :meth:`verify_rest` first, so that a
        damaged tensor is found before any destination changes.

        Args:
            pairs: ``(stored name, destination)``; destinations of the same shape.
            started: gets each stored name before any of its bytes reach its destination,
                so that after a failure it names every destination that may have changed.

        Raises:
            CorruptFileError: a name the manifest does not list, or a file that ends
                before a tensor's last byte.
            OSError: a read failed.
        """
        extents: list[ReadExtent] = []
        rest: list[tuple[str, torch.Tensor]] = []
        for name, dest in pairs:
            info = self.manifest["tensors"].get(name)
            if info is None:
                raise self._corrupt(f"its structure refers to tensor {name!r}, which is not stored")
            direct, other = self._sources[info["file"]].plan_reads([(name, dest)])
            extents += direct
            rest += other
        fresh = self.read([name for name, _ in rest], verify=False)
        read_extents(extents, started=started)
        with torch.no_grad():
            for name, dest in rest:
                if started is not None:
                    started.add(name)
                copy_into(dest, fresh[name], name)

    def _checker(self, name: str, info: dict[str, Any]) -> Landed:
        expected = info.get("xxh3")
        where = str(self.path / info["file"])
        return xxh3_hook(
            expected,
            lambda actual: ChecksumError(
                f"tensor {name!r} in {where!r} is damaged: its bytes hash to {actual}, but "
                f"{expected} was recorded when it was saved. Load an earlier checkpoint."
            ),
        )

    def verify_rest(self) -> None:
        """Check the tensors not read (with ``verify``) yet, in parallel, without keeping them.

        Raises:
            ChecksumError: a tensor's bytes differ from their recorded checksum.
            CorruptFileError: a file shorter than its header says.
        """
        tensors = self.manifest["tensors"]
        check_spans(
            [
                self._sources[info["file"]].span(name, self._checker(name, info))
                for name, info in tensors.items()
                if name not in self._checked
            ]
        )
        self._checked.update(tensors)

    def objects(self, trust: bool, allow_globals: Iterable[str] = ()) -> list[object]:
        """The pickled side objects: unpickled fully with ``trust``, through the allowlist
        (extended by ``allow_globals``) when globals are allowed, refused otherwise."""
        info = self.manifest.get("objects")
        if not info:
            return []
        allowed = tuple(allow_globals)
        if not trust and not allowed:
            raise UnsafeFileError(
                f"checkpoint {str(self.path)!r} holds pickled objects ({OBJECTS}, at "
                f"{', '.join(info.get('paths', []))}), written with allow_pickle=True; unpickling "
                "can run any code, so they load only with trust=True, or through the allowlist "
                "with allow_globals=['package.Class', ...] naming their classes. Pass trust=True "
                "only if you trust whoever wrote the checkpoint.",
                path=str(self.path / OBJECTS),
            )
        where = str(self.path / MANIFEST)
        data = member(self.path, OBJECTS, path=where, what="file", flat=True).read_bytes()
        if len(data) != info.get("bytes") or xxhash.xxh3_64_hexdigest(data) != info.get("xxh3"):
            raise ChecksumError(f"{str(self.path / OBJECTS)!r} does not match its checksum")
        if trust:
            loaded = pickle.loads(data)  # the caller declared the checkpoint trusted
        else:
            loaded = safe_pickle_load(data, path=str(self.path / OBJECTS), allow_globals=allowed)
        return list(loaded)

    def close(self) -> None:
        """Close the shard files."""
        for source in self._sources.values():
            source.close()
        self._sources.clear()

    def __enter__(self) -> NativeCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NativeSource(Source):
    """The module entries of a committed native checkpoint."""

    def __init__(self, path: Path, options: OpenOptions) -> None:
        super().__init__(str(path), "torchkeep-checkpoint")
        self._device = options.device
        self._checkpoint = NativeCheckpoint(path)
        manifest = self._checkpoint.manifest
        self._stored: dict[str, dict[str, str]] = {}
        stored_info = manifest["tensors"]
        for key, entry in manifest["state"].items():
            if not isinstance(entry, dict):
                continue
            kind, value = entry.get("kind"), entry.get("value")
            if kind == "module" and isinstance(value, dict):
                found = {key: _tensor_refs(value)}
            elif kind in ("value", "stateful"):
                # A state dict saved as a value (model=model.state_dict()), or one inside it.
                found = _tensor_dicts(value, key, 0)
            else:
                found = {}
            for entry_name, names in found.items():
                for name, stored in names.items():
                    if not isinstance(stored, str) or stored not in stored_info:
                        raise CorruptFileError(
                            f"checkpoint {str(path)!r} is damaged: entry {entry_name!r} refers "
                            f"to tensor {stored!r} for {name!r}, which is not stored"
                        )
                self._stored[entry_name] = names
                self._entries[entry_name] = {
                    name: _info(name, stored_info[stored]) for name, stored in names.items()
                }
            if kind != "module" and key not in found:
                self.extras[key] = _describe(entry, stored_info)
        user = manifest.get("metadata")
        user = user if isinstance(user, dict) else {}
        self.metadata = {
            str(k): v if isinstance(v, str) else json.dumps(v) for k, v in user.items()
        }
        # The manifest's own fields, as the .pt layout keeps them: under one reserved key.
        self.extras[BOOKKEEPING] = {
            key: _plain(manifest.get(key), stored_info)
            for key in ("format", "version", "id", "created", "torch_version", "step", "metrics")
        }

    def get(self, entry: str, name: str) -> torch.Tensor:
        if self._device == "meta":
            info = self._entries[entry][name]
            return torch.empty(info.shape, dtype=getattr(torch, info.dtype), device="meta")
        tensor = self._checkpoint.tensor(self._stored[entry][name])
        return tensor if self._device == "cpu" else tensor.to(self._device)

    def read_many(
        self, entry: str, names: Iterable[str], *, verify: bool = False
    ) -> dict[str, torch.Tensor]:
        """Read ``names`` of ``entry`` into new tensors, all at once and in parallel.

        With ``verify``, each tensor is hashed as it lands, then the checkpoint's other
        tensors are checked, as :meth:`verify` does, without reading anything twice.
        """
        wanted = list(dict.fromkeys(names))
        if self._device == "meta":
            return {name: self.get(entry, name) for name in wanted}
        stored = self._stored[entry]
        tensors = self._checkpoint.read([stored[name] for name in wanted], verify=verify)
        if verify:
            self._checkpoint.verify_rest()
        out: dict[str, torch.Tensor] = {}
        taken: set[str] = set()
        for name in wanted:
            tensor = tensors[stored[name]]
            if stored[name] in taken:
                tensor = tensor.clone()  # a tensor per name, as separate reads give
            taken.add(stored[name])
            out[name] = tensor if self._device == "cpu" else tensor.to(self._device)
        return out

    def verify(self, entry: str | None = None) -> None:
        with NativeCheckpoint(Path(self.path), verify=True) as checked:
            checked.verify_rest()

    def close(self) -> None:
        self._checkpoint.close()


_MAX_DEPTH = 4  # as deep as entries are looked for in torch checkpoint dicts


def _tensor_refs(node: dict[str, Any]) -> dict[str, Any]:
    """``{name: stored tensor name}`` for the tensor references directly in a JSON dict."""
    return {
        name: ref.get("name")
        for name, ref in node.items()
        if isinstance(ref, dict) and ref.get("__tk__") == "tensor"
    }


def _tensor_dicts(node: Any, path: str, depth: int) -> dict[str, dict[str, Any]]:
    """Every plain dict holding tensors inside a value's JSON node, keyed by its dotted path."""
    if not isinstance(node, dict) or "__tk__" in node:
        return {}
    found: dict[str, dict[str, Any]] = {}
    refs = _tensor_refs(node)
    if refs:
        found[path] = refs
    if depth < _MAX_DEPTH:
        for key, child in node.items():
            found.update(_tensor_dicts(child, f"{path}.{key}", depth + 1))
    return found


def _info(name: str, stored: dict[str, Any]) -> TensorInfo:
    shape = tuple(int(d) for d in stored.get("shape", ()))
    dtype = str(stored.get("dtype", "float32"))
    itemsize = getattr(torch, dtype).itemsize if hasattr(torch, dtype) else 0
    return TensorInfo(name, shape, dtype, numel(shape) * itemsize)


class _Text(str):
    """A description that prints as itself (no quotes) where values are repr()-ed."""

    def __repr__(self) -> str:
        return str(self)


def _describe(entry: dict[str, Any], tensors: dict[str, Any] | None = None) -> Any:
    """A non-module state entry for display: its value as plain Python values."""
    return _plain(entry.get("value"), tensors or {})


def _plain(value: Any, tensors: dict[str, Any]) -> Any:
    """A tagged JSON value as plain Python values, for display (read by ``inspect``).

    Tuples stay tuples, lists and sets become lists, tagged dicts dicts, namespaces
    ``argparse.Namespace``, non-finite floats floats; a tensor becomes its description
    (``tensor[3, 4] float32``) and other tagged values their tag, so no data is read.
    """
    if isinstance(value, list):
        return [_plain(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tag, items = value.get("__tk__"), value.get("items")
    if tag is None:
        return {k: _plain(v, tensors) for k, v in value.items()}
    if tag == "tuple" and isinstance(items, list):
        return tuple(_plain(v, tensors) for v in items)
    if tag in ("list", "set", "frozenset") and isinstance(items, list):
        return [_plain(v, tensors) for v in items]
    if tag == "dict" and isinstance(items, list):
        pairs = [p for p in items if isinstance(p, list) and len(p) == 2]
        return {_hashable(_plain(k, tensors)): _plain(v, tensors) for k, v in pairs}
    if tag == "namespace" and isinstance(value.get("fields"), dict):
        return argparse.Namespace(**_plain(value["fields"], tensors))
    if tag == "float" and isinstance(value.get("value"), str):
        return float(value["value"])
    if tag in ("dtype", "device", "path"):
        return _Text(str(value.get("value")))
    if tag == "tensor":
        stored = tensors.get(str(value.get("name")))
        if not isinstance(stored, dict):
            return _Text("tensor")
        return _Text(f"tensor{list(stored.get('shape', []))} {stored.get('dtype')}")
    return _Text(f"<{tag}>")


def _hashable(key: Any) -> Any:
    return key if isinstance(key, (str, int, float, bool)) or key is None else _Text(str(key))


class NativeFormat:
    """A folder holding ``checkpoint.json``."""

    name: str = "torchkeep-checkpoint"
    is_folder: bool = True

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and (path / MANIFEST).is_file()

    def open(self, path: Path, options: OpenOptions) -> Source:
        return NativeSource(path, options)

    def write(self, request: WriteRequest, path: Path) -> None:
        raise UnknownFormatError(
            "training checkpoints are written by torchkeep.save_checkpoint or a "
            "CheckpointManager, not by torchkeep.save"
        )


def referenced_tensors(node: Any) -> list[str]:
    """The stored tensor names a manifest node refers to (parts of composite tensors too),
    in the order a decode meets them."""
    found: list[str] = []
    pending = [node]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        elif isinstance(item, dict):
            if item.get(TAG) in ("tensor", "ndarray") and isinstance(item.get("name"), str):
                found.append(item["name"])
            else:
                pending.extend(reversed(list(item.values())))
    return list(dict.fromkeys(found))
