"""The manifest of a native checkpoint (``checkpoint.json``): read and validated without torch.

Also the format/version check every torchkeep commit document shares (the manifest and the
distributed marker), and the plain numbers (metrics) they hold. The native reader
(:mod:`torchkeep.formats.native`) builds on it; ``torchkeep ls`` uses it alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torchkeep._common import MANIFEST
from torchkeep._facts import ITEM_SIZES
from torchkeep.errors import CheckpointNotFoundError, CorruptFileError
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.contain import check_name, member

PathLike = str | os.PathLike[str]
# How the state tree tags a float JSON cannot hold (see torchkeep.formats.tree).
FLOAT_TAG = "float"
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def check_format(
    document: Any, *, format: str, version: int, what: str, where: str
) -> dict[str, Any]:
    """Refuse a commit document of another format or of a newer version than this one reads.

    Args:
        document: the parsed JSON.
        format: the ``format`` field it must carry.
        version: the newest ``version`` this torchkeep reads.
        what: how to name the document in errors (``"'run/step-1/checkpoint.json'"``).
        where: the checkpoint, for the upgrade message.
    """
    if not isinstance(document, dict) or document.get("format") != format:
        raise CorruptFileError(f"{what} is not a {format!r} document")
    if not isinstance(document.get("version"), int) or document["version"] > version:
        raise CorruptFileError(
            f"{where!r} has {format!r} version {document.get('version')!r}; this "
            f"torchkeep reads up to version {version}: upgrade torchkeep"
        )
    return document


FORMAT = "torchkeep-checkpoint"
VERSION = 1


def _not_committed(path: Path) -> CorruptFileError:
    hint = ""
    if any(p.name.startswith("step-") for p in path.iterdir() if p.is_dir()):
        hint = " It looks like a CheckpointManager folder: use CheckpointManager(path).restore()."
    return CorruptFileError(
        f"folder {str(path)!r} has no {MANIFEST}, so it is not a committed checkpoint: the save "
        f"that wrote it did not finish, or it is not a torchkeep checkpoint.{hint}"
    )


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The parsed ``checkpoint.json`` of a native checkpoint folder, checked for its version."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {str(folder)!r}")
    file = member(folder, MANIFEST, path=str(folder), what="manifest", flat=True)
    if not file.is_file():
        raise _not_committed(folder)
    with open(file, "rb") as f:
        raw = f.read(_json.MAX_BYTES + 1)
    return parse_manifest(raw, path=str(folder / MANIFEST))


_DTYPES = frozenset(ITEM_SIZES)


def parse_manifest(raw: bytes, *, path: str) -> dict[str, Any]:
    """Validate the bytes of a ``checkpoint.json``; return the manifest.

    Pure: nothing but ``raw`` is read. Checks the JSON (bounded, strict), the format and
    version, the ``state``/``tensors``/``files`` sections, every file name (a plain name in
    the checkpoint's folder) and every tensor record (file listed, known dtype, shape of
    non-negative integers, integer byte counts).

    Args:
        raw: the file's bytes.
        path: the manifest file, for messages.

    Raises:
        CorruptFileError: malformed JSON or records, another format, a newer version.
        UnsafeFileError: a file name leading out of the checkpoint folder.
    """
    document = _json.loads(raw, path=path, what="checkpoint.json manifest")
    where = str(Path(path).parent)
    manifest = check_format(document, format=FORMAT, version=VERSION, what=repr(path), where=where)
    for key in ("state", "tensors", "files"):
        if not isinstance(manifest.get(key), dict):
            raise CorruptFileError(f"{path!r} has no valid {key!r} section")

    def bad(problem: str) -> CorruptFileError:
        return CorruptFileError(f"{path!r} is damaged: {problem}")

    for name, info in manifest["files"].items():
        check_name(name, path=path, what="file", flat=True)
        if not isinstance(info, dict) or not _count(info.get("bytes")):
            raise bad(f"file {name!r} has no valid byte count")
    for name, info in manifest["tensors"].items():
        if not isinstance(info, dict):
            raise bad(f"tensor {name!r} has no valid record")
        check_name(info.get("file"), path=path, what="file", flat=True)
        if info["file"] not in manifest["files"]:
            raise bad(f"tensor {name!r} is in unlisted file {info.get('file')!r}")
        if info.get("dtype") not in _DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {info.get('dtype')!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if "nbytes" in info and not _count(info["nbytes"]):
            raise bad(f"tensor {name!r} has an invalid byte count {info['nbytes']!r}")
        if "xxh3" in info and not isinstance(info["xxh3"], str):
            raise bad(f"tensor {name!r} has an invalid checksum {info['xxh3']!r}")
    objects = manifest.get("objects")
    if objects is not None and not isinstance(objects, dict):
        raise bad("its 'objects' record is not an object")
    return manifest


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value < (1 << 63)


def plain_number(node: Any) -> int | float | None:
    """A metric as the state tree stores it (a JSON number, or a tagged non-finite float)."""
    if isinstance(node, bool):
        return None
    if isinstance(node, int | float):
        return node
    if isinstance(node, dict) and node.get("__tk__") == FLOAT_TAG:
        return NON_FINITE.get(str(node.get("value")))
    return None


__all__ = [
    "FORMAT",
    "VERSION",
    "check_format",
    "parse_manifest",
    "plain_number",
    "read_manifest",
]
