"""Parallel positional writes of tensor bytes, checksummed as they go out.

A file is described up front by a :class:`FilePlan`: where every tensor's bytes go and how
large the header is. The header's size is known before any checksum is (xxh3 digests are
always 16 hex digits), so the data is written first, straight from tensor memory, by several
threads with ``pwritev`` at fixed offsets, each thread hashing a chunk just before writing it
(the bytes are then still in the CPU cache); the header is built from the finished checksums
and written last into the space left for it. Nothing is staged in an intermediate buffer.

Small writes (a few MB in all) go through one thread and plain ``os.write`` in file order:
there, starting threads costs more than it saves.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from torchkeep.io._sys import IOV_MAX, io_threads, start_writeback

CHUNK = 4 << 20
"""Bytes per write call: enough to amortise the call, few enough to stay cached after hashing."""
GROUP = 1 << 20
"""Tensors smaller than this are gathered with their neighbours into one ``pwritev``."""
SEQUENTIAL_BELOW = 8 << 20
"""Below this many bytes in all, one thread writes everything in order."""
KICK = 32 << 20
"""For durable writes, each thread starts writeback after this many bytes of one file."""
_MIN_PIECE = 32 << 20


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
    done = os.pwritev(fd, views, offset) if len(views) > 1 else os.pwrite(fd, views[0], offset)
    for view in views:
        if done >= view.nbytes:
            done -= view.nbytes
            offset += view.nbytes
            continue
        rest, offset, done = view[done:], offset + done, 0
        while rest:
            written = os.pwrite(fd, rest, offset)
            if written <= 0:
                raise OSError(errno.EIO, "os.pwrite wrote nothing")
            rest, offset = rest[written:], offset + written


def _open(plan: FilePlan) -> int:
    if plan.reuse:
        return os.open(plan.path, os.O_WRONLY | os.O_CLOEXEC)
    return os.open(plan.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)


def _with_path(exc: BaseException, path: Path) -> BaseException:
    if isinstance(exc, OSError) and not exc.filename:
        exc.filename = str(path)
    return exc


# ------------------------------------------------------------------------------ sequential


def _write_sequential(plan: FilePlan, touched: list[Path]) -> dict[str, str]:
    checksums = {
        slot.name: plan.known.get(slot.name) or xxhash.xxh3_64_hexdigest(slot.data)
        for slot in plan.slots
    }
    header = plan.header(checksums)
    fd = _open(plan)
    touched.append(plan.path)
    try:
        write_all(fd, memoryview(header))
        for slot in plan.slots:
            write_all(fd, slot.data)
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
    """Bytes written back to back from ``offset``; ``hashers[i]`` (if any) sees ``views[i]``."""

    offset: int
    views: list[memoryview]
    hashers: list[xxhash.xxh3_64 | None]


@dataclass
class _Job:
    """A run of work one thread does in order: a few small tensors, or a piece of a big one.

    ``tail`` holds bytes to hash only, after the writes: the rest of a big tensor whose other
    pieces other threads write, so that its one checksum still sees every byte in order.
    """

    file: int
    steps: list[_Step] = field(default_factory=list)
    tail: list[tuple[memoryview, xxhash.xxh3_64]] = field(default_factory=list)


def _piece_size(total: int, threads: int) -> int:
    # Pieces bound how unevenly the threads can end; a quarter of each thread's share keeps
    # the last piece short without splitting ordinary tensors.
    return max(_MIN_PIECE, total // (4 * threads))


def _chunks(view: memoryview, offset: int) -> Iterator[tuple[memoryview, int]]:
    for start in range(0, view.nbytes, CHUNK):
        yield view[start : start + CHUNK], offset + start


def _plan_jobs(
    plans: Sequence[FilePlan], threads: int
) -> tuple[list[_Job], list[dict[str, xxhash.xxh3_64]]]:
    total = sum(plan.size for plan in plans)
    piece = _piece_size(total, threads)
    jobs: list[_Job] = []
    hashers: list[dict[str, xxhash.xxh3_64]] = []
    for index, plan in enumerate(plans):
        own: dict[str, xxhash.xxh3_64] = {}
        hashers.append(own)
        group: _Step | None = None  # the open run of small tensors
        group_end = 0
        for slot in plan.slots:
            hasher = None
            if slot.name not in plan.known:
                hasher = own[slot.name] = xxhash.xxh3_64()
            size = slot.data.nbytes
            if size < GROUP:
                if (
                    group is None
                    or group_end != slot.offset
                    or group_end - group.offset >= CHUNK
                    or len(group.views) >= IOV_MAX
                ):
                    group = _Step(slot.offset, [], [])
                    jobs.append(_Job(index, [group]))
                group.views.append(slot.data)
                group.hashers.append(hasher)
                group_end = slot.offset + size
                continue
            group = None
            # A big tensor: pieces that threads take in turn; the first piece's thread
            # hashes the whole tensor, the others only write.
            first: _Job | None = None
            for start in range(0, size, piece):
                job = _Job(index)
                for view, offset in _chunks(slot.data[start : start + piece], slot.offset + start):
                    job.steps.append(_Step(offset, [view], [hasher if first is None else None]))
                    if first is not None and hasher is not None:
                        first.tail.append((view, hasher))
                if first is None:
                    first = job
                jobs.append(job)
    return jobs, hashers


class _Writer:
    """Threads taking jobs in file order; the first error stops them all."""

    def __init__(self, jobs: list[_Job], fds: list[int], paths: list[Path], durable: bool):
        self._jobs = jobs
        self._fds = fds
        self._paths = paths
        self._durable = durable and start_writeback is not None
        self._next = 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def _take(self) -> _Job | None:
        with self._lock:
            if self.error is not None or self._next >= len(self._jobs):
                return None
            job = self._jobs[self._next]
            self._next += 1
            return job

    def run(self) -> None:
        # Per file, the span this thread wrote since it last started writeback.
        pending: dict[int, list[int]] = {}
        job: _Job | None = None
        try:
            while (job := self._take()) is not None:
                fd = self._fds[job.file]
                for step in job.steps:
                    for view, hasher in zip(step.views, step.hashers, strict=True):
                        if hasher is not None:
                            hasher.update(view)
                    pwrite_all(fd, step.views, step.offset)
                    if self._durable:
                        self._kick(pending, fd, step)
                for view, hasher in job.tail:
                    hasher.update(view)
        except BaseException as exc:
            with self._lock:
                if self.error is None:
                    path = self._paths[job.file] if job is not None else self._paths[0]
                    self.error = _with_path(exc, path)

    def _kick(self, pending: dict[int, list[int]], fd: int, step: _Step) -> None:
        end = step.offset + sum(v.nbytes for v in step.views)
        span = pending.setdefault(fd, [step.offset, end])
        span[0], span[1] = min(span[0], step.offset), max(span[1], end)
        if span[1] - span[0] >= KICK and start_writeback is not None:
            start_writeback(fd, span[0], span[1] - span[0])
            del pending[fd]


def _write_parallel(
    plans: Sequence[FilePlan], threads: int, durable: bool, touched: list[Path]
) -> list[dict[str, str]]:
    fds: list[int] = []
    try:
        for plan in plans:
            try:
                fds.append(_open(plan))
            except BaseException as exc:
                raise _with_path(exc, plan.path) from None
            touched.append(plan.path)
        jobs, hashers = _plan_jobs(plans, threads)
        writer = _Writer(jobs, fds, [p.path for p in plans], durable)
        helpers = [
            threading.Thread(target=writer.run, name=f"torchkeep-write-{i}", daemon=True)
            for i in range(min(threads, len(jobs)) - 1)
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
                slot.name: plan.known[slot.name]
                if slot.name in plan.known
                else own[slot.name].hexdigest()
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
    plans: Sequence[FilePlan], *, threads: int | None = None, durable: bool = False
) -> list[dict[str, str]]:
    """Write every planned file; return each one's ``{tensor name: xxh3 hex}``.

    Args:
        plans: the files, each with its tensors' bytes and places.
        threads: how many threads write (default: :func:`~torchkeep.io._sys.io_threads`).
        durable: the caller will fsync the files: start their writeback while later bytes
            are still being written, so the fsync has little left to wait for.

    Raises:
        OSError: a write failed (``filename`` names the file). Every file this call created
            or overwrote is removed again: no partial file is left behind.
    """
    count = io_threads(threads)
    total = sum(plan.size for plan in plans)
    touched: list[Path] = []
    try:
        if count == 1 or total < SEQUENTIAL_BELOW:
            return [_write_sequential(plan, touched) for plan in plans]
        return _write_parallel(plans, count, durable, touched)
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
