"""Local filesystem writes that are never seen half-done.

Everything is written under a temporary name in the destination's own folder (so the final
rename stays on one filesystem and is atomic), fsynced, renamed over the destination, and the
folder is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchkeep._common import TEMP_MARKER
from torchkeep.errors import CheckpointWriteError, TorchkeepError
from torchkeep.io.positional import BINARY


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk (a no-op on Windows, which
    cannot open a folder, and commits a rename with its metadata)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, (os.O_RDWR if os.name == "nt" else os.O_RDONLY) | BINARY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A fresh hidden name beside ``path`` that marks the file as unfinished."""
    # The suffix is kept so that writers which check it (torch.export.save) accept the name.
    return path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}{path.suffix}")


def is_leftover(entry: Path, stem: str = "") -> bool:
    """Whether ``entry`` is a hidden temporary name an interrupted write left (of a file or
    folder named ``stem`` when given): never a committed file, safe to remove."""
    name = entry.name
    return name.startswith(f".{stem}") and TEMP_MARKER in name


def remove_leftovers(folder: Path, stem: str = "") -> None:
    """Remove the hidden temporary files and folders interrupted writes left in ``folder``."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not is_leftover(entry, stem):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def retire(path: Path) -> Path:
    """Rename ``path`` to a hidden temporary name beside it, so it is never seen half-deleted;
    return the new name (remove it, or keep its files, next)."""
    hidden = temp_sibling(path)
    os.replace(path, hidden)
    return hidden


def remove_tree(path: Path) -> None:
    """Delete a folder, renamed out of sight first: a crash mid-deletion leaves it hidden."""
    shutil.rmtree(retire(path), ignore_errors=True)


def write_failed(exc: OSError, target: Path) -> CheckpointWriteError:
    """A disk's refusal (full, read-only, I/O error) while writing ``target``, typed."""
    where = f" (while writing {exc.filename})" if exc.filename else ""
    message = (
        f"could not write {str(target)!r}: {exc.strerror or exc}{where}; nothing was written "
        "there and what was there before is untouched"
    )
    if exc.errno is not None:
        return CheckpointWriteError(exc.errno, message)
    return CheckpointWriteError(message)


def disk_error(exc: BaseException) -> OSError | None:
    """The disk's own error behind ``exc`` (unwrapping :func:`write_failed`), or None."""
    if isinstance(exc, CheckpointWriteError) and isinstance(exc.__cause__, OSError):
        return exc.__cause__
    if isinstance(exc, OSError) and not isinstance(exc, TorchkeepError):
        return exc
    return None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one step.

    Args:
        path: the destination file. Its folder is created if needed.
        durable: fsync the file and its folder, so the result survives a crash or power cut.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(final)
    try:
        yield temp
        if durable:
            fsync_file(temp)
        os.replace(temp, final)
        if durable:
            fsync_dir(final.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, TorchkeepError):
            raise write_failed(exc, final) from exc
        raise


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2() -> Any:
    """libc's ``renameat2`` (Linux, glibc 2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False where the system or filesystem cannot (nothing was changed then).
    """
    if _RENAMEAT2 is None:
        return False
    done = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it takes the place of ``path``.

    An existing folder at ``path`` is swapped with the new one in one step where the system
    can (Linux), then removed, so ``path`` always holds the old folder or the new one; where
    it cannot, it is moved aside first and removed only after the new one is in place, so a
    crash leaves either folder, if not at ``path`` then under a recoverable hidden name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(final)
    temp.mkdir()
    swapped = False
    try:
        yield temp
        if durable:
            for child in temp.iterdir():
                if child.is_file():
                    fsync_file(child)
            fsync_dir(temp)
        if final.exists() and exchange(temp, final):
            # One step: the old folder now has the temporary name. Kept if the fsync fails,
            # so a caller can put it back (training.checkpoint does).
            swapped = True
            if durable:
                fsync_dir(final.parent)
            shutil.rmtree(temp, ignore_errors=True)
            return
        old: Path | None = None
        if final.exists():
            # Where paths cannot be swapped in one step, a crash between these two renames
            # leaves the old folder under a hidden name, not at ``path``.
            old = temp_sibling(final)
            os.replace(final, old)
        os.replace(temp, final)
        if durable:
            fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        if not swapped:
            shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, TorchkeepError):
            raise write_failed(exc, final) from exc
        raise
