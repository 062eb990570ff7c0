"""fsspec storage (``s3://``, ``gs://``, ``memory://``, ...): folders addressed by URL.

The operations the commit protocol (:mod:`torchkeep.storage.commit`) and the readers need:
list, read, write one object, upload a local folder with chosen files last, download, and
delete with the commit markers first. ``file://`` URLs and plain paths never come here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptFileError,
    InvalidArgumentError,
    MissingDependencyError,
)

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Schemes served by torchkeep's own HTTP download (a cache, hash checks) rather than fsspec.
HTTP_SCHEMES = ("http", "https")
# Files whose presence makes a folder a committed checkpoint; uploaded last, deleted first.


def scheme(path: object) -> str | None:
    """The URL scheme of ``path`` (``"s3"``), or None for a local path."""
    if not isinstance(path, str):
        return None
    match = _SCHEME.match(path)
    return match.group(1).lower() if match else None


def is_remote(path: object) -> bool:
    """True for URLs that fsspec serves: any scheme except ``file`` and HTTP(S)."""
    found = scheme(path)
    return found is not None and found != "file" and found not in HTTP_SCHEMES


def local_path(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``file:///a/b`` -> ``/a/b``; anything else unchanged."""
    if isinstance(path, str) and scheme(path) == "file":
        return path[len("file://") :]
    return path


def join(url: str, *parts: str) -> str:
    """``s3://b/run`` + ``step-1`` -> ``s3://b/run/step-1``."""
    return "/".join([url.rstrip("/"), *parts])


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem serving ``url`` and the path inside it.

    Raises:
        MissingDependencyError: fsspec (or the scheme's package, such as s3fs) is not
            installed.
        InvalidArgumentError: fsspec knows no such scheme, or refuses the options.
    """
    try:
        import fsspec
    except ImportError as exc:
        raise MissingDependencyError(
            f"{url!r} is a URL; reading and writing URLs needs fsspec: pip install "
            "'torchkeep[s3]' (fsspec and s3fs) or fsspec plus your store's package"
        ) from exc
    try:
        fs, inner = fsspec.core.url_to_fs(url, **dict(options or {}))
    except ImportError as exc:
        raise MissingDependencyError(
            f"{url!r} needs a package that is not installed: {exc}"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(
            f"fsspec cannot open {url!r} ({exc}); check the URL's scheme and storage_options="
        ) from exc
    return fs, str(inner)


class RemoteFolder:
    """A folder on an fsspec filesystem, addressed by URL.

    Args:
        url: the folder (``s3://bucket/run``).
        options: fsspec storage options (``{"endpoint_url": ...}``, credentials, ...).
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.options = dict(options or {})
        self.fs, self.root = filesystem(self.url, self.options)

    def _inner(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def url_of(self, name: str) -> str:
        """The URL of ``name`` inside this folder."""
        return join(self.url, name) if name else self.url

    def children(self) -> list[str]:
        """Names of the entries directly inside the folder (empty when it does not exist)."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in found})

    def exists(self, name: str) -> bool:
        """Whether the file ``name`` (``step-1/checkpoint.json``) exists."""
        path = self._inner(name)
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        return bool(self.fs.isfile(path))

    def read_bytes(self, name: str) -> bytes:
        """The contents of the file ``name``."""
        try:
            return bytes(self.fs.cat_file(self._inner(name)))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self.url_of(name)!r} does not exist") from exc

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write one file (one PUT on object stores: it appears whole or not at all)."""
        self.fs.pipe_file(self._inner(name), data)

    def upload(self, local: Path, name: str, *, last: tuple[str, ...] = ()) -> None:
        """Upload a local file or folder to ``name``; in a folder, ``last`` files go last.

        Raises:
            CheckpointWriteError: an upload failed; the commit marker was not written.
        """
        target = self._inner(name)
        try:
            if local.is_file():
                self.fs.put_file(str(local), target)
                return
            files = sorted(p for p in local.rglob("*") if p.is_file())
            ordered = [p for p in files if p.name not in last]
            ordered += [p for name in last for p in files if p.name == name]
            for file in ordered:
                self.fs.put_file(str(file), f"{target}/{file.relative_to(local).as_posix()}")
        except OSError as exc:
            raise CheckpointWriteError(
                exc.errno or 5,
                f"could not upload {str(local)!r} to {self.url_of(name)!r}: {exc}; its commit "
                "marker was not written, so readers skip it",
            ) from exc

    def download(self, name: str, local: Path) -> Path:
        """Copy the file or folder ``name`` to ``local`` (a path that does not exist yet)."""
        source = self._inner(name)
        if self.fs.isdir(source):
            local.mkdir(parents=True)
            root = local.resolve()
            for file in self.fs.find(source):
                rel = str(file)[len(source.rstrip("/")) + 1 :]
                dest = (local / rel).resolve()
                if root not in dest.parents:
                    raise CorruptFileError(
                        f"{self.url_of(name)!r} holds an object named {rel!r}, which would be "
                        "written outside the download folder; refusing it"
                    )
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(file, str(dest))
        elif self.fs.isfile(source):
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(source, str(local))
        else:
            raise CheckpointNotFoundError(f"no checkpoint at {self.url_of(name)!r}")
        return local

    def remove(self, name: str, *, markers: tuple[str, ...] = ()) -> None:
        """Delete ``name``; its commit markers first, so a crash leaves it uncommitted."""
        target = self._inner(name)
        for marker in markers:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{target}/{marker}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(target, recursive=True)
        self.fs.invalidate_cache(self.root)


def split_url(url: str) -> tuple[str, str]:
    """``s3://b/run/model.pt`` -> (``s3://b/run``, ``model.pt``)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    return parent, name


@contextlib.contextmanager
def downloaded(url: str, options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """A local copy of the file or folder at ``url``, removed on exit."""
    parent, name = split_url(url)
    folder = RemoteFolder(parent, options)
    scratch = Path(tempfile.mkdtemp(prefix="torchkeep-"))
    try:
        yield folder.download(name, scratch / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
