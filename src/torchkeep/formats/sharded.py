"""Sharded folders: several weight files plus a ``*.index.json`` weight map.

The layout is the one Hugging Face uses (``model.safetensors.index.json`` or
``pytorch_model.bin.index.json`` with ``{"metadata": {...}, "weight_map": {name: file}}``), so
folders written here load there and the other way round.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from torchkeep._common import group_by_size
from torchkeep._facts import TensorInfo
from torchkeep.errors import CheckpointNotFoundError, CorruptFileError, UnsafeFileError
from torchkeep.formats._base import OpenOptions, Source, Stretch, WriteRequest
from torchkeep.formats.safetensors import SafetensorsFormat, SafetensorsSource, check_storable
from torchkeep.io._sys import io_threads
from torchkeep.io.read import ReadExtent, read_extents
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.contain import check_name, member

SAFETENSORS_INDEX = "model.safetensors.index.json"
INDEX_SUFFIX = ".index.json"
_INDEX_PREFERENCE = (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")


def find_index(folder: Path) -> Path | None:
    """The folder's weight-map index file, preferring safetensors over torch shards.

    Raises:
        UnsafeFileError: the index is a symlink leading out of the folder.
    """
    for name in _INDEX_PREFERENCE:
        if _is_file(folder, name):
            return folder / name
    candidates = sorted(p for p in folder.glob("*" + INDEX_SUFFIX) if _is_file(folder, p.name))
    candidates.sort(key=lambda p: ".safetensors." not in p.name)
    return candidates[0] if candidates else None


def _is_file(folder: Path, name: str) -> bool:
    # Resolved inside the folder first: a symlink out of it is refused, never followed.
    return member(folder, name, path=str(folder), what="index", flat=True).is_file()


def _parse(raw: bytes, path: str) -> tuple[dict[str, str], dict[str, str]]:
    document = _json.loads(raw, path=path, what="index.json")
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptFileError(
            f'index {path!r} has no "weight_map" object mapping tensor names to files'
        )
    for shard in sorted(set(weight_map.values())):
        check_name(shard, path=path, what="shard", flat=True)
        if shard.endswith(INDEX_SUFFIX):
            raise UnsafeFileError(
                f"index {path!r} names another index, {shard!r}, as a shard; refusing it "
                "(an index may only name weight files)",
                path=path,
            )
    meta = document.get("metadata")
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return weight_map, metadata


def _read(index: Path) -> bytes:
    with open(index, "rb") as f:
        raw = f.read(_json.MAX_BYTES + 1)
    return raw


def parse_index(raw: bytes, *, path: str) -> dict[str, str]:
    """Validate a weight map; return ``{tensor name: shard file name}``.

    Every shard name must be a plain file name in the index's folder (no folders, no
    ``..``, not absolute) and must not be another index.

    Args:
        raw: the bytes of the ``*.index.json`` file.
        path: the index file, for messages.

    Raises:
        CorruptFileError: not a bounded, strict JSON object with a ``weight_map`` of strings.
        UnsafeFileError: a shard name that leads out of the folder or names an index.
    """
    return _parse(raw, path)[0]


def read_index(index: Path) -> dict[str, str]:
    """Read and validate the weight map of the ``*.index.json`` file ``index``."""
    return _parse(_read(index), str(index))[0]


class ShardedSource(Source):
    """A folder of shards behind one weight map; shards are opened on first use."""

    def __init__(
        self, index: Path, options: OpenOptions, opener: Callable[[Path, OpenOptions], Source]
    ) -> None:
        super().__init__(str(index.parent), "sharded")
        self._index = index
        self._weight_map, self.metadata = _parse(_read(index), str(index))
        self._options = options
        self._opener = opener
        self._shards: dict[str, Source] = {}
        self._files = {
            shard: self._shard_file(shard) for shard in sorted(set(self._weight_map.values()))
        }
        missing = [shard for shard, file in self._files.items() if file is None]
        if missing:
            raise CheckpointNotFoundError(
                f"sharded checkpoint {self.path!r} is incomplete: its index {index.name} lists "
                f"shard files that do not exist: {', '.join(missing)}"
            )
        infos: dict[str, TensorInfo] = {}
        aliases: dict[str, str] = {}
        for shard_name in sorted(set(self._weight_map.values())):
            shard = self._shard(shard_name)
            shard_entries = shard.entries()
            tensors = shard_entries.get("", next(iter(shard_entries.values()), {}))
            for name, file in self._weight_map.items():
                if file != shard_name:
                    continue
                if name not in tensors:
                    raise CorruptFileError(
                        f"index {index.name} in {self.path!r} places tensor {name!r} in "
                        f"{shard_name}, but that shard does not hold it"
                    )
                infos[name] = tensors[name]
            aliases.update(shard.aliases(""))
        self._entries = {"": {name: infos[name] for name in self._weight_map}}
        self._aliases = {"": aliases}

    def _shard_file(self, shard: str) -> Path | None:
        """The shard's real path, checked to be a weight file inside the folder; None: absent."""
        where = str(self._index)
        file = member(self._index.parent, shard, path=where, what="shard", flat=True)
        if file.name.endswith(INDEX_SUFFIX) or file == Path(os.path.realpath(self._index)):
            raise UnsafeFileError(
                f"index {where!r} names shard {shard!r}, which is an index; refusing it",
                path=where,
            )
        if file.is_dir():
            raise UnsafeFileError(
                f"index {where!r} names shard {shard!r}, which is a folder, not a weight file; "
                "refusing it",
                path=where,
            )
        return file if file.is_file() else None

    def _shard(self, file: str) -> Source:
        if file not in self._shards:
            path = self._files.get(file)
            if path is None:
                raise CheckpointNotFoundError(f"shard {file!r} of {self.path!r} does not exist")
            self._shards[file] = self._opener(path, self._options)
        return self._shards[file]

    def _entry_of(self, shard: Source) -> str:
        entries = shard.entries()
        return "" if "" in entries else next(iter(entries))

    def get(self, entry: str, name: str) -> torch.Tensor:
        shard = self._shard(self._weight_map[name])
        return shard.get(self._entry_of(shard), name)

    def stretch(self, entry: str, name: str) -> Stretch | None:
        """Where ``name``'s bytes lie in the shard that holds it (see :meth:`Source.stretch`)."""
        shard = self._shard(self._weight_map[name])
        return shard.stretch(self._entry_of(shard), name)

    def read_into(self, entry: str, name: str, dest: torch.Tensor) -> None:
        shard = self._shard(self._weight_map[name])
        shard.read_into(self._entry_of(shard), name, dest)
        if self.progress is not None:
            self.progress(dest.nbytes)

    def read_into_many(
        self, entry: str, pairs: Sequence[tuple[str, torch.Tensor]], *, verify: bool = False
    ) -> None:
        """Read the pairs in one parallel read across the shards; with ``verify``, hash each
        tensor as it lands and then check every shard's other tensors."""
        by_shard: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for name, dest in pairs:
            by_shard.setdefault(self._weight_map[name], []).append((name, dest))
        extents: list[ReadExtent] = []
        rest: list[tuple[str, torch.Tensor]] = []
        read: dict[str, set[str]] = {}
        for file, wanted in by_shard.items():
            shard = self._shard(file)
            if isinstance(shard, SafetensorsSource):
                direct, others = shard.plan_reads(wanted, verify=verify)
                extents += direct
                rest += others
                read[file] = {extent.name for extent in direct}
            else:
                rest += wanted
        # One parallel read across every shard, so the threads stay busy to the end.
        read_extents(extents, progress=self.progress)
        for name, dest in rest:
            self.read_into(entry, name, dest)
        if verify:
            self._verify_unread(read)

    def read_many(
        self, entry: str, names: Iterable[str], *, verify: bool = False
    ) -> dict[str, torch.Tensor]:
        """Read ``names`` into new tensors, in one parallel read across the shards.

        With ``verify``, each tensor is hashed as it lands, then every shard's other tensors
        are checked (see :meth:`SafetensorsSource.read_many`).
        """
        wanted = list(dict.fromkeys(names))
        if self._options.meta:
            return {name: self.get(entry, name) for name in wanted}
        by_shard: dict[str, list[str]] = {}
        for name in wanted:
            by_shard.setdefault(self._weight_map[name], []).append(name)
        found: dict[str, torch.Tensor] = {}
        extents: list[ReadExtent] = []
        read: dict[str, set[str]] = {}
        planned: list[tuple[SafetensorsSource, list[str]]] = []
        for file, group in by_shard.items():
            shard = self._shard(file)
            if isinstance(shard, SafetensorsSource):
                tensors, reads = shard.plan_many(group, verify=verify)
                found.update(tensors)
                extents += reads
                read[file] = {extent.name for extent in reads}
                planned.append((shard, group))
        read_extents(extents, progress=self.progress)
        if verify:
            self._verify_unread(read)
        for shard, group in planned:
            found.update(shard.place({name: found[name] for name in group}))
        return {name: found[name] if name in found else self.get(entry, name) for name in wanted}

    def verify(self, entry: str | None = None) -> None:
        self._verify_unread({})

    def _verify_unread(self, read: dict[str, set[str]]) -> None:
        """Check every shard's checksums but those of the tensors in ``read`` (by shard)."""
        for file in sorted(set(self._weight_map.values())):
            shard = self._shard(file)
            if isinstance(shard, SafetensorsSource):
                shard.verify_unread(read.get(file, set()))
            else:
                shard.verify()

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()


class ShardedFormat:
    """A folder holding ``*.index.json`` and its shards."""

    name: str = "sharded"
    is_folder: bool = True

    def __init__(self, opener: Callable[[Path, OpenOptions], Source]) -> None:
        self._opener = opener

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and find_index(path) is not None

    def open(self, path: Path, options: OpenOptions) -> Source:
        index = find_index(path) if path.is_dir() else path
        if index is None:
            raise CheckpointNotFoundError(f"{str(path)!r} holds no *.index.json weight map")
        return ShardedSource(index, options, self._opener)

    def write(self, request: WriteRequest, path: Path) -> None:
        for name, tensor in request.tensors.items():
            check_storable(name, tensor)  # before any shard is started
        stored = [n for n in request.ordered_names() if n not in request.aliases]
        sizes = [
            (n, request.tensors[n].numel() * request.tensors[n].element_size()) for n in stored
        ]
        groups = group_by_size(sizes, request.max_shard_bytes) or [[]]
        count = len(groups)
        weight_map: dict[str, str] = {}
        writer = SafetensorsFormat()
        shards: list[tuple[WriteRequest, Path]] = []
        for number, names in enumerate(groups, start=1):
            file = f"model-{number:05d}-of-{count:05d}.safetensors"
            local = set(names)
            aliases = {a: t for a, t in request.aliases.items() if t in local}
            shard = WriteRequest(
                tensors={n: request.tensors[n] for n in names},
                aliases=aliases,
                metadata=request.metadata,
                durable=request.durable,
                progress=request.progress,
            )
            shards.append((shard, path / file))
            weight_map.update({n: file for n in [*names, *aliases]})
        # Shards side by side: writes to one file take turns on its inode lock, writes to
        # different files do not. Largest first, so that the last one to start is short.
        shards.sort(key=lambda shard: -sum(t.nbytes for t in shard[0].tensors.values()))
        with ThreadPoolExecutor(min(io_threads(), len(shards)), "torchkeep-shard") as pool:
            for done in [pool.submit(writer.write, *shard) for shard in shards]:
                done.result()
        total = sum(t.numel() * t.element_size() for t in request.tensors.values())
        index: dict[str, Any] = {
            "metadata": {"total_size": total, **request.metadata},
            "weight_map": {n: weight_map[n] for n in request.ordered_names()},
        }
        (path / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
