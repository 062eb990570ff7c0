"""Which format a path holds, decided from its bytes; which format a new file gets."""

from __future__ import annotations

import os
from pathlib import Path

from torchkeep._common import SAFETENSORS_SUFFIX, TEMP_MARKER, TORCH_SUFFIXES
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptFileError,
    InvalidArgumentError,
    UnknownFormatError,
)
from torchkeep.formats._base import Format, OpenOptions, Source
from torchkeep.formats._guard import os_error, reading
from torchkeep.formats.dcp import DcpFormat
from torchkeep.formats.native import NativeFormat
from torchkeep.formats.pt2 import Pt2Format
from torchkeep.formats.safetensors import SafetensorsFormat
from torchkeep.formats.sharded import ShardedFormat
from torchkeep.formats.torch_pickle import PlainPickleFormat, TorchLegacyFormat, TorchZipFormat
from torchkeep.formats.torchscript import TorchScriptFormat

_HEAD_BYTES = 64
# Single-file weights a model folder commonly holds, most preferred first.
_FOLDER_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
    "weights.safetensors",
)


def open_source(path: Path, options: OpenOptions) -> Source:
    """Detect ``path``'s format from its bytes and open it.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnknownFormatError: bytes of no supported format.
        CorruptFileError: malformed data; whatever the parser raised is the cause.
        UnsafeFileError: hostile structure (globals outside the allowlist, names leading
            out of the folder).
    """
    with reading(path):
        resolved, fmt = detect(path)
    return open_format(resolved, fmt, options)


def open_format(path: Path, fmt: Format, options: OpenOptions) -> Source:
    """Open ``path`` as ``fmt``, every failure a typed error naming the file."""
    with reading(path):
        return fmt.open(path, options)


SAFETENSORS = SafetensorsFormat()
TORCH_ZIP = TorchZipFormat()
TORCH_LEGACY = TorchLegacyFormat()
PICKLE = PlainPickleFormat()
SHARDED = ShardedFormat(open_source)
NATIVE = NativeFormat()
DCP = DcpFormat()
TORCHSCRIPT = TorchScriptFormat()
TORCH_EXPORT = Pt2Format()

# Order matters: the most specific signatures first; plain pickle last, as it matches any
# protocol-2+ pickle (the legacy torch layout starts with one too).
FILE_FORMATS: tuple[Format, ...] = (
    SAFETENSORS,
    TORCHSCRIPT,
    TORCH_EXPORT,
    TORCH_ZIP,
    TORCH_LEGACY,
    PICKLE,
)
BY_NAME: dict[str, Format] = {
    "safetensors": SAFETENSORS,
    "torch": TORCH_ZIP,
    "torch-zip": TORCH_ZIP,
    "torch-legacy": TORCH_LEGACY,
    "sharded": SHARDED,
}


def detect(path: Path) -> tuple[Path, Format]:
    """Return the file (or folder) to open and its format.

    Raises:
        CheckpointNotFoundError: nothing at ``path``, or a folder without weights.
        CorruptFileError: an empty file.
        UnknownFormatError: bytes that match no supported format.
    """
    if not path.exists():
        raise CheckpointNotFoundError(_not_found_message(path))
    if path.is_dir():
        if NATIVE.sniff(path, b""):
            return path, NATIVE
        if SHARDED.sniff(path, b""):
            return path, SHARDED
        if DCP.sniff(path, b""):
            return path, DCP
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return detect(path / name)
        raise CheckpointNotFoundError(
            f"folder {str(path)!r} holds no weights torchkeep recognises: expected a "
            f"checkpoint.json, a *.index.json weight map or one of {', '.join(_FOLDER_FILES)}"
            + _folder_hint(path)
        )
    if path.name.endswith(".index.json"):
        return path, SHARDED
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as exc:
        raise os_error(exc, path) from exc
    if not head:
        raise CorruptFileError(
            f"{str(path)!r} is empty (0 bytes): the save that wrote it probably did not finish"
        )
    for fmt in FILE_FORMATS:
        if fmt.sniff(path, head):
            return path, fmt
    raise UnknownFormatError(
        f"{str(path)!r} is not a format torchkeep reads (its first bytes are {head[:16]!r}). "
        "Supported: safetensors, torch.save files (zip or legacy), pickles of tensors, "
        "and folders with a *.index.json weight map."
    )


def for_writing(path: Path, format: str | None, sharded: bool) -> Format:
    """The format a new file at ``path`` gets: explicit, from the suffix, or sharded folder."""
    if format is not None:
        if format not in BY_NAME:
            raise InvalidArgumentError(
                f"unknown format {format!r}; choose one of {', '.join(BY_NAME)}"
            )
        return BY_NAME[format]
    if sharded:
        return SHARDED
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return SAFETENSORS
    if suffix in TORCH_SUFFIXES:
        return TORCH_ZIP
    raise InvalidArgumentError(
        f"cannot tell the format of {str(path)!r} from its suffix {suffix or '(none)'!r}: use "
        ".safetensors (recommended) or .pt/.pth/.bin, pass format=..., or pass "
        "max_shard_size=... to write a sharded folder"
    )


def _not_found_message(path: Path) -> str:
    message = f"no checkpoint at {str(path)!r}: the path does not exist"
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        stem = path.stem.lower()
        similar = sorted(p.name for p in parent.iterdir() if stem and stem in p.name.lower())
        if similar:
            message += f" (similar names there: {', '.join(similar[:5])})"
    else:
        message += f" (nor does its folder {str(parent)!r}; current folder: {os.getcwd()!r})"
    return message


def _folder_hint(path: Path) -> str:
    steps = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("step-"))
    if steps:
        return (
            f". It looks like a CheckpointManager folder ({len(steps)} step folders); load one "
            f"of them, e.g. {str(path / steps[-1])!r}, or use CheckpointManager(path).restore()"
        )
    if any(p.name.startswith(".") and TEMP_MARKER in p.name for p in path.iterdir()):
        return ". It holds only unfinished temporary files from an interrupted save"
    return ""
