"""Positional writes of tensor bytes, files side by side, checksummed as they go out.

A file is described up front by a :class:`FilePlan`: where every tensor's bytes go and how
large the header is. The header's size is known before any checksum is (xxh3 digests are
always 16 hex digits), so the data is written first, straight from tensor memory with
``pwritev`` at fixed offsets, and the header is built from the finished checksums and written
last into the space left for it. Nothing is staged in an intermediate buffer. A new file's
blocks are reserved before the first write (``fallocate``), which makes the copies into the
page cache cheaper and refuses a full disk before any byte is copied.

Checksums are computed as the bytes go out: each writer hashes a chunk just before it writes
it, so the copy into the page cache finds the bytes still in the CPU cache.

Several files (the shards of a checkpoint) are written by several threads at once, one thread
per file: a buffered write holds the file's inode lock on Linux filesystems, so two threads
writing one file only take turns, while two files measure nearly twice as fast.

Small writes (a few MB in all) go through one thread and plain ``os.write`` in file order:
there, starting threads costs more than it saves."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from torchkeep.io._sys import IOV_MAX, io_threads, reserve_space, start_writeback
from torchkeep.io.positional import BINARY, CLOEXEC, writev

CHUNK = 4 << 20
"""Bytes per write call: enough to amortise the call, few enough to stay cached after hashing."""
GROUP = 1 << 20
"""Tensors smaller than this are gathered with their neighbours into one ``pwritev``."""
SEQUENTIAL_BELOW = 8 << 20
"""Below this many bytes in all, one thread writes everything in order."""
KICK = 32 << 20
"""For durable writes, writeback of a file is started every this many bytes."""
HASH_PIECE = 1 << 20
"""Bytes hashed per call: the longest a hashing thread keeps others from the GIL."""

# Called with a byte count as bytes are done (see torchkeep._progress).
Counter = Callable[[int], None]


@dataclass(frozen=True)
class Slot:
    """One tensor's bytes and where they go in the file.

    Attributes:
        name: the tensor's name, the key of its checksum.
        data: its bytes (a flat byte view of the tensor's own memory).
        offset: the absolute file offset of its first byte.
    """

    name: str
    data: memoryview
    offset: int


@dataclass
class FilePlan:
    """Everything needed to write one file.

    Attributes:
        path: the file; created (it must not exist) unless ``reuse``.
        header_size: bytes reserved at offset 0 for the header.
        make_header: builds the header from ``{name: xxh3 hex}``; it must return exactly
            ``header_size`` bytes.
        slots: the tensors, in file order, packed from ``header_size`` on.
        known: checksums computed earlier; those tensors are not hashed again.
        reuse: ``path`` is an existing file (a recycled one) to overwrite in place and cut to
            length, which skips allocating fresh page-cache pages.
    """

    path: Path
    header_size: int
    make_header: Callable[[Mapping[str, str]], bytes]
    slots: Sequence[Slot]
    known: Mapping[str, str] = field(default_factory=dict)
    reuse: bool = False

    @property
    def size(self) -> int:
        """The file's final size in bytes."""
        return self.header_size + sum(slot.data.nbytes for slot in self.slots)

    def header(self, checksums: Mapping[str, str]) -> bytes:
        raw = self.make_header(checksums)
        if len(raw) != self.header_size:  # a planning bug, never a disk problem
            raise AssertionError(
                f"header of {self.path} is {len(raw)} bytes, {self.header_size} were reserved"
            )
        return raw


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written."""
    while data:
        written = os.write(fd, data)
        if written <= 0:
            raise OSError(errno.EIO, "os.write wrote nothing")
        data = data[written:]


def pwrite_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Write ``views`` back to back from ``offset``, finishing short writes."""
    views = [v for v in views if v.nbytes]
    if not views:
        return
    done = writev(fd, views, offset)
    for view in views:
        if done >= view.nbytes:
            done -= view.nbytes
            offset += view.nbytes
            continue
        rest, offset, done = view[done:], offset + done, 0
        while rest:
            written = writev(fd, [rest], offset)
            if written <= 0:
                raise OSError(errno.EIO, "a positional write wrote nothing")
            rest, offset = rest[written:], offset + written


def _open(plan: FilePlan, touched: list[Path]) -> int:
    """Open the plan's file for writing; a new one is created with its blocks reserved."""
    if plan.reuse:
        fd = os.open(plan.path, os.O_WRONLY | CLOEXEC | BINARY)
    else:
        fd = os.open(plan.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | CLOEXEC | BINARY, 0o644)
    touched.append(plan.path)
    if reserve_space is not None and not plan.reuse and plan.size >= SEQUENTIAL_BELOW:
        try:
            reserve_space(fd, plan.size)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _with_path(exc: BaseException, path: Path) -> BaseException:
    if isinstance(exc, OSError) and not exc.filename:
        exc.filename = str(path)
    return exc


# ------------------------------------------------------------------------------ sequential


def _write_sequential(
    plan: FilePlan, touched: list[Path], counted: Counter | None = None
) -> dict[str, str]:
    checksums = {
        slot.name: plan.known.get(slot.name) or xxhash.xxh3_64_hexdigest(slot.data)
        for slot in plan.slots
    }
    header = plan.header(checksums)
    fd = _open(plan, touched)
    try:
        write_all(fd, memoryview(header))
        for slot in plan.slots:
            write_all(fd, slot.data)
            if counted is not None:
                counted(slot.data.nbytes)
        if plan.reuse:
            os.ftruncate(fd, plan.size)
    except BaseException as exc:
        raise _with_path(exc, plan.path) from None
    finally:
        os.close(fd)
    return checksums


# -------------------------------------------------------------------------------- parallel


@dataclass
class _Step:
    """Bytes written back to back from ``offset`` with one call; ``hashers[i]`` (if any) is the
    checksum ``views[i]`` belongs to."""

    offset: int
    views: list[memoryview] = field(default_factory=list)
    hashers: list[xxhash.xxh3_64 | None] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.offset + sum(view.nbytes for view in self.views)


def _hash(hasher: xxhash.xxh3_64, view: memoryview) -> None:
    # xxhash holds the GIL while it hashes: in pieces, another writer whose write call
    # returns waits at most one piece for it.
    for start in range(0, view.nbytes, HASH_PIECE):
        hasher.update(view[start : start + HASH_PIECE])


def _file_steps(plan: FilePlan, hashers: Mapping[str, xxhash.xxh3_64 | None]) -> list[_Step]:
    steps: list[_Step] = []
    group: _Step | None = None  # the open run of small tensors
    for slot in plan.slots:
        hasher = hashers[slot.name]
        if slot.data.nbytes < GROUP:
            if (
                group is None
                or group.end != slot.offset
                or group.end - group.offset >= CHUNK
                or len(group.views) >= IOV_MAX
            ):
                group = _Step(slot.offset)
                steps.append(group)
            group.views.append(slot.data)
            group.hashers.append(hasher)
            continue
        group = None
        for start in range(0, slot.data.nbytes, CHUNK):
            view = slot.data[start : start + CHUNK]
            steps.append(_Step(slot.offset + start, [view], [hasher]))
    return steps


class _Writer:
    """Threads that each write whole files, hashing every chunk just before writing it.

    One file never has two writers: a buffered write holds the file's inode lock, so a second
    writer would only wait for it; files, though, are written side by side. Hashing a chunk
    right before writing it leaves the chunk in the CPU cache for the copy into the page
    cache, which measured as fast as hashing in a thread beside the writer, with one thread
    fewer (see docs/performance.md).
    """

    def __init__(
        self,
        plans: Sequence[FilePlan],
        fds: list[int],
        hashers: list[dict[str, xxhash.xxh3_64 | None]],
        durable: bool,
        counted: Counter | None = None,
    ) -> None:
        self._counted = counted
        self._plans = plans
        self._fds = fds
        self._steps = [_file_steps(p, h) for p, h in zip(plans, hashers, strict=True)]
        # Largest first, so that the last file to start is a short one.
        self._files = sorted(range(len(plans)), key=lambda i: -plans[i].size)
        self._durable = durable and start_writeback is not None
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def _take_file(self) -> int | None:
        with self._lock:
            if self.error is not None or not self._files:
                return None
            return self._files.pop(0)

    def run(self) -> None:
        file: int | None = None
        try:
            while (file := self._take_file()) is not None:
                self._write(file)
        except BaseException as exc:
            with self._lock:
                if self.error is None:
                    path = self._plans[file].path if file is not None else self._plans[0].path
                    self.error = _with_path(exc, path)

    def _write(self, file: int) -> None:
        fd = self._fds[file]
        kicked = 0
        for step in self._steps[file]:
            if self.error is not None:
                return  # another thread failed: the whole write is abandoned
            for view, hasher in zip(step.views, step.hashers, strict=True):
                if hasher is not None:
                    _hash(hasher, view)
            pwrite_all(fd, step.views, step.offset)
            if self._counted is not None:
                self._counted(step.end - step.offset)
            if self._durable and start_writeback is not None and step.end - kicked >= KICK:
                # The file is written front to back: start writing out what is behind us.
                start_writeback(fd, kicked, step.end - kicked)
                kicked = step.end


def _write_parallel(
    plans: Sequence[FilePlan],
    threads: int,
    durable: bool,
    touched: list[Path],
    counted: Counter | None = None,
) -> list[dict[str, str]]:
    fds: list[int] = []
    try:
        for plan in plans:
            try:
                fds.append(_open(plan, touched))
            except BaseException as exc:
                raise _with_path(exc, plan.path) from None
        hashers: list[dict[str, xxhash.xxh3_64 | None]] = [
            {s.name: None if s.name in plan.known else xxhash.xxh3_64() for s in plan.slots}
            for plan in plans
        ]
        writer = _Writer(plans, fds, hashers, durable, counted)
        helpers = [
            threading.Thread(target=writer.run, name=f"torchkeep-write-{i}", daemon=True)
            for i in range(min(threads, len(plans)) - 1)
        ]
        for helper in helpers:
            helper.start()
        writer.run()
        for helper in helpers:
            helper.join()
        if writer.error is not None:
            raise writer.error
        results: list[dict[str, str]] = []
        for plan, fd, own in zip(plans, fds, hashers, strict=True):
            checksums = {
                slot.name: plan.known[slot.name] if (h := own[slot.name]) is None else h.hexdigest()
                for slot in plan.slots
            }
            try:
                pwrite_all(fd, [memoryview(plan.header(checksums))], 0)
                if plan.reuse and os.fstat(fd).st_size != plan.size:
                    os.ftruncate(fd, plan.size)
            except BaseException as exc:
                raise _with_path(exc, plan.path) from None
            results.append(checksums)
        return results
    finally:
        for fd in fds:
            os.close(fd)


def write_files(
    plans: Sequence[FilePlan],
    *,
    threads: int | None = None,
    durable: bool = False,
    progress: Counter | None = None,
) -> list[dict[str, str]]:
    """Write every planned file; return each one's ``{tensor name: xxh3 hex}``.

    Args:
        plans: the files, each with its tensors' bytes and places.
        threads: how many threads write (default: :func:`~torchkeep.io._sys.io_threads`).
        durable: the caller will fsync the files: start their writeback while later bytes
            are still being written, so the fsync has little left to wait for.
        progress: called (from the writing threads) with each written chunk's byte count.

    Raises:
        OSError: a write failed (``filename`` names the file). Every file this call created
            or overwrote is removed again: no partial file is left behind.
    """
    count = io_threads(threads)
    total = sum(plan.size for plan in plans)
    touched: list[Path] = []
    try:
        if count == 1 or total < SEQUENTIAL_BELOW:
            return [_write_sequential(plan, touched, progress) for plan in plans]
        return _write_parallel(plans, count, durable, touched, progress)
    except BaseException:
        # Only files this call opened: an existing file that refused O_EXCL is not ours.
        for path in touched:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def checksum_views(views: Mapping[str, memoryview]) -> dict[str, str]:
    """``{name: xxh3 hex}`` of every view.

    One thread: the xxhash binding holds the GIL while it hashes, so more threads would take
    turns rather than run side by side (it hashes about 18 GB/s from memory anyway).
    """
    return {name: xxhash.xxh3_64_hexdigest(view) for name, view in views.items()}
