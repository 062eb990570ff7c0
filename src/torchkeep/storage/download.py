"""Pretrained weights from an HTTP(S) URL: downloaded once into a cache, hash-checked.

The file is streamed to a hidden temporary name beside its cache entry while its SHA-256 is
computed, checked against the expected hash (``sha256=``, or torch.hub's convention of a hash
prefix in the file name, ``resnet18-f37072fd.pth``), fsynced and only then renamed to its
final name. An interrupted or corrupt download therefore never leaves a file that looks
complete; the next call downloads again. The SHA-256 of every cached file is recorded beside
it and recomputed on every cache hit: an entry whose bytes changed since, or that does not
match the hash the caller expects, is discarded and downloaded again (and the new bytes are
checked before they are cached).

The cache is ``$TORCHKEEP_CACHE`` or ``~/.cache/torchkeep``; each URL gets its own folder
(``downloads/<hash of the URL>/<file name>``), so two URLs ending in the same name never mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path, PurePosixPath
from typing import IO, Any

from torchkeep.errors import ChecksumError, DownloadError, InvalidArgumentError
from torchkeep.safety.contain import member
from torchkeep.storage.local import fsync_dir

CACHE_ENV = "TORCHKEEP_CACHE"
_CHUNK = 1 << 20
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")
_TIMEOUT_S = 60.0


def cache_dir() -> Path:
    """Where downloads are kept: ``$TORCHKEEP_CACHE`` or ``~/.cache/torchkeep``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torchkeep"


def file_name(url: str) -> str:
    """The last path segment of ``url`` (``weights.safetensors``), or ``download``.

    A segment that could not be a plain file name in the cache (``..``, NUL bytes,
    backslashes, a leading dot that would hide it among temporary files) becomes ``download``.
    """
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name or name.startswith(".") or "\x00" in name or "\\" in name or len(name) > 255:
        return "download"
    return name


def cached_path(url: str) -> Path:
    """The cache entry ``url`` downloads to, checked to stay inside the cache.

    Raises:
        UnsafeFileError: the entry would resolve outside the cache (a symlink in it).
    """
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    root = cache_dir() / "downloads"
    return member(root, f"{digest}/{file_name(url)}", path=str(root), what="cache entry")


def _record_path(final: Path) -> Path:
    """Where the SHA-256 of a cache entry is recorded when it is downloaded."""
    return final.with_name(f".{final.name}.sha256")


def _cached(final: Path, expected: str | None) -> bool:
    """Whether the cache entry ``final`` is intact and, if ``expected`` is given, matches it.

    The file's SHA-256 is recomputed on every hit and compared with the digest recorded when
    it was downloaded (and with ``expected``): a file changed in the cache since, or an entry
    without a record, is not used.
    """
    record = _record_path(final)
    if not final.is_file() or not record.is_file():
        return False
    recorded = record.read_text(encoding="ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", recorded):
        return False
    actual = _sha256_of(final)
    return actual == recorded and (expected is None or actual.startswith(expected))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _discard(final: Path) -> None:
    for stale in (final, _record_path(final)):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def expected_prefix(url: str, sha256: str | None, check_hash: bool) -> str | None:
    """The hex digest (or torch.hub prefix) the download must match, if any."""
    if sha256 is not None:
        cleaned = str(sha256).lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{1,64}", cleaned):
            raise InvalidArgumentError(
                f"sha256= must be hex digits (the SHA-256 or a prefix of it), got {sha256!r}"
            )
        return cleaned
    if check_hash:
        match = _HASH_IN_NAME.search(file_name(url))
        if match is None:
            raise InvalidArgumentError(
                f"check_hash=True needs a hash prefix in the file name, like "
                f"'name-<hex>.pth' (torch.hub's convention); {file_name(url)!r} has none: "
                "pass sha256= instead"
            )
        return match.group(1)
    return None


def _progress(total: int | None, name: str) -> Any:
    """A rich progress bar on a terminal, or None."""
    if not sys.stderr.isatty():
        return None
    try:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TransferSpeedColumn,
        )
    except ImportError:
        return None
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
    )
    progress.start()
    progress.add_task(f"downloading {name}", total=total)
    return progress


def _copy(response: IO[bytes], out: IO[bytes], total: int | None, name: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    received = 0
    bar = _progress(total, name)
    try:
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            if bar is not None:
                bar.update(bar.task_ids[0], completed=received)
    finally:
        if bar is not None:
            bar.stop()
    return received, digest.hexdigest()


def download(
    url: str,
    *,
    sha256: str | None = None,
    check_hash: bool = False,
    force: bool = False,
) -> Path:
    """Download ``url`` into the cache once and return the cached file.

    Args:
        url: an ``http://`` or ``https://`` URL.
        sha256: the expected SHA-256 (hex; a prefix of it is accepted).
        check_hash: take the expected hash prefix from the file name (torch.hub style).
        force: download again even when the file is cached.

    Returns:
        The path of the complete, verified file in the cache.

    Raises:
        DownloadError: the server refused, or the connection broke before the whole body
            arrived; nothing was cached.
        ChecksumError: the bytes do not match the expected hash; nothing was cached.
    """
    expected = expected_prefix(url, sha256, check_hash)
    final = cached_path(url)
    if not force and _cached(final, expected):
        return final
    # Absent, changed since it was downloaded, or not the file the caller expects: the entry
    # is removed and downloaded again; the new bytes are checked before they are cached.
    _discard(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f".{final.name}.part-{uuid.uuid4().hex[:12]}")
    request = urllib.request.Request(url, headers={"User-Agent": "torchkeep"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with open(temp, "wb") as out:
                received, digest = _copy(response, out, total, final.name)
                if total is not None and received != total:
                    raise DownloadError(
                        f"download of {url!r} stopped after {received} of {total} bytes; "
                        "nothing was cached: try again"
                    )
                out.flush()
                os.fsync(out.fileno())
        if expected is not None and not digest.startswith(expected):
            raise ChecksumError(
                f"download of {url!r} has SHA-256 {digest}, but {expected} was expected; the "
                "file was deleted, not cached. The URL's file changed or the transfer was "
                "damaged: check the hash you passed, or download again"
            )
        # The digest is recorded first: an entry is used only with its record.
        record_temp = temp.with_name(temp.name + ".sha256")
        with open(record_temp, "w", encoding="ascii") as f:
            f.write(digest + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(record_temp, _record_path(final))
        os.replace(temp, final)
        fsync_dir(final.parent)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        if isinstance(exc, (DownloadError, ChecksumError)):
            raise
        if isinstance(exc, urllib.error.HTTPError):
            reason: object = f"the server answered HTTP {exc.code} {exc.reason}"
        else:
            reason = getattr(exc, "reason", None) or exc
        raise DownloadError(
            f"could not download {url!r}: {reason}; nothing was cached: check the URL and "
            "the connection, then try again"
        ) from exc
    finally:
        for leftover in (temp, temp.with_name(temp.name + ".sha256")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return final
