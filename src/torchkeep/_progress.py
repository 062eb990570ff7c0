"""Progress of long work (saving, loading, converting, verifying, comparing), on request.

Every verb that moves many bytes takes ``progress=``: ``None``/``False`` (the default: no
work at all), ``True`` (a bar on stderr, drawn by rich, which notebooks show too), or a
callable taking ``(bytes done, bytes in all)``. The I/O engine counts bytes from its threads
into a :class:`Meter`, which calls back at most every tenth of a second, and once at the end.
A leaf: needs no torch, and nothing of torchkeep's but its errors.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from torchkeep.errors import InvalidArgumentError

# Called with (bytes done, bytes in all).
Progress = Callable[[int, int], None]
ProgressOption = bool | Progress | None

_INTERVAL_S = 0.1


class Meter:
    """Bytes done, counted from any thread, reported to ``report`` now and then.

    Args:
        report: called with ``(done, total)``.
        total: the bytes the work will move.
    """

    def __init__(self, report: Progress, total: int) -> None:
        self._report = report
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more as done."""
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if now - self._last < _INTERVAL_S:
                return
            self._last = now
            done = self.done
        self._report(min(done, self.total), self.total)

    def finish(self) -> None:
        """Report the work as complete (also where it was not counted piece by piece, as in
        a ``torch.save`` of a ``.pt`` file)."""
        self._report(self.total, self.total)


@contextlib.contextmanager
def bar(description: str, *, delay: float = 0.0, terminal_only: bool = False) -> Iterator[Progress]:
    """Yield ``update(done, total)`` drawing a rich progress bar on stderr.

    Args:
        description: what is being done (``"saving"``).
        delay: draw nothing for work that ends within this many seconds.
        terminal_only: draw nothing when stderr is not a terminal (the command line's
            behaviour in pipes); otherwise rich decides (notebooks show the bar).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress

    err = Console(stderr=True)
    if terminal_only and not err.is_terminal:
        yield lambda done, total: None
        return
    shown = RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=terminal_only,
    )
    task = shown.add_task(description, total=None)
    started = time.monotonic()
    visible = False

    def update(done: int, total: int) -> None:
        nonlocal visible
        if not visible and time.monotonic() - started >= delay:
            shown.start()
            visible = True
        shown.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if visible:
            shown.stop()


@contextlib.contextmanager
def meter(option: ProgressOption, description: str, total: int) -> Iterator[Meter | None]:
    """A :class:`Meter` for ``progress=option``, or None when no progress was asked for."""
    with reporter(option, description) as report:
        if report is None:
            yield None
            return
        counted = Meter(report, total)
        yield counted
        counted.finish()


@contextlib.contextmanager
def reporter(option: ProgressOption, description: str) -> Iterator[Progress | None]:
    """The ``(done, total)`` callback for ``progress=option``: a bar for True, the caller's
    function, or None (no progress asked for)."""
    if option is None or option is False:
        yield None
    elif option is True:
        with bar(description) as update:
            yield update
    elif callable(option):
        yield option
    else:
        raise InvalidArgumentError(
            f"progress= takes True, False, None or a function of (done, total), got "
            f"{type(option).__name__}"
        )


def counter(found: Meter | None) -> Callable[[int], None] | None:
    """``found.add``, or None: what the I/O engine takes (it skips None at no cost)."""
    return None if found is None else found.add


__all__ = ["Meter", "Progress", "ProgressOption", "bar", "counter", "meter", "reporter"]
