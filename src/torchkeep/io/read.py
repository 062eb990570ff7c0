"""Parallel reads straight into destination tensors.

The bytes to read are listed as extents (file, offset, destination memory). They are sorted
by file position and cut into one contiguous stretch per thread, splitting a large tensor where
a cut falls inside it: every thread then reads sequentially, which keeps the kernel's readahead
working on a cold cache, while on a warm cache the copies out of the page cache run on every
core. Neighbouring tensors in a stretch are read by one ``preadv`` into their several buffers.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torchkeep.errors import CorruptFileError
from torchkeep.io._sys import IOV_MAX, io_threads
from torchkeep.io.positional import readv

READ_CHUNK = 64 << 20
"""Largest single read call."""
SEQUENTIAL_BELOW = 8 << 20
"""Below this many bytes in all, one thread reads everything."""

# Called with a byte count as bytes are done (see torchkeep._progress).
Counter = Callable[[int], None]


@dataclass(frozen=True)
class ReadExtent:
    """Bytes of one tensor to read from an open file into its destination.

    Attributes:
        fd: the open file.
        offset: the absolute file offset of the first byte.
        dest: the destination memory (a writable byte view of the tensor).
        path: the file's path, for error messages.
        name: the tensor's name, for error messages.
    """

    fd: int
    offset: int
    dest: memoryview
    path: str
    name: str


def _truncated(extent: ReadExtent, got: int) -> CorruptFileError:
    return CorruptFileError(
        f"{extent.path!r} is truncated: tensor {extent.name!r} needs bytes up to file offset "
        f"{extent.offset + extent.dest.nbytes}, but the file ended after byte {extent.offset + got}"
    )


def _read_run(run: list[ReadExtent], counted: Counter | None = None) -> None:
    """Read extents that sit back to back in one file, with as few calls as possible."""
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
                head = ReadExtent(
                    extent.fd, extent.offset, extent.dest[:room], extent.path, extent.name
                )
                stretches[-1].append(head)
                extent = ReadExtent(
                    extent.fd,
                    extent.offset + room,
                    extent.dest[room:],
                    extent.path,
                    extent.name,
                )
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
    extents: Sequence[ReadExtent], *, threads: int | None = None, progress: Counter | None = None
) -> None:
    """Fill every extent's destination from its file.

    Args:
        extents: what to read. Extents whose destinations overlap are read one after the
            other, in the given order, after the others.
        threads: how many threads read (default: :func:`~torchkeep.io._sys.io_threads`).
        progress: called (from the reading threads) with each read run's byte count.

    Raises:
        CorruptFileError: a file ended before a tensor's last byte.
        OSError: a read failed.
    """
    extents = [e for e in extents if e.dest.nbytes]
    later = _shared_destinations(extents)
    if later:
        _read_parallel([e for i, e in enumerate(extents) if i not in later], threads, progress)
        for i in sorted(later):
            for run in _runs(_pieces(extents[i])):
                _read_run(run, progress)
        return
    _read_parallel(extents, threads, progress)


def _read_parallel(
    extents: Sequence[ReadExtent], threads: int | None, counted: Counter | None = None
) -> None:
    if not extents:
        return
    ordered = sorted(extents, key=lambda e: (e.fd, e.offset))
    total = sum(e.dest.nbytes for e in ordered)
    count = io_threads(threads)
    if count == 1 or total < SEQUENTIAL_BELOW:
        for run in _runs([p for e in ordered for p in _pieces(e)]):
            _read_run(run, counted)
        return
    errors: list[BaseException] = []
    failed = threading.Event()

    def work(stretch: list[ReadExtent]) -> None:
        try:
            for run in _runs([p for e in stretch for p in _pieces(e)]):
                if failed.is_set():
                    return
                _read_run(run, counted)
        except BaseException as exc:
            errors.append(exc)
            failed.set()

    stretches = _split(ordered, count)
    helpers = [
        threading.Thread(target=work, args=(s,), name=f"torchkeep-read-{i}", daemon=True)
        for i, s in enumerate(stretches[1:])
    ]
    for helper in helpers:
        helper.start()
    work(stretches[0])
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
