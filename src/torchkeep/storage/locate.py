"""Where a path's bytes are: a local path, an HTTP(S) download in the cache, or an fsspec URL.

The verbs call :func:`needs_staging` first; when it is true they run again on the local path
:func:`readable` or :func:`writable` yields, so every format reader and writer only ever
sees local files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torchkeep.errors import ChecksumError, InvalidArgumentError
from torchkeep.storage.commit import uploaded
from torchkeep.storage.download import download, expected_prefix
from torchkeep.storage.remote import (
    HTTP_SCHEMES,
    RemoteFolder,
    downloaded,
    is_remote,
    local_path,
    scheme,
    split_url,
)

_MAX_HEADER = 100 * 1024 * 1024


def is_url(path: object) -> bool:
    """True for any ``scheme://`` path, ``file://`` included."""
    return scheme(path) is not None


def needs_staging(path: object, sha256: str | None = None, check_hash: bool = False) -> bool:
    """Whether a verb must first bring ``path`` to (or from) a local path."""
    return is_url(path) or sha256 is not None or check_hash


def sha256_of(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, where: str, expected: str | None) -> None:
    if expected is None:
        return
    if not path.is_file():
        raise InvalidArgumentError(
            f"sha256= checks a single file, but {where!r} is a folder; drop sha256=, or "
            "pass verify=True to check the stored checksums"
        )
    actual = sha256_of(path)
    if not actual.startswith(expected):
        raise ChecksumError(
            f"{where!r} has SHA-256 {actual}, but {expected} was expected: the file is not the "
            "one you meant, or it is damaged"
        )


@contextlib.contextmanager
def readable(
    path: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    check_hash: bool = False,
    header_only: bool = False,
) -> Iterator[Path]:
    """A local path holding the bytes of ``path``, checked against the expected hash.

    HTTP(S) URLs are downloaded once into the cache (:mod:`torchkeep.storage.download`); other URLs
    (``s3://``, ``memory://``) are copied to a temporary folder removed on exit. With
    ``header_only`` a remote safetensors file is fetched as its header followed by a sparse
    hole, for :func:`~torchkeep.inspect`, which never reads tensor data.
    """
    where = os.fspath(path)
    kind = scheme(where)
    if kind in HTTP_SCHEMES:
        yield download(where, sha256=sha256, check_hash=check_hash)
        return
    expected = expected_prefix(where, sha256, check_hash)
    if is_remote(where):
        if header_only and expected is None:
            with _header_copy(where) as local:
                if local is not None:
                    yield local
                    return
        with downloaded(where) as local:
            _check(local, where, expected)
            yield local
        return
    local = Path(local_path(where))
    _check(local, where, expected)
    yield local


@contextlib.contextmanager
def _header_copy(url: str) -> Iterator[Path | None]:
    """A local sparse stand-in for a remote safetensors file: its real header, no data."""
    parent, name = split_url(url)
    folder = RemoteFolder(parent)
    inner = f"{folder.root}/{name}"
    if not folder.fs.isfile(inner):
        yield None
        return
    size = int(folder.fs.size(inner))
    head = bytes(folder.fs.cat_file(inner, start=0, end=min(size, 9)))
    if size < 9 or head[8:9] != b"{":
        yield None
        return
    (length,) = struct.unpack("<Q", head[:8])
    if length > min(size - 8, _MAX_HEADER):
        yield None  # let the full reader report the damage
        return
    header = bytes(folder.fs.cat_file(inner, start=0, end=8 + length))
    scratch = Path(tempfile.mkdtemp(prefix="torchkeep-"))
    try:
        local = scratch / name
        with open(local, "wb") as f:
            f.write(header)
            f.truncate(size)
        yield local
    finally:
        for child in scratch.iterdir():
            child.unlink()
        scratch.rmdir()


@contextlib.contextmanager
def writable(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A local path to write ``path``'s content to; uploaded (commit marker last) on success."""
    where = os.fspath(path)
    if is_remote(where):
        with uploaded(where) as local:
            yield local
        return
    if scheme(where) in HTTP_SCHEMES:
        raise InvalidArgumentError(
            f"cannot save to {where!r}: HTTP URLs are read-only; save to a local path or an "
            "fsspec URL (s3://, gs://, ...)"
        )
    yield Path(local_path(where))
