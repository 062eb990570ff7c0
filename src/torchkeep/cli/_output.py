"""Rendering shared by the commands: consoles, JSON and progress bars.

Numbers, pairs, columns and trees are rendered by :mod:`torchkeep.weights.render`, the same
code the values' ``str()`` uses; they are re-exported here for the commands.

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
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from torchkeep._progress import bar
from torchkeep.weights.render import (
    Columns,
    Heading,
    Pairs,
    human_bytes,
    human_count,
    number,
    renderable,
    shape_text,
)

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
    out.print(renderable([Pairs(rows, indent)]))


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
    if rows or header:
        out.print(renderable([Columns(rows, header or (), right, styles or (), indent)]))


def heading(out: Console, title: str) -> None:
    """A blank line and a section title."""
    out.print(renderable([Heading(title)]))


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


# Set by ``torchkeep --quiet``: no progress bars.
QUIET_KEY = "torchkeep.quiet"


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[ProgressFn]:
    """Yield ``update(done_bytes, total_bytes)``; a bar appears on a terminal after a second.

    Nothing is drawn when stderr is not a terminal (pipes, files), with ``--quiet``, or when
    the work ends within the first second.
    """
    context = click.get_current_context(silent=True)
    if context is not None and context.find_root().meta.get(QUIET_KEY):
        yield lambda done, total: None
        return
    with bar(description, delay=_PROGRESS_DELAY_S, terminal_only=True) as update:
        yield update


__all__ = [
    "console",
    "emit_json",
    "error",
    "heading",
    "human_bytes",
    "human_count",
    "jsonable",
    "number",
    "print_columns",
    "print_pairs",
    "progress_bar",
    "shape_text",
]
