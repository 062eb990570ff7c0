"""Check a checkpoint's structure, lengths and checksums, collecting every problem.

Unlike ``Source.verify`` (which raises at the first bad tensor), every tensor, zip record and
shard is checked and each problem is named. What is checked per format:

- safetensors: header JSON, dtypes, shapes, offsets (no gaps, no overlaps, nothing past the
  end), the file's length, and each tensor's xxh3 checksum where torchkeep recorded one;
- torch zip: the zip directory and every record's CRC-32, then the pickle (scanned, and loaded
  through the allowlist unless it references other globals);
- torch legacy and plain pickles: the pickle, scanned and loaded through the allowlist;
- sharded folders: the index, every shard (as above), and that each shard holds the tensors
  the index places in it;
- other formats (native checkpoint folders, DCP folders, ...): every safetensors file inside,
  then the format's own ``Source.verify``.

Every file is also opened the way the loaders open it (``formats.registry.open_format``, the
same header parser, containment checks and typed errors), so verify never passes what a load
refuses. Checksums are computed while streaming the file in 16 MiB blocks, so memory stays flat.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptFileError,
    TorchkeepError,
    UnknownFormatError,
    UnsafeFileError,
)
from torchkeep.formats._base import Format, OpenOptions
from torchkeep.formats._guard import reading
from torchkeep.formats.registry import (
    PICKLE,
    SAFETENSORS,
    SHARDED,
    TORCH_LEGACY,
    TORCH_ZIP,
    detect,
    open_format,
)
from torchkeep.formats.safetensors import read_header
from torchkeep.formats.sharded import find_index, read_index
from torchkeep.safety.contain import member
from torchkeep.safety.torch_files import MAX_COMPRESSED_PICKLE
from torchkeep.storage.locate import needs_staging, readable

# Called with (bytes done, bytes in all) as the check streams through the files.
ProgressFn = Callable[[int, int], None]

_BLOCK = 16 << 20
_PICKLED = (TORCH_ZIP, TORCH_LEGACY, PICKLE)


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (file, file:tensor or file:record) and what."""

    where: str
    message: str


@dataclass
class VerifyResult:
    """Everything ``verify`` found.

    Attributes:
        path: what was checked.
        format: its detected format (``"unknown"`` when none matched).
        problems: every problem found; empty means the file is sound.
        notes: what could not be checked, and why.
        tensors: tensors whose presence was confirmed.
        checksums: tensors whose stored checksum was recomputed and matched or not.
    """

    path: str
    format: str = "unknown"
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tensors: int = 0
    checksums: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


class _Checker:
    def __init__(
        self, result: VerifyResult, options: OpenOptions, progress: ProgressFn, total: int
    ) -> None:
        self.result = result
        self.options = options
        self.progress = progress
        self.total = total
        self.done = 0

    def problem(self, where: str | Path, message: str) -> None:
        self.result.problems.append(Problem(str(where), message))

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self.progress(self.done, self.total)

    def file(self, path: Path, fmt: Format) -> set[str] | None:
        """Check one file; return the tensor names it holds (``None`` when unreadable)."""
        if fmt is SAFETENSORS:
            return self.safetensors(path)
        if fmt is TORCH_ZIP and not self.zip_records(path):
            self.result.notes.append(f"{path}: pickle not parsed, as its archive is damaged")
            return None
        if fmt in _PICKLED:
            return self.pickle(path, fmt)
        return self.other(path, fmt)

    def other(self, path: Path, fmt: Format) -> set[str] | None:
        """A format without checks of its own here: its safetensors files, then its verify()."""
        before = len(self.result.problems)
        if path.is_dir():
            for shard in sorted(path.rglob("*.safetensors")):
                name = str(shard.relative_to(path))
                try:
                    inside = member(path, name, path=str(path), what="file")
                except UnsafeFileError:
                    self.result.notes.append(f"{shard}: a symlink out of the folder, not followed")
                    continue
                self.safetensors(inside)
        try:
            with open_format(path, fmt, self.options) as source:
                if len(self.result.problems) == before:  # else verify() repeats the first one
                    source.verify()
                self.result.tensors = max(
                    self.result.tensors, sum(len(e) for e in source.entries().values())
                )
                return {name for entry in source.entries().values() for name in entry}
        except (CorruptFileError, UnsafeFileError) as exc:  # ChecksumError included
            self.problem(path, str(exc))
            return None

    def safetensors(self, path: Path) -> set[str] | None:
        try:
            fd = os.open(path, os.O_RDONLY)
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
        return set(entries) | set(aliases)

    def zip_records(self, path: Path) -> bool:
        """Read every record, so zipfile checks each CRC-32; True when all are readable."""
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            self.problem(path, f"not a readable zip archive (truncated or damaged): {exc}")
            return False
        sound = True
        with archive:
            for info in archive.infolist():
                if (
                    info.compress_type != zipfile.ZIP_STORED
                    and info.file_size > MAX_COMPRESSED_PICKLE
                ):
                    self.problem(
                        f"{path}:{info.filename}",
                        f"compressed record expands to {info.file_size} bytes; not read",
                    )
                    sound = False
                    continue
                try:
                    with archive.open(info) as record:
                        while record.read(_BLOCK):
                            pass
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                    self.problem(f"{path}:{info.filename}", f"record is damaged: {exc}")
                    sound = False
                self.advance(info.compress_size)
        return sound

    def pickle(self, path: Path, fmt: Format) -> set[str] | None:
        try:
            with open_format(path, fmt, self.options) as source:
                # Every tensor, as a load would take it (storages must be whole).
                for entry, infos in source.entries().items():
                    for name in infos:
                        source.get(entry, name)
                names = next(iter(source.entries().values()), {})
                self.result.tensors += sum(len(e) for e in source.entries().values())
                return set(names)
        except (UnsafeFileError, CorruptFileError, UnknownFormatError) as exc:
            self.problem(path, str(exc))
            return None

    def sharded(self, path: Path) -> None:
        try:
            index = find_index(path) if path.is_dir() else path
            if index is None:
                self.problem(path, "no *.index.json weight map")
                return
            weight_map = read_index(index)
        except (CorruptFileError, UnsafeFileError) as exc:
            self.problem(path, str(exc))
            return
        for shard in sorted(set(weight_map.values())):
            try:
                file = member(index.parent, shard, path=str(index), what="shard", flat=True)
            except UnsafeFileError as exc:
                self.problem(index.parent / shard, str(exc))
                continue
            if file.is_dir():
                self.problem(index.parent / shard, f"listed in {index.name} but a folder")
                continue
            if not file.is_file():
                self.problem(index.parent / shard, f"listed in {index.name} but missing")
                continue
            try:
                with reading(file):
                    _, fmt = detect(file)
            except (CorruptFileError, UnknownFormatError) as exc:
                self.problem(file, str(exc))
                continue
            held = self.file(file, fmt)
            if held is None:
                continue
            for name, where in weight_map.items():
                if where == shard and name not in held:
                    self.problem(file, f"{index.name} places {name!r} here, but the shard lacks it")
        if not self.result.problems:
            # The loader's own checks across the shards (an index named as a shard, ...).
            try:
                open_format(path, SHARDED, self.options).close()
            except (CorruptFileError, UnsafeFileError, CheckpointNotFoundError) as exc:
                self.problem(path, str(exc))


def _digest(fd: int, begin: int, end: int) -> str:
    hasher = xxhash.xxh3_64()
    position = begin
    while position < end:
        block = os.pread(fd, min(_BLOCK, end - position), position)
        if not block:
            break
        hasher.update(block)
        position += len(block)
    return hasher.hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        # lstat: a symlink out of the folder is not looked through.
        sizes = (p.lstat() for p in path.rglob("*"))
        return sum(s.st_size for s in sizes if stat.S_ISREG(s.st_mode))
    return path.stat().st_size


def verify(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressFn | None = None,
) -> VerifyResult:
    """Check a file or folder completely and return every problem found, without raising.

    Every tensor, zip record and shard is checked (structure, lengths, stored xxh3 checksums,
    zip CRCs, the pickle through the allowlist) and each problem is named, where a load with
    ``verify=True`` stops at the first one. Memory stays flat: data is streamed in blocks.

    Args:
        path: a file or folder in any format torchkeep reads.
        trust: read pickles without the allowlist (only for files you trust).
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.
        progress: called with (bytes checked, bytes in all) as the check proceeds.

    Returns:
        A :class:`VerifyResult`; ``result.ok`` is true when nothing is wrong.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.

    Example:
        >>> result = torchkeep.verify("model.safetensors")
        >>> result.ok, result.checksums
        (True, 42)
    """
    if needs_staging(path):
        with readable(path) as local:
            staged = verify(local, trust=trust, allow_globals=allow_globals, progress=progress)
        staged.path = os.fspath(path)
        return staged
    where = Path(os.fspath(path))
    result = VerifyResult(str(where))
    try:
        with reading(where):
            resolved, fmt = detect(where)
    except (CorruptFileError, UnknownFormatError, UnsafeFileError) as exc:
        result.problems.append(Problem(str(where), str(exc)))
        return result
    result.format = fmt.name
    options = OpenOptions(trust=trust, allow_globals=tuple(allow_globals), mmap=True)
    checker = _Checker(result, options, progress or (lambda done, total: None), _size(resolved))
    try:
        if fmt is SHARDED:
            checker.sharded(resolved)
        else:
            checker.file(resolved, fmt)
    except TorchkeepError as exc:
        if not isinstance(exc, CorruptFileError | UnsafeFileError):
            raise
        checker.problem(resolved, str(exc))
    return result
