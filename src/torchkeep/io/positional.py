"""Reads and writes at a file offset, on every platform, straight into and out of memory.

Three ways, the best the platform has chosen once at import:

- ``vectored``: ``os.preadv``/``os.pwritev`` (Linux, BSDs, macOS 11+): several buffers in one
  call, any number of threads on one file, no copy;
- ``positional``: ``os.pread``/``os.pwrite`` (Unix without the vectored calls): one buffer a
  call, threads side by side; writes go straight from memory, reads through one copy
  (``os.pread`` returns new bytes);
- ``seek``: a per-file lock around ``lseek`` and a read into the buffer or a write from it
  (Windows, which has none of the calls above): no copy, one call at a time per file.

``TORCHKEEP_IO_MODE`` (``vectored``, ``positional`` or ``seek``) forces one, for tests and
benchmarks; a mode the platform lacks is refused. :data:`BINARY` is the flag every
``os.open`` needs for byte-exact files on Windows (0 elsewhere).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence

from torchkeep.errors import InvalidArgumentError

BINARY: int = getattr(os, "O_BINARY", 0)
CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)  # Windows has no such flag (nor the need)
MODES = ("vectored", "positional", "seek")


def _available() -> list[str]:
    found = []
    if hasattr(os, "preadv") and hasattr(os, "pwritev"):
        found.append("vectored")
    if hasattr(os, "pread") and hasattr(os, "pwrite"):
        found.append("positional")
    found.append("seek")
    return found


def choose(requested: str | None = None) -> str:
    """The mode to use: ``requested`` (or ``TORCHKEEP_IO_MODE``), else the best available.

    Raises:
        InvalidArgumentError: an unknown mode, or one this platform lacks.
    """
    wanted = requested or os.environ.get("TORCHKEEP_IO_MODE", "") or None
    available = _available()
    if wanted is None:
        return available[0]
    if wanted not in MODES:
        raise InvalidArgumentError(
            f"TORCHKEEP_IO_MODE={wanted!r} is not a mode; choose one of {', '.join(MODES)}"
        )
    if wanted not in available:
        raise InvalidArgumentError(
            f"TORCHKEEP_IO_MODE={wanted!r} needs calls this platform lacks; it has "
            f"{', '.join(available)}"
        )
    return wanted


MODE = choose()

_locks: dict[int, threading.Lock] = {}
_locks_lock = threading.Lock()


def _lock(fd: int) -> threading.Lock:
    with _locks_lock:
        found = _locks.get(fd)
        if found is None:
            found = _locks[fd] = threading.Lock()
        return found


PREAD_PIECE = 4 << 20
"""Most bytes one ``os.pread`` returns in the ``positional`` mode."""


def readv(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """Read into ``views`` back to back from ``offset``; return the bytes read (may be short)."""
    if MODE == "vectored":
        return os.preadv(fd, views, offset)
    done = 0
    for view in views:
        if MODE == "positional":
            # os.pread returns new bytes: in pieces small enough for the allocator to reuse
            # the same memory, rather than map (and fault in) fresh pages for every call.
            got = 0
            while got < view.nbytes:
                data = os.pread(fd, min(PREAD_PIECE, view.nbytes - got), offset + done + got)
                view[got : got + len(data)] = data
                got += len(data)
                if not data:
                    break
        else:
            with _lock(fd):
                os.lseek(fd, offset + done, os.SEEK_SET)
                got = io.FileIO(fd, closefd=False).readinto(view) or 0
        done += got
        if got < view.nbytes:
            break
    return done


def writev(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """Write ``views`` back to back from ``offset``; return the bytes written (may be short)."""
    if MODE == "vectored":
        return os.pwritev(fd, views, offset) if len(views) > 1 else os.pwrite(fd, views[0], offset)
    done = 0
    for view in views:
        if MODE == "positional":
            written = os.pwrite(fd, view, offset + done)
        else:
            with _lock(fd):
                os.lseek(fd, offset + done, os.SEEK_SET)
                written = os.write(fd, view)
        done += written
        if written < view.nbytes:
            break
    return done


def read_at(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes from ``offset`` (fewer at the end of the file)."""
    buffer = bytearray(size)
    got = readv(fd, [memoryview(buffer)], offset)
    return bytes(buffer[:got])


__all__ = ["BINARY", "CLOEXEC", "MODE", "MODES", "choose", "read_at", "readv", "writev"]
