"""Names a file gives for other files, kept inside the folder they belong to.

A manifest, weight map or DCP metadata file names the files next to it. A hostile one names
``../../etc/passwd``, ``/dev/zero`` or a symlink pointing out of the folder. :func:`member`
resolves such a name one component at a time, following symlinks only while they stay inside
the folder, and refuses the name as soon as it would leave it, so that nothing outside the
folder is ever opened or even ``stat``-ed, and no message describes anything there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from torchkeep.errors import CorruptFileError, UnsafeFileError

_MAX_LINKS = 40


class OutsideFolderError(UnsafeFileError, CorruptFileError):
    """A file names another file outside its folder (hostile structure in a damaged file).

    Both an :class:`UnsafeFileError` (nothing outside was touched) and a
    :class:`CorruptFileError` (the file is not a valid one of its format).
    """


def check_name(name: object, *, path: str, what: str, flat: bool = False) -> str:
    """Refuse a name that is not a plain relative path (or, with ``flat``, a plain file name).

    Purely lexical: absolute paths, ``..``, empty or ``.`` segments, backslashes and NUL
    bytes are refused.

    Raises:
        OutsideFolderError: the name could point anywhere but inside the folder.
    """
    if not isinstance(name, str):
        raise OutsideFolderError(
            f"{path!r} names {what} {name!r}, which is not a file name", path=path
        )
    parts = name.split("/")
    bad = (
        not name
        or "\x00" in name
        or "\\" in name
        or name.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
        or (flat and len(parts) != 1)
    )
    if bad:
        raise OutsideFolderError(_outside(path, what, name), path=path)
    if len(name) > 4096 or any(len(part.encode("utf-8", "replace")) > 255 for part in parts):
        raise CorruptFileError(
            f"{path!r} names {what} {name[:80]!r}... whose name is longer than a file system "
            "allows (a damaged or hostile file)"
        )
    return name


def _outside(path: str, what: str, name: str) -> str:
    return (
        f"{path!r} names {what} {name[:200]!r}, which leads outside its folder; refusing it "
        "without reading it (a damaged or hostile file)"
    )


def member(folder: Path, name: object, *, path: str, what: str, flat: bool = False) -> Path:
    """The real path of ``name`` inside ``folder``, symlinks resolved, checked to stay inside.

    Args:
        folder: the folder the name must stay in.
        name: the name as the file gives it (relative, ``/``-separated).
        path: the file that gives the name, for messages.
        what: what the name is (``"shard"``, ``"data file"``), for messages.
        flat: the name must be a plain file name, without folders.

    Returns:
        The resolved path; it may not exist.

    Raises:
        OutsideFolderError: the name, or a symlink along it, leads out of ``folder``.
    """
    checked = check_name(name, path=path, what=what, flat=flat)
    root = Path(os.path.realpath(folder))
    current = root
    pending = list(PurePosixPath(checked).parts)
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if current == root:
                raise OutsideFolderError(_outside(path, what, checked), path=path)
            current = current.parent  # real, and inside: every step so far was resolved
            continue
        candidate = current / part
        try:
            mode = os.lstat(candidate).st_mode
        except OSError:
            current = candidate  # not there (yet): the caller reports it missing
            continue
        if not stat.S_ISLNK(mode):
            current = candidate
            continue
        links += 1
        if links > _MAX_LINKS:
            raise OutsideFolderError(_outside(path, what, checked), path=path)
        target = os.readlink(candidate)
        if os.path.isabs(target):
            # Only a target spelled under the folder's real path is followed; anything else
            # would need a look outside to decide.
            relative = PurePosixPath(target).parts[1:]
            if tuple(relative[: len(root.parts) - 1]) != root.parts[1:]:
                raise OutsideFolderError(_outside(path, what, checked), path=path)
            current = root
            pending = list(relative[len(root.parts) - 1 :]) + pending
        else:
            pending = list(PurePosixPath(target).parts) + pending
    return current
