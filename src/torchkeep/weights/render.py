"""How torchkeep's values print: one description per value, three outputs.

A value (:class:`~torchkeep.CheckpointInfo`, :class:`~torchkeep.LoadReport`, ...) describes
itself once, as a list of blocks: lines, aligned ``key  value`` pairs, columns, headings and
trees. The same blocks become plain text (``str()``), a rich renderable (``rich.print``, the
command line) and a small HTML fragment (notebooks), so what a script prints, what a notebook
shows and what ``torchkeep inspect`` shows cannot drift apart. Needs no torch.
"""

from __future__ import annotations

import html
import io
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.text import Text
from rich.tree import Tree

Cell = str | Text
# Wide enough that long tensor names stay on one line in plain text.
TEXT_WIDTH = 200


@dataclass(frozen=True)
class Line:
    """One line of text."""

    text: Cell


@dataclass(frozen=True)
class Heading:
    """A blank line and a section title."""

    title: str


@dataclass(frozen=True)
class Pairs:
    """``key  value`` lines with the keys aligned; an empty key continues the row above."""

    rows: Sequence[tuple[str, Cell]]
    indent: int = 2


@dataclass(frozen=True)
class Columns:
    """Aligned columns; the last one is not padded, so lines carry no trailing blanks.

    Attributes:
        rows: the cells, one list per line.
        header: column titles, printed bold.
        right: indexes of columns aligned right (numbers).
        styles: a style per row (``None``: the cells' own).
        indent: spaces before each line.
    """

    rows: Sequence[Sequence[Cell]]
    header: Sequence[str] = ()
    right: frozenset[int] = frozenset()
    styles: Sequence[str | None] = ()
    indent: int = 2


@dataclass(frozen=True)
class Node:
    """A tree: a label and the nodes below it."""

    label: Cell
    children: list[Node] = field(default_factory=list)


Block = Line | Heading | Pairs | Columns | Node


def _text(cell: Cell) -> Text:
    return Text(cell) if isinstance(cell, str) else cell


def _pairs(block: Pairs) -> list[Text]:
    width = max((len(key) for key, _ in block.rows), default=0)
    lines = []
    for key, value in block.rows:
        line = Text(" " * block.indent)
        line.append(key.ljust(width), style="dim")
        line.append("  ")
        line.append(_text(value))
        line.rstrip()
        lines.append(line)
    return lines


def _columns(block: Columns) -> list[Text]:
    table = [[Text(h, style="bold") for h in block.header]] if block.header else []
    table += [[_text(c) for c in row] for row in block.rows]
    if not table:
        return []
    count = max(len(row) for row in table)
    widths = [max((len(row[i]) for row in table if i < len(row)), default=0) for i in range(count)]
    styles = [None] * len(block.rows) if not block.styles else list(block.styles)
    row_styles = ([None] if block.header else []) + styles
    lines = []
    for row, style in zip(table, row_styles, strict=True):
        line = Text(" " * block.indent)
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            pad = "" if last and i not in block.right else " " * (widths[i] - len(cell))
            if i:
                line.append("  ")
            if i in block.right:
                line.append(pad)
            line.append(cell)
            if i not in block.right and not last:
                line.append(pad)
        if style:
            line.stylize(style)
        line.rstrip()
        lines.append(line)
    return lines


def _tree(node: Node) -> Tree:
    tree = Tree(_text(node.label))

    def add(parent: Tree, children: list[Node]) -> None:
        for child in children:
            add(parent.add(_text(child.label)), child.children)

    add(tree, node.children)
    return tree


def renderable(blocks: Sequence[Block]) -> Group:
    """The blocks as one rich renderable (what ``__rich__`` returns and the CLI prints)."""
    parts: list[RenderableType] = []
    for block in blocks:
        if isinstance(block, Line):
            parts.append(_text(block.text))
        elif isinstance(block, Heading):
            parts += [Text(""), Text(block.title, style="bold underline")]
        elif isinstance(block, Pairs):
            parts += _pairs(block)
        elif isinstance(block, Columns):
            parts += _columns(block)
        else:
            parts.append(_tree(block))
    return Group(*parts)


def plain_console(file: io.StringIO, width: int = TEXT_WIDTH) -> Console:
    """A console writing plain text (no colour, no markup, no wrapping) to ``file``."""
    return Console(
        file=file,
        width=width,
        color_system=None,
        markup=False,
        highlight=False,
        emoji=False,
        soft_wrap=True,
        force_terminal=False,
        legacy_windows=False,
    )


def plain_text(blocks: Sequence[Block]) -> str:
    """The blocks as plain text, without ANSI codes: what ``str()`` returns."""
    buffer = io.StringIO()
    plain_console(buffer).print(renderable(blocks))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def _html_cell(cell: Cell) -> str:
    text = cell.plain if isinstance(cell, Text) else cell
    return html.escape(text)


def _html_tree(node: Node) -> str:
    label = f"<span>{_html_cell(node.label)}</span>"
    if not node.children:
        return f"<li>{label}</li>"
    inner = "".join(_html_tree(child) for child in node.children)
    return f"<li>{label}<ul>{inner}</ul></li>"


_TABLE = "<table style='border-collapse:collapse;text-align:left;font-family:monospace'>"
_CELL = "style='padding:0 1em 0 0;text-align:left;vertical-align:top'"


def to_html(blocks: Sequence[Block]) -> str:
    """The blocks as a self-contained HTML fragment: tables and lists, every text escaped."""
    out = ["<div class='torchkeep'>"]
    pairs: list[tuple[str, Cell]] = []

    def flush() -> None:
        if pairs:
            rows = "".join(
                f"<tr><th {_CELL}>{html.escape(k)}</th><td {_CELL}>{_html_cell(v)}</td></tr>"
                for k, v in pairs
            )
            out.append(f"{_TABLE}{rows}</table>")
            pairs.clear()

    for block in blocks:
        if isinstance(block, Pairs):
            pairs.extend(block.rows)
            continue
        flush()
        if isinstance(block, Line):
            out.append(f"<div style='font-family:monospace'>{_html_cell(block.text)}</div>")
        elif isinstance(block, Heading):
            out.append(f"<h4>{html.escape(block.title)}</h4>")
        elif isinstance(block, Columns):
            head = "".join(f"<th {_CELL}>{html.escape(h)}</th>" for h in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td {_CELL}>{_html_cell(c)}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            out.append(f"{_TABLE}{f'<tr>{head}</tr>' if head else ''}{body}</table>")
        else:
            out.append(f"<ul style='font-family:monospace'>{_html_tree(block)}</ul>")
    flush()
    out.append("</div>")
    return "".join(out)


class Rendered(ABC):
    """``str()``, ``rich.print()`` and notebook display of a value, from its :meth:`blocks`."""

    @abstractmethod
    def blocks(self) -> list[Block]:
        """The value's description, as blocks."""

    def __str__(self) -> str:
        return plain_text(self.blocks())

    def __rich__(self) -> Group:
        return renderable(self.blocks())

    def _repr_html_(self) -> str:
        return to_html(self.blocks())


# ------------------------------------------------------------------------------- numbers


def human_bytes(count: int) -> str:
    """``1364`` -> ``"1.4 kB"`` (decimal units, as ``--shard-size 2GB`` reads them)."""
    if abs(count) < 1000:
        return f"{count} B"
    value = count / 1000
    for unit in ("kB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def human_count(count: int) -> str:
    """``180`` -> ``"180"``, ``7_241_732_096`` -> ``"7.24B"``."""
    for threshold, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if count >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return str(count)


def shape_text(shape: Sequence[int]) -> str:
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


def plural(count: int, word: str) -> str:
    """``1, "tensor"`` -> ``"1 tensor"``; ``2, "tensor"`` -> ``"2 tensors"``."""
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"
