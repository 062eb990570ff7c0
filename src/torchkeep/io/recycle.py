"""Retired checkpoint files, kept so the next save can overwrite them instead of new files.

Filling a new file makes the kernel allocate (and, in a VM, often fault in) fresh page-cache
pages and the filesystem allocate fresh blocks; overwriting a file of about the same size
reuses both, and measures several times faster. A :class:`RecycleBin` holds the shard files of
the checkpoints that retention deleted last, under a hidden folder, until the next save takes
them.

Only files with a single link are kept: a shard hard-linked into another checkpoint (see
:mod:`torchkeep.training.shards`) still belongs to that checkpoint and is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from pathlib import Path

BIN_NAME = ".recycle.torchkeep"


class RecycleBin:
    """A hidden folder of files waiting to be overwritten.

    Args:
        folder: the bin (created on first use); it must be on the same filesystem as the
            checkpoints, so that files move in and out by rename.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()

    def _files(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            with contextlib.suppress(OSError):
                stat = path.lstat()
                if path.is_file() and not path.is_symlink() and stat.st_nlink == 1:
                    found.append((stat.st_size, path))
        return sorted(found)

    @property
    def nbytes(self) -> int:
        """The bytes held."""
        return sum(size for size, _ in self._files())

    def retire(self, checkpoint: Path) -> None:
        """Move the shard files of ``checkpoint``, which is being deleted, into the bin.

        Files that other checkpoints share through hard links stay where they are, and are
        deleted with the checkpoint's folder (which only drops this one link).
        """
        with self._lock:
            for path in checkpoint.glob("*.safetensors"):
                with contextlib.suppress(OSError):
                    if path.is_symlink() or path.lstat().st_nlink != 1:
                        continue
                    self.folder.mkdir(exist_ok=True)
                    os.replace(path, self.folder / f"{uuid.uuid4().hex}.bin")

    def take(self, size: int, destination: Path) -> bool:
        """Move a file into place at ``destination`` for a file of ``size`` bytes.

        The smallest file at least as large is taken, else the largest; the writer cuts or
        extends it to length. Returns False when the bin is empty.
        """
        with self._lock:
            files = self._files()
            if not files:
                return False
            fitting = [f for f in files if f[0] >= size]
            _, chosen = fitting[0] if fitting else files[-1]
            try:
                os.replace(chosen, destination)
            except OSError:
                return False
            return True

    def clear(self) -> None:
        """Delete every file held."""
        with self._lock:
            shutil.rmtree(self.folder, ignore_errors=True)
