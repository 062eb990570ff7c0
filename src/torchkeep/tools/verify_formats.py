"""The format-by-format checks of :func:`torchkeep.verify` beyond a safetensors file's.

Imported by ``verify`` only for those formats: they need torch (the loaders' own readers),
a safetensors file does not.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

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
from torchkeep.formats.sharded import find_index, read_index
from torchkeep.safety.contain import member
from torchkeep.safety.torch_files import MAX_COMPRESSED_PICKLE
from torchkeep.tools.checks import (
    BLOCK,
    HeaderChecker,
    Problem,
    ProgressFn,
    VerifyResult,
    file_size,
)

_PICKLED = (TORCH_ZIP, TORCH_LEGACY, PICKLE)


class _Checker(HeaderChecker):
    def __init__(
        self, result: VerifyResult, options: OpenOptions, progress: ProgressFn, total: int
    ) -> None:
        super().__init__(result, progress, total)
        self.options = options

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
                        while record.read(BLOCK):
                            pass
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                    self.problem(f"{path}:{info.filename}", f"record is damaged: {exc}")
                    sound = False
                self.result.crcs += 1
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
                count = sum(len(e) for e in source.entries().values())
                self.result.tensors += count
                self.result.unpickled += count
                self.result.files += 1
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


def check(
    where: Path,
    result: VerifyResult,
    trust: bool,
    allow_globals: tuple[str, ...],
    progress: ProgressFn,
) -> VerifyResult:
    """:func:`torchkeep.verify` of a local path that is not a single safetensors file."""
    try:
        with reading(where):
            resolved, fmt = detect(where)
    except (CorruptFileError, UnknownFormatError, UnsafeFileError) as exc:
        result.problems.append(Problem(str(where), str(exc)))
        return result
    result.format = fmt.name
    result.trusted = trust
    options = OpenOptions(trust=trust, allow_globals=allow_globals, mmap=True)
    checker = _Checker(result, options, progress, file_size(resolved))
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
