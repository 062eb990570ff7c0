"""Where a CheckpointManager's step folders live: a local folder or an fsspec URL.

A step folder is committed when it holds a commit marker: ``checkpoint.json`` (native
checkpoints) or ``torchkeep-dcp.json`` (distributed ones), written by the commit protocol of
:mod:`torchkeep.storage.commit` (rename-last locally, marker-last on object stores). A step
folder without a marker is torn: never listed, never restored, removed by the next save.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torchkeep._common import COMMIT_MARKERS, DCP_MARKER, MANIFEST
from torchkeep.errors import CorruptFileError, TorchkeepError, TorchkeepWarning
from torchkeep.formats.manifest import plain_number, read_manifest
from torchkeep.io.recycle import RecycleBin
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.contain import member
from torchkeep.storage.commit import uploaded, withdraw
from torchkeep.storage.local import is_leftover, retire
from torchkeep.storage.remote import RemoteFolder, downloaded
from torchkeep.training.retention import Checkpoint

if TYPE_CHECKING:
    from torchkeep.training.checkpoint import Snapshot

STEP_DIR = re.compile(r"step-(\d+)")
Location = Path | str
Writer = Callable[..., Path]


def _parse_marker(raw: bytes, where: str) -> dict[str, Any]:
    record = _json.loads(raw, path=where, what="commit marker")
    if not isinstance(record, dict):
        raise CorruptFileError(f"commit marker {where!r} is not a JSON object")
    return record


def step_name(step: int) -> str:
    """``step-00000120``."""
    return f"step-{step:08d}"


class Steps(Protocol):
    """The storage operations a manager needs."""

    def location(self, step: int) -> Location: ...

    def committed(self) -> list[tuple[int, Location]]: ...

    def record(self, location: Location) -> dict[str, Any]: ...

    def is_distributed(self, location: Location) -> bool: ...

    def write_native(
        self, snapshot: Snapshot, step: int, max_shard_size: int | str, writer: Writer
    ) -> Location: ...

    def prepare(self, step: int) -> None: ...

    def torn(self) -> list[Location]: ...

    def remove_torn(self) -> None: ...

    def delete(self, location: Location) -> None: ...

    def local_copy(self, location: Location) -> contextlib.AbstractContextManager[Path]: ...


class LocalSteps:
    """Step folders in a local (or shared, for distributed runs) folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
        # Set by CheckpointManager(recycle=True): deleted checkpoints' files are kept there.
        self.recycle: RecycleBin | None = None

    def location(self, step: int) -> Path:
        return self.directory / step_name(step)

    def _marker(self, folder: Path) -> Path | None:
        for name in (MANIFEST, DCP_MARKER):
            if (folder / name).is_file():
                return folder / name
        return None

    def committed(self) -> list[tuple[int, Location]]:
        if not self.directory.is_dir():
            return []
        found: list[tuple[int, Location]] = []
        for entry in self.directory.iterdir():
            match = STEP_DIR.fullmatch(entry.name)
            # Without a marker a folder was never committed: it is torn, not a step.
            if match and self._marker(entry) is not None:
                found.append((int(match.group(1)), entry))
        return sorted(found, key=lambda item: item[0])

    def record(self, location: Location) -> dict[str, Any]:
        folder = Path(location)
        marker = self._marker(folder)
        if marker is None:
            raise CorruptFileError(f"{str(folder)!r} is not a committed checkpoint")
        marker = member(folder, marker.name, path=str(folder), what="marker", flat=True)
        stat = marker.stat()
        key = (stat.st_ino, stat.st_mtime_ns)
        cached = self._cache.get(str(folder))
        if cached is not None and cached[0] == key:
            return cached[1]
        if marker.name == MANIFEST:
            record = read_manifest(folder)
        else:
            record = _parse_marker(marker.read_bytes(), str(marker))
        self._cache[str(folder)] = (key, record)
        return record

    def is_distributed(self, location: Location) -> bool:
        return (Path(location) / DCP_MARKER).is_file()

    def prepare(self, step: int) -> None:
        target = self.location(step)
        if target.is_dir() and self._marker(target) is None:
            shutil.rmtree(target)  # a torn folder of this step: never a checkpoint

    def write_native(
        self,
        snapshot: Snapshot,
        step: int,
        max_shard_size: int | str,
        writer: Writer,
    ) -> Location:
        self.prepare(step)
        target = self.location(step)
        if (target / DCP_MARKER).is_file():
            # A distributed checkpoint of this step is replaced by a native one: it goes out
            # of sight first, so the step is never a mix of both.
            self.delete(target)
        return writer(snapshot, target, max_shard_size=max_shard_size)

    def torn(self) -> list[Location]:
        if not self.directory.is_dir():
            return []
        found: list[Location] = []
        for entry in sorted(self.directory.iterdir()):
            hidden = is_leftover(entry, "step-")
            torn = STEP_DIR.fullmatch(entry.name) and self._marker(entry) is None
            if (hidden or torn) and entry.is_dir():
                found.append(entry)
        return found

    def remove_torn(self) -> None:
        for entry in self.torn():
            shutil.rmtree(entry, ignore_errors=True)

    def delete(self, location: Location) -> None:
        path = Path(location)
        # Renamed out of sight first, so a crash mid-deletion never leaves a torn step folder.
        try:
            hidden = retire(path)
        except OSError as exc:
            warnings.warn(
                f"retention could not delete {path}: {exc}", TorchkeepWarning, stacklevel=2
            )
            return
        if self.recycle is not None:
            self.recycle.retire(hidden)
        shutil.rmtree(hidden, ignore_errors=True)
        self._cache.pop(str(path), None)

    @contextlib.contextmanager
    def local_copy(self, location: Location) -> Iterator[Path]:
        yield Path(location)


class RemoteSteps:
    """Step folders under an fsspec URL (``s3://bucket/run``): commit marker written last."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.folder = RemoteFolder(url, options)
        self._cache: dict[str, dict[str, Any]] = {}

    def location(self, step: int) -> str:
        return self.folder.url_of(step_name(step))

    def _markers(self) -> dict[str, str]:
        """``{step folder name: its marker file name}`` for every committed step."""
        fs, root = self.folder.fs, self.folder.root
        fs.invalidate_cache(root)
        try:
            files = fs.find(root, maxdepth=2)
        except FileNotFoundError:
            return {}
        found: dict[str, str] = {}
        for file in files:
            parts = str(file)[len(root.rstrip("/")) + 1 :].split("/")
            if len(parts) == 2 and STEP_DIR.fullmatch(parts[0]) and parts[1] in COMMIT_MARKERS:
                found.setdefault(parts[0], parts[1])
        return found

    def committed(self) -> list[tuple[int, Location]]:
        found: list[tuple[int, Location]] = []
        for name in self._markers():
            match = STEP_DIR.fullmatch(name)
            assert match is not None
            found.append((int(match.group(1)), self.folder.url_of(name)))
        return sorted(found, key=lambda item: item[0])

    def _name(self, location: Location) -> str:
        return str(location).rstrip("/").rsplit("/", 1)[-1]

    def record(self, location: Location) -> dict[str, Any]:
        name = self._name(location)
        if name not in self._cache:
            marker = self._markers().get(name)
            if marker is None:
                raise CorruptFileError(f"{str(location)!r} is not a committed checkpoint")
            where = f"{location}/{marker}"
            self._cache[name] = _parse_marker(self.folder.read_bytes(f"{name}/{marker}"), where)
        return self._cache[name]

    def is_distributed(self, location: Location) -> bool:
        return self.folder.exists(f"{self._name(location)}/{DCP_MARKER}")

    def prepare(self, step: int) -> None:
        name = step_name(step)
        self._cache.pop(name, None)
        withdraw(self.folder, name)

    def write_native(
        self,
        snapshot: Snapshot,
        step: int,
        max_shard_size: int | str,
        writer: Writer,
    ) -> Location:
        location = self.location(step)
        self._cache.pop(step_name(step), None)
        # Shards first, checkpoint.json last: until it is uploaded the step is not committed.
        with uploaded(location, self.folder.options) as local:
            writer(snapshot, local, max_shard_size=max_shard_size)
        return location

    def torn(self) -> list[Location]:
        committed = self._markers()
        return [
            self.folder.url_of(name)
            for name in self.folder.children()
            if STEP_DIR.fullmatch(name) and name not in committed
        ]

    def remove_torn(self) -> None:
        for location in self.torn():
            self.folder.remove(self._name(location))

    def delete(self, location: Location) -> None:
        name = self._name(location)
        self._cache.pop(name, None)
        withdraw(self.folder, name)

    @contextlib.contextmanager
    def local_copy(self, location: Location) -> Iterator[Path]:
        with downloaded(str(location), self.folder.options) as local:
            yield local


def checkpoints(steps: Steps) -> list[Checkpoint]:
    """Every committed checkpoint with its step, location and saved metrics (needs no torch).

    A metric that is not a number, or a marker that cannot be read, leaves the checkpoint
    with fewer (or no) metrics: it is then kept or dropped by its step alone.
    """
    found: list[Checkpoint] = []
    for step, location in steps.committed():
        try:
            raw = steps.record(location).get("metrics") or {}
        except (OSError, ValueError, TorchkeepError):
            raw = {}
        metrics: dict[str, float] = {}
        if isinstance(raw, dict):
            for name, node in raw.items():
                value = plain_number(node)
                if value is not None:
                    metrics[str(name)] = value
        found.append(Checkpoint(step, location, metrics))
    return found
