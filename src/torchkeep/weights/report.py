"""What a load did: the :class:`LoadReport` value and its printed table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rich.text import Text

from torchkeep.errors import KeyMismatchError
from torchkeep.weights.render import Block, Line, Rendered

_MAX_ROWS = 20


@dataclass(frozen=True)
class ShapeMismatch:
    """A name found on both sides whose shapes differ.

    Attributes:
        name: the destination (model) name.
        source_name: the name in the file.
        source_shape: the shape in the file.
        dest_shape: the shape the model expects.
    """

    name: str
    source_name: str
    source_shape: tuple[int, ...]
    dest_shape: tuple[int, ...]


_STYLES = {"missing": "red", "unexpected": "yellow", "shape": "red", "cast": "magenta"}


@dataclass(frozen=True, repr=False)
class LoadReport(Rendered):
    """The outcome of :func:`torchkeep.load`.

    ``print(report)`` shows the summary line and a table of every non-trivial outcome (what
    :meth:`table` returns); in a notebook it displays the same; ``repr(report)`` is one line.

    Attributes:
        path: the file or folder read.
        format: its detected format (``safetensors``, ``torch-zip``, ...).
        entry: which tensor dict inside the file was used (``""`` for the file's root,
            ``"state_dict"`` for a checkpoint dict's member, ...).
        loaded: destination names that received a tensor.
        missing: destination names the file has nothing for.
        unexpected: names in the file the model has no place for.
        mismatched: names on both sides whose shapes differ (never loaded).
        renamed: (name in file, name in model) pairs that differ.
        cast: (name, dtype in file, dtype in model) for tensors converted on load.
        skipped: names left out on purpose by include/exclude.
        tied: (model name, loaded name) pairs: names the file lacks that share their tensor
            with a loaded name (tied weights), so they hold the file's values.
        prefixes: (prefix removed from the file's names, prefix removed from the model's
            names) that made the names agree, ``("", "")`` when none was needed.
        modules: submodules (``""``: the whole model) loaded through their own
            ``load_state_dict`` machinery (load hooks, custom ``_load_from_state_dict``).
        alternatives: other tensor dicts of the file that could hold weights (``model_ema``
            beside ``model``); pass ``entry=`` to load one of them.
        notes: what else a reader of the report should know (ambiguous prefixes, ...).
    """

    path: str
    format: str
    entry: str
    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[ShapeMismatch, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    cast: tuple[tuple[str, str, str], ...] = ()
    skipped: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()
    prefixes: tuple[str, str] = ("", "")
    modules: tuple[str, ...] = ()
    alternatives: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every name matched on both sides with the same shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: counts of each outcome."""
        parts = [f"{len(self.loaded)} loaded"]
        for label, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatches", self.mismatched),
            ("renamed", self.renamed),
            ("cast", self.cast),
            ("skipped", self.skipped),
            ("tied", self.tied),
        ):
            if items:
                parts.append(f"{len(items)} {label}")
        where = f" (entry {self.entry!r})" if self.entry else ""
        line = f"{self.path} [{self.format}]{where}: " + ", ".join(parts)
        removed, added = self.prefixes
        if removed:
            line += f"; file prefix {removed!r} removed"
        if added:
            line += f"; prefix {added!r} added to the file's names"
        if self.alternatives:
            line += "; the file also holds " + ", ".join(repr(a) for a in self.alternatives)
        return line

    def table(self, *, problems_only: bool = False) -> str:
        """A readable multi-line table of every non-trivial outcome."""
        lines = self._lines(problems_only=problems_only)
        return "\n".join(line.plain for line in lines)

    def blocks(self) -> list[Block]:
        """The description ``str()``, ``rich.print()`` and notebooks show: :meth:`table`."""
        return [Line(line) for line in self._lines(problems_only=False)]

    def _lines(self, *, problems_only: bool) -> list[Text]:
        rows: list[tuple[str, str, str]] = []
        for name in self.missing:
            rows.append(("missing", name, "in the model, not in the file"))
        for name in self.unexpected:
            rows.append(("unexpected", name, "in the file, not in the model"))
        for m in self.mismatched:
            rows.append(
                ("shape", m.name, f"file {_shape(m.source_shape)} vs model {_shape(m.dest_shape)}")
            )
        if not problems_only:
            for src, dst in self.renamed:
                rows.append(("renamed", dst, f"from {src}"))
            for name, src_dtype, dst_dtype in self.cast:
                rows.append(("cast", name, f"{src_dtype} -> {dst_dtype}"))
            for name, source in self.tied:
                rows.append(("tied", name, f"shares its tensor with {source}"))
            for module in self.modules:
                rows.append(("module", module or "(model)", "loaded by its own load_state_dict"))
        head = Text(self.summary(), style="bold" if self.ok else "bold red")
        lines = [head, *(Text(f"  note: {note}", style="dim") for note in self.notes)]
        if not rows:
            return lines
        width = max(len(r[1]) for r in rows[: _MAX_ROWS * 5])
        width = min(width, 60)
        by_kind: dict[str, list[tuple[str, str, str]]] = {}
        for row in rows:
            by_kind.setdefault(row[0], []).append(row)
        for kind_rows in by_kind.values():
            style = _STYLES.get(kind_rows[0][0], "")
            for kind, name, detail in kind_rows[:_MAX_ROWS]:
                lines.append(Text(f"  {kind:<10} {name:<{width}}  {detail}", style=style))
            if len(kind_rows) > _MAX_ROWS:
                more = f"  {kind_rows[0][0]:<10} ... and {len(kind_rows) - _MAX_ROWS} more"
                lines.append(Text(more, style=style))
        return lines

    def __repr__(self) -> str:
        return f"<LoadReport {self.summary()}>"


def refusal(report: LoadReport, lead: str, hint: str) -> KeyMismatchError:
    """The one error every strict load raises: ``lead``, the report's problem table, ``hint``.

    The error's ``report`` is ``report`` with nothing loaded, as nothing was.
    """
    refused = dataclasses.replace(report, loaded=(), tied=())
    return KeyMismatchError(f"{lead}\n{refused.table(problems_only=True)}\n{hint}", refused)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
