"""Parallel reads straight into destination tensors.

The bytes to read are listed as extents (file, offset, destination memory). They are sorted
by file position and cut into one contiguous stretch per thread, splitting a large tensor where
a cut falls inside it: every thread then reads sequentially, which keeps the kernel's readahead
working on a cold cache, while on a warm cache the copies out of the page cache run on every
core. Neighbouring tensors in a stretch are read by one ``preadv`` into their several buffers.

An extent may carry a hook (``landed``) that is handed its destination in the reading thread
as soon as all of its bytes are in memory, which is how checksums are computed during the read
instead of by a second one; :func:`check_spans` hands such hooks bytes alone, where they
already are in the page cache (through read-only mappings), without copying them.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import xxhash

from torchkeep.errors import CorruptFileError
from torchkeep.io._sys import IOV_MAX, io_threads
from torchkeep.io.positional import readv

READ_CHUNK = 64 << 20
"""Largest single read call."""
SEQUENTIAL_BELOW = 8 << 20
"""Below this many bytes in all, one thread reads everything."""
CHECK_BATCH = 64 << 20
"""Scratch memory :func:`check_spans` reads into at a time (or one larger span)."""

# Called with a byte count as bytes are done (see torchkeep._progress).
Counter = Callable[[int], None]
# Called with an extent's destination once all its bytes are there (a checksum, say).
Landed = Callable[[memoryview], None]


def xxh3_hook(expected: str | None, damaged: Callable[[str], BaseException]) -> Landed:
    """A :data:`Landed` hook comparing the bytes' xxh3 with ``expected``; on a mismatch it
    raises ``damaged(actual digest)``."""

    def check(data: memoryview) -> None:
        actual = xxhash.xxh3_64_hexdigest(data)
        if actual != expected:
            raise damaged(actual)

    return check


@dataclass(frozen=True)
class ReadExtent:
    """Bytes of one tensor to read from an open file into its destination.

    Attributes:
        fd: the open file.
        offset: the absolute file offset of the first byte.
        dest: the destination memory (a writable byte view of the tensor).
        path: the file's path, for error messages.
        name: the tensor's name, for error messages.
        landed: called in the reading thread with ``dest`` once all of its bytes are read.
    """

    fd: int
    offset: int
    dest: memoryview
    path: str
    name: str
    landed: Landed | None = None


@dataclass(frozen=True)
class Span:
    """Bytes of a file read only to be handed to ``landed`` (see :func:`check_spans`)."""

    fd: int
    offset: int
    nbytes: int
    path: str
    name: str
    landed: Landed


class _Countdown:
    """An extent's hook, called once the last of its pieces (read by any thread) is in."""

    def __init__(self, whole: memoryview, landed: Landed) -> None:
        self._whole = whole
        self._landed = landed
        self._left = whole.nbytes
        self._lock = threading.Lock()

    def __call__(self, piece: memoryview) -> None:
        with self._lock:
            self._left -= piece.nbytes
            done = self._left == 0
        if done:
            self._landed(self._whole)


def _truncated(extent: ReadExtent | Span, got: int) -> CorruptFileError:
    needed = extent.offset + (extent.nbytes if isinstance(extent, Span) else extent.dest.nbytes)
    return CorruptFileError(
        f"{extent.path!r} is truncated: tensor {extent.name!r} needs bytes up to file offset "
        f"{needed}, but the file ended after byte {extent.offset + got}"
    )


def _read_run(
    run: list[ReadExtent], counted: Counter | None = None, started: set[str] | None = None
) -> None:
    """Read extents that sit back to back in one file, with as few calls as possible."""
    if started is not None:
        started.update(extent.name for extent in run)
    if counted is not None:
        _read_run(run)
        counted(sum(e.dest.nbytes for e in run))
        return
    views = [e.dest for e in run]
    done = readv(run[0].fd, views, run[0].offset) if len(views) > 1 else 0
    for extent in run:
        if done >= extent.dest.nbytes:
            done -= extent.dest.nbytes
            continue
        got, done = done, 0
        while got < extent.dest.nbytes:
            step = readv(extent.fd, [extent.dest[got:]], extent.offset + got)
            if step <= 0:
                raise _truncated(extent, got)
            got += step
    for extent in run:
        if extent.landed is not None:
            extent.landed(extent.dest)


def _runs(extents: Sequence[ReadExtent]) -> list[list[ReadExtent]]:
    """Group extents (in file order) into back-to-back runs of bounded size and count."""
    runs: list[list[ReadExtent]] = []
    size = 0
    for extent in extents:
        last = runs[-1][-1] if runs else None
        if (
            last is None
            or last.fd != extent.fd
            or last.offset + last.dest.nbytes != extent.offset
            or size + extent.dest.nbytes > READ_CHUNK
            or len(runs[-1]) >= IOV_MAX
        ):
            runs.append([])
            size = 0
        runs[-1].append(extent)
        size += extent.dest.nbytes
    return runs


def _pieces(extent: ReadExtent) -> list[ReadExtent]:
    if extent.dest.nbytes <= READ_CHUNK:
        return [extent]
    return [
        ReadExtent(
            extent.fd,
            extent.offset + start,
            extent.dest[start : start + READ_CHUNK],
            extent.path,
            extent.name,
            extent.landed,
        )
        for start in range(0, extent.dest.nbytes, READ_CHUNK)
    ]


def _split(extents: list[ReadExtent], parts: int) -> list[list[ReadExtent]]:
    """Cut extents (in file order) into ``parts`` contiguous stretches of equal byte count."""
    total = sum(e.dest.nbytes for e in extents)
    share = -(-total // parts)
    stretches: list[list[ReadExtent]] = [[]]
    room = share
    for extent in extents:
        while extent.dest.nbytes > room and len(stretches) < parts:
            if room:
                stretches[-1].append(replace(extent, dest=extent.dest[:room]))
                extent = replace(extent, offset=extent.offset + room, dest=extent.dest[room:])
            stretches.append([])
            room = share
        if extent.dest.nbytes:
            stretches[-1].append(extent)
            room -= extent.dest.nbytes
    return [s for s in stretches if s]


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _shared_destinations(extents: Sequence[ReadExtent]) -> set[int]:
    """Positions of extents whose destination overlaps another's.

    Tied weights in a model are one tensor under two names: reading both names at once would
    let two threads write the same memory. Those reads run afterwards, one by one, in the
    caller's order, as a loop of single reads would.
    """
    spans = sorted(
        (_address(e.dest), _address(e.dest) + e.dest.nbytes, i) for i, e in enumerate(extents)
    )
    shared: set[int] = set()
    reach, owner = -1, -1
    for begin, end, index in spans:
        if begin < reach:
            shared.update((index, owner))
        if end > reach:
            reach, owner = end, index
    return shared


def read_extents(
    extents: Sequence[ReadExtent],
    *,
    threads: int | None = None,
    progress: Counter | None = None,
    started: set[str] | None = None,
) -> None:
    """Fill every extent's destination from its file.

    Args:
        extents: what to read. Extents whose destinations overlap are read one after the
            other, in the given order, after the others. Each extent's ``landed`` hook is
            called once, in the thread that read its last byte.
        threads: how many threads read (default: :func:`~torchkeep.io._sys.io_threads`).
        progress: called (from the reading threads) with each read run's byte count.
        started: gets the name of every extent before any of its bytes is read, so that
            after a failure it holds each destination that may have changed.

    Raises:
        CorruptFileError: a file ended before a tensor's last byte.
        OSError: a read failed.
        Exception: whatever a ``landed`` hook raised (a ``ChecksumError``).
    """
    for extent in extents:
        if not extent.dest.nbytes and extent.landed is not None:
            extent.landed(extent.dest)
    # A hook waits for every piece of its extent, wherever the extent is cut.
    extents = [
        e if e.landed is None else replace(e, landed=_Countdown(e.dest, e.landed))
        for e in extents
        if e.dest.nbytes
    ]
    later = _shared_destinations(extents)
    if later:
        first = [e for i, e in enumerate(extents) if i not in later]
        _read_parallel(first, threads, progress, started)
        for i in sorted(later):
            for run in _runs(_pieces(extents[i])):
                _read_run(run, progress, started)
        return
    _read_parallel(extents, threads, progress, started)


def _read_parallel(
    extents: Sequence[ReadExtent],
    threads: int | None,
    counted: Counter | None = None,
    started: set[str] | None = None,
) -> None:
    if not extents:
        return
    ordered = sorted(extents, key=lambda e: (e.fd, e.offset))
    total = sum(e.dest.nbytes for e in ordered)
    count = io_threads(threads)
    if count == 1 or total < SEQUENTIAL_BELOW:
        for run in _runs([p for e in ordered for p in _pieces(e)]):
            _read_run(run, counted, started)
        return

    def work(stretch: list[ReadExtent], failed: threading.Event) -> None:
        for run in _runs([p for e in stretch for p in _pieces(e)]):
            if failed.is_set():
                return  # another thread failed: the read is abandoned
            _read_run(run, counted, started)

    stretches = _split(ordered, count)
    _in_parallel(stretches, work, len(stretches), "read")


def check_spans(
    spans: Sequence[Span], *, threads: int | None = None, batch: int = CHECK_BATCH
) -> None:
    """Hand each span's bytes to its hook, in parallel, without copying them.

    The bytes are looked at where they already are, in the page cache, through read-only
    mappings of at most ``batch`` bytes (or one larger span) at a time: hashing a mapping costs
    the hash alone, while reading into scratch memory first costs a copy as well. Where a file
    cannot be mapped, the bytes are read through a bounded scratch buffer instead.

    Every file is checked to be long enough for its spans before any is mapped (a mapped page
    past the end of a file is a fault, not an error). A file that another process shortens
    while it is mapped here raises SIGBUS, as it would in any reader that maps files.

    Raises:
        CorruptFileError: a file ended before a span's last byte.
        OSError: a read failed.
        Exception: whatever a hook raised.
    """
    if not spans:
        return
    ordered = sorted(spans, key=lambda s: (s.fd, s.offset))
    sizes: dict[int, int] = {}
    for span in ordered:
        if span.fd not in sizes:
            sizes[span.fd] = os.fstat(span.fd).st_size
        if span.offset + span.nbytes > sizes[span.fd]:
            raise _truncated(span, max(0, sizes[span.fd] - span.offset))
    windows = _windows([s for s in ordered if s.nbytes], batch)
    for span in ordered:
        if not span.nbytes:
            span.landed(memoryview(b""))
    _in_parallel(windows, functools.partial(_check_window, batch=batch), threads, "check")


def _windows(spans: list[Span], batch: int) -> list[list[Span]]:
    """Spans (in file order) grouped into runs of one file spanning at most ``batch`` bytes
    (a larger span alone), each to be mapped at once."""
    windows: list[list[Span]] = []
    for span in spans:
        first = windows[-1][0] if windows else None
        if first is None or first.fd != span.fd or span.offset + span.nbytes - first.offset > batch:
            windows.append([])
        windows[-1].append(span)
    return windows


def _check_window(window: list[Span], failed: threading.Event, batch: int) -> None:
    start = window[0].offset - window[0].offset % mmap.ALLOCATIONGRANULARITY
    end = max(span.offset + span.nbytes for span in window)
    try:
        mapping = mmap.mmap(window[0].fd, end - start, offset=start, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        # A file the system will not map (some network and FUSE file systems): read it.
        _read_spans(window, 1, batch)
        return
    try:
        if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            mapping.madvise(mmap.MADV_WILLNEED)  # start reading ahead on a cold cache
        with memoryview(mapping) as whole:
            for span in window:
                if failed.is_set():
                    return  # another window failed: the check is abandoned
                with whole[span.offset - start : span.offset - start + span.nbytes] as part:
                    span.landed(part)
    finally:
        mapping.close()


_Item = TypeVar("_Item")


def _in_parallel(
    items: Sequence[_Item],
    work: Callable[[_Item, threading.Event], None],
    threads: int | None,
    name: str,
) -> None:
    """Run ``work`` on every item, spread over threads that each take the next item.

    ``work`` is also handed an event set once any item failed, to stop early; the first
    error is raised.
    """
    failed = threading.Event()
    count = min(io_threads(threads), len(items))
    if count <= 1:
        for item in items:
            work(item, failed)
        return
    pending = iter(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop() -> None:
        while not failed.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                work(item, failed)
            except BaseException as exc:
                errors.append(exc)
                failed.set()

    helpers = [
        threading.Thread(target=loop, name=f"torchkeep-{name}-{i}", daemon=True)
        for i in range(count - 1)
    ]
    for helper in helpers:
        helper.start()
    loop()
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


def _read_spans(spans: Sequence[Span], threads: int | None, batch: int) -> None:
    """The spans read through one reused scratch buffer of at most ``batch`` bytes (or the
    largest span), for files that cannot be mapped."""
    spans = [s for s in spans if s.nbytes]
    if not spans:
        return
    largest = max(span.nbytes for span in spans)
    memory = memoryview(bytearray(max(min(batch, sum(s.nbytes for s in spans)), largest)))
    pending: list[ReadExtent] = []
    used = 0
    for span in spans:
        if used + span.nbytes > memory.nbytes:
            read_extents(pending, threads=threads)
            pending, used = [], 0
        dest = memory[used : used + span.nbytes]
        pending.append(ReadExtent(span.fd, span.offset, dest, span.path, span.name, span.landed))
        used += span.nbytes
    read_extents(pending, threads=threads)
