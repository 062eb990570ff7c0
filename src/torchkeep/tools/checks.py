"""What every verify needs, and the safetensors check: results, problems, and checksums
recomputed while streaming a file. Needs no torch."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from rich.text import Text

from torchkeep._facts import SAFETENSORS_DTYPES
from torchkeep.errors import CorruptFileError
from torchkeep.formats.safetensors_header import (
    Header,
    read_header,
    uncommon_dtypes,
)
from torchkeep.io.positional import BINARY, read_at
from torchkeep.weights.render import Block, Line, Rendered, plural

# Called with (bytes done, bytes in all) as the check streams through the files.
ProgressFn = Callable[[int, int], None]

BLOCK = 16 << 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (file, file:tensor or file:record) and what."""

    where: str
    message: str


@dataclass(repr=False)
class VerifyResult(Rendered):
    """Everything ``verify`` found, and what it checked.

    ``print(result)`` shows what ``torchkeep verify`` shows; in a notebook it displays as a
    table; ``repr(result)`` is one line.

    Attributes:
        path: what was checked.
        format: its detected format (``"unknown"`` when none matched).
        problems: every problem found; empty means the file is sound.
        notes: what could not be checked, and why.
        tensors: tensors whose presence was confirmed.
        checksums: tensors whose stored xxh3 checksum was recomputed (matching or not).
        crcs: zip records whose CRC-32 was checked (torch zip files).
        unpickled: tensors read back through the unpickler (the allowlist, unless
            ``trusted``), every storage whole.
        files: files checked (a sharded folder's shards, a checkpoint folder's files).
        trusted: pickles were read without the allowlist (``trust=True``).
    """

    path: str
    format: str = "unknown"
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tensors: int = 0
    checksums: int = 0
    crcs: int = 0
    unpickled: int = 0
    files: int = 0
    trusted: bool = False

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def checked(self) -> str:
        """What was checked, in words (``12 records (CRC-32) checked, 4 tensors read ...``)."""
        parts = [plural(self.files, "file")] if self.files > 1 else []
        if self.crcs:
            parts.append(f"{plural(self.crcs, 'record')} (CRC-32) checked")
        if self.unpickled:
            how = "without the allowlist" if self.trusted else "through the allowlist"
            parts.append(f"{plural(self.unpickled, 'tensor')} read {how}")
            if self.tensors > self.unpickled:
                parts.append(plural(self.tensors - self.unpickled, "other tensor"))
        else:
            parts.append(plural(self.tensors, "tensor"))
        if self.checksums or not (self.crcs or self.unpickled):
            parts.append(f"{self.checksums:,} checksums verified")
        return ", ".join(parts)

    def summary(self) -> str:
        """One line: the verdict, the path and format, and what was checked or went wrong."""
        if self.ok:
            return f"OK {self.path} [{self.format}]: {self.checked()}"
        return f"FAILED {self.path} [{self.format}]: {plural(len(self.problems), 'problem')}"

    def blocks(self) -> list[Block]:
        """The description ``str()``, ``rich.print()``, notebooks and the CLI show."""
        verdict, rest = self.summary().split(" ", 1)
        head = Text(verdict, style="green bold" if self.ok else "red bold")
        head.append(f" {rest}")
        blocks: list[Block] = [Line(head)]
        for problem in self.problems:
            line = Text("  problem ", style="red")
            line.append(f"{problem.where}: {problem.message}")
            blocks.append(Line(line))
        blocks += [Line(Text(f"  note    {note}", style="dim")) for note in self.notes]
        return blocks

    def __repr__(self) -> str:
        return f"<VerifyResult {self.summary()}>"


class HeaderChecker:
    """Collects problems; checks safetensors files (headers and checksums) without torch."""

    def __init__(self, result: VerifyResult, progress: ProgressFn, total: int) -> None:
        self.result = result
        self.progress = progress
        self.total = total
        self.done = 0

    def problem(self, where: str | Path, message: str) -> None:
        self.result.problems.append(Problem(str(where), message))

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self.progress(self.done, self.total)

    def safetensors(self, path: Path) -> set[str] | None:
        try:
            fd = os.open(path, os.O_RDONLY | BINARY)
        except OSError as exc:
            self.problem(path, f"cannot open it: {exc.strerror}")
            return None
        try:
            try:
                # The loaders' own parser: whatever a load refuses, this refuses.
                header = read_header(str(path), fd, os.fstat(fd).st_size)
            except CorruptFileError as exc:
                self.problem(path, str(exc))
                return None
            for code in sorted(_lacking(header)):
                self.problem(
                    path, f"holds {code} tensors, a dtype this torch lacks: a load refuses it"
                )
            start, entries = header.data_start, header.tensors
            checksums, aliases = header.checksums, header.aliases
            for name, entry in entries.items():
                expected = checksums.get(name)
                if expected is not None:
                    actual = _digest(fd, start + entry.begin, start + entry.end)
                    self.result.checksums += 1
                    if actual != expected:
                        self.problem(
                            f"{path}:{name}",
                            f"checksum mismatch: bytes {start + entry.begin} to "
                            f"{start + entry.end} hash to {actual}, but {expected} was recorded "
                            "when the file was saved (the data is damaged)",
                        )
                self.advance(entry.end - entry.begin)
        finally:
            os.close(fd)
        for name in checksums:
            if name not in entries:
                self.problem(path, f"a checksum is recorded for {name!r}, which the header lacks")
        for alias, target in aliases.items():
            if target not in entries:
                self.problem(path, f"tied name {alias!r} points to {target!r}, which is absent")
        if not checksums and entries:
            self.result.notes.append(
                f"{path}: no checksums recorded (not written by torchkeep); header, offsets and "
                "length checked, tensor bytes not"
            )
        self.result.tensors += len(entries)
        self.result.files += 1
        return set(entries) | set(aliases)


def _lacking(header: Header) -> set[str]:
    """The dtype codes in ``header`` this torch does not have (a load refuses them)."""
    uncommon = uncommon_dtypes(header)
    if not uncommon:
        return set()  # every torch has these: no need to import it to know
    import torch

    return {code for code in uncommon if not hasattr(torch, SAFETENSORS_DTYPES[code])}


def _digest(fd: int, begin: int, end: int) -> str:
    hasher = xxhash.xxh3_64()
    position = begin
    while position < end:
        block = read_at(fd, min(BLOCK, end - position), position)
        if not block:
            break
        hasher.update(block)
        position += len(block)
    return hasher.hexdigest()


def file_size(path: Path) -> int:
    if path.is_dir():
        # lstat: a symlink out of the folder is not looked through.
        sizes = (p.lstat() for p in path.rglob("*"))
        return sum(s.st_size for s in sizes if stat.S_ISREG(s.st_mode))
    return path.stat().st_size
