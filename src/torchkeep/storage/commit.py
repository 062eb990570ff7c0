"""The commit protocol: how a checkpoint folder becomes visible whole, or not at all.

A reader counts a folder as a checkpoint only once it holds a commit marker
(``checkpoint.json``, ``torchkeep-dcp.json``, or a sharded file's ``*.index.json``). Two ways
of getting there, chosen by where the bytes go:

- **rename-last** (local and shared filesystems): every file is written into a hidden sibling
  folder and fsynced, then the folder is renamed into place in one step. An older folder at
  the same path is moved aside first and removed only after the new one is in place.
- **marker-last** (fsspec URLs: object stores cannot rename a folder atomically): an older
  folder at the URL is uncommitted first (its markers deleted before anything else), the
  files are written in place, and the markers last. Deleting removes the markers first.

Either way a writer that dies mid-save leaves no marker: the previous checkpoint stays the
latest, and the torn folder is never listed or restored. :func:`folder` serves writers that
write into the destination themselves (distributed saves, where every rank writes its own
files); :func:`uploaded` serves writers that need a local folder (native checkpoints, sharded
safetensors), uploading it marker-last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torchkeep._common import COMMIT_MARKERS
from torchkeep.storage.local import atomic_dir
from torchkeep.storage.remote import RemoteFolder, is_remote, split_url

Location = Path | str


class FolderCommit:
    """A checkpoint folder being written: its files go to :attr:`where`, its markers last.

    Attributes:
        where: the local path or URL the files are written to (locally a hidden temporary
            folder, renamed into place when the commit ends).
    """

    def __init__(self, where: Location, remote: RemoteFolder | None = None, name: str = "") -> None:
        self.where = where
        self._remote = remote
        self._name = name

    def mark(self, name: str, data: bytes) -> None:
        """Write the commit marker ``name``; call it after every other file is written."""
        if self._remote is not None:
            # One PUT: on object stores the marker appears whole or not at all.
            self._remote.write_bytes(f"{self._name}/{name}", data)
            return
        with open(Path(self.where) / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def folder(
    location: Location, options: Mapping[str, Any] | None = None, *, durable: bool = True
) -> Iterator[FolderCommit]:
    """Commit the folder at ``location`` (a path or an fsspec URL) when the block ends.

    Locally (rename-last) the block writes into a hidden temporary folder that replaces
    ``location`` on success and is removed on failure. At a URL (marker-last) an older folder
    there is uncommitted first, and the block's :meth:`FolderCommit.mark` is the commit.
    """
    if isinstance(location, Path) or not is_remote(location):
        with atomic_dir(location, durable=durable) as temp:
            yield FolderCommit(temp)
        return
    parent, name = split_url(str(location))
    remote = RemoteFolder(parent, options)
    withdraw(remote, name)
    yield FolderCommit(location, remote, name)


def withdraw(remote: RemoteFolder, name: str, markers: tuple[str, ...] = COMMIT_MARKERS) -> None:
    """Delete the folder ``name`` at a URL, its commit markers first (marker-last's delete)."""
    remote.remove(name, markers=markers)


@contextlib.contextmanager
def uploaded(url: str, options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """A local scratch path to write; on success it is published at ``url``, markers last.

    A single file is one upload (it appears whole or not at all). A folder is published
    marker-last: the older folder at the URL is uncommitted first, then every other file is
    uploaded, then the markers.
    """
    parent, name = split_url(url)
    remote = RemoteFolder(parent, options)
    scratch = Path(tempfile.mkdtemp(prefix="torchkeep-"))
    try:
        local = scratch / name
        yield local
        if not local.is_dir():
            remote.upload(local, name)
            return
        markers = tuple(p.name for p in local.iterdir() if p.name.endswith(".index.json"))
        markers += COMMIT_MARKERS
        withdraw(remote, name, markers)
        remote.upload(local, name, last=markers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = ["FolderCommit", "Location", "folder", "uploaded", "withdraw"]
