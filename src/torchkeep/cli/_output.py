"""Rendering shared by the commands: consoles, numbers, JSON and progress bars.

Consoles never interpret markup (tensor names such as ``layers[0]`` are printed as they are),
colour only terminals (rich honours ``NO_COLOR``, ``FORCE_COLOR`` and ``TTY_COMPATIBLE``), and
do not wrap lines when the output is a pipe or a file, so scripts see one record per line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

ProgressFn = Callable[[int, int], None]
# Width used when stdout is not a terminal: wide enough that long tensor names stay on one line.
_PIPE_WIDTH = 200
# Work shorter than this shows no progress bar at all.
_PROGRESS_DELAY_S = 1.0


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr) that prints text literally and colours only terminals."""
    probe = Console(stderr=stderr)
    width = None
    if not probe.is_terminal:
        width = int(os.environ.get("COLUMNS", "") or _PIPE_WIDTH)
    return Console(
        stderr=stderr,
        markup=False,
        highlight=False,
        emoji=False,
        width=width,
        soft_wrap=width is not None,
    )


def print_pairs(out: Console, rows: list[tuple[str, str | Text]], *, indent: int = 2) -> None:
    """Print ``key  value`` lines with keys aligned (no table padding after the value)."""
    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        line = Text(" " * indent)
        line.append(key.ljust(width), style="dim")
        line.append("  ")
        line.append(value)
        out.print(line)


def print_columns(
    out: Console,
    rows: list[list[str | Text]],
    *,
    header: list[str] | None = None,
    right: frozenset[int] = frozenset(),
    styles: list[str | None] | None = None,
    indent: int = 2,
) -> None:
    """Print aligned columns; the last column is not padded, so lines carry no trailing blanks.

    Args:
        out: where to print.
        rows: the cells, one list per line.
        header: column titles, printed bold.
        right: indexes of columns to right-align (numbers).
        styles: a style per row (``None``: the cells' own).
        indent: spaces before each line.
    """
    table: list[list[Text]] = [[Text(h, style="bold") for h in header]] if header else []
    table += [[Text(c) if isinstance(c, str) else c for c in row] for row in rows]
    if not table:
        return
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(table[0]))]
    row_styles = ([None] if header else []) + list(styles or [None] * len(rows))
    for row, style in zip(table, row_styles, strict=True):
        line = Text(" " * indent)
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            pad = "" if last and i not in right else " " * (widths[i] - len(cell))
            if i:
                line.append("  ")
            if i in right:
                line.append(pad)
            line.append(cell)
            if i not in right and not last:
                line.append(pad)
        if style:
            line.stylize(style)
        line.rstrip()
        out.print(line)


def heading(out: Console, title: str) -> None:
    """A blank line and a section title."""
    out.print()
    out.print(Text(title, style="bold underline"))


def human_bytes(count: int) -> str:
    """``1364`` -> ``"1.4 kB"`` (decimal units, as ``--shard-size 2GB`` reads them)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def human_count(count: int) -> str:
    """``180`` -> ``"180"``, ``7_241_732_096`` -> ``"7.24B"``."""
    for threshold, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if count >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return str(count)


def shape_text(shape: tuple[int, ...]) -> str:
    """``(4, 3)`` -> ``"[4, 3]"``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def number(value: float | None) -> str:
    """A float for a table: short, exponent where that is shorter, ``-`` when undefined."""
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def jsonable(value: Any) -> Any:
    """Dataclasses, tuples and non-finite floats made JSON-safe (NaN/inf become strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout, with nothing else."""
    click.echo(json.dumps(jsonable(data), indent=2))


def error(message: str) -> None:
    """Print ``error: message`` on stderr."""
    click.echo(f"error: {message}", err=True)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[ProgressFn]:
    """Yield ``update(done_bytes, total_bytes)``; a bar appears on a terminal after a second.

    Nothing is drawn when stderr is not a terminal or the work ends within the first second.
    """
    err = console(stderr=True)
    if not err.is_terminal:
        yield lambda done, total: None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task(description, total=None)
    started = time.monotonic()
    shown = False

    def update(done: int, total: int) -> None:
        nonlocal shown
        if not shown and time.monotonic() - started >= _PROGRESS_DELAY_S:
            progress.start()
            shown = True
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if shown:
            progress.stop()
