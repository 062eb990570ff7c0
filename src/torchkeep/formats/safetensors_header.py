"""The safetensors header: read and validated without torch.

The one parser of the layout's header, as strict as the ``safetensors`` library's or more.
:mod:`torchkeep.formats.safetensors` builds its reader and writer on it; the command line
uses it alone to describe and verify a file without importing torch.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchkeep._facts import ITEM_SIZES, SAFETENSORS_DTYPES, TensorInfo
from torchkeep.errors import CorruptFileError
from torchkeep.io.positional import BINARY, read_at
from torchkeep.safety import bounded_json as _json

ALIASES_KEY = "torchkeep.aliases"
CHECKSUMS_KEY = "torchkeep.xxh3"
# Read by torchkeep.models.model; checked here so that every reader refuses a malformed one.
MODEL_KEY = "torchkeep.model"
# The reference parser's limit on the header length.
MAX_HEADER = 100_000_000
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1


class Entry:
    """One tensor of a header: its safetensors dtype code, torch dtype name, shape (torch's:
    float4 pairs counted as one element) and data offsets."""

    __slots__ = ("begin", "code", "dtype", "end", "shape")

    def __init__(self, code: str, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.code = code
        self.dtype = SAFETENSORS_DTYPES[code]
        self.shape = shape
        self.begin = begin
        self.end = end


@dataclass(frozen=True)
class Header:
    """A validated safetensors header.

    Attributes:
        data_start: the file offset where tensor data begins (8 + the header length).
        tensors: every stored tensor, in header order.
        metadata: ``__metadata__`` (strings to strings).
        aliases: torchkeep's tied names, ``{alias: stored name}``.
        checksums: torchkeep's per-tensor xxh3 digests, ``{name: hex}``.
    """

    data_start: int
    tensors: dict[str, Entry]
    metadata: dict[str, str]
    aliases: dict[str, str]
    checksums: dict[str, str]


def _corrupt(path: str, problem: str) -> CorruptFileError:
    return CorruptFileError(f"{path!r} is not a valid safetensors file: {problem}")


def _is_index(value: object, limit: int) -> bool:
    # bool is an int subclass; JSON true is not a size.
    return type(value) is int and 0 <= value <= limit


def parse_header(raw: bytes, *, path: str, file_size: int) -> Header:
    """Validate a safetensors header as strictly as the ``safetensors`` library does, or more.

    Checks the length field against ``file_size``, that the header is strict UTF-8 JSON
    (bounded depth, no duplicate keys, no NaN), every tensor's dtype (known names only),
    shape and ``data_offsets`` (non-negative integers, not booleans, within int64), that
    each tensor's byte count (overflow-checked) matches its offsets, that the tensors tile the
    data section without gaps or overlaps, that the data section is exactly as long as the
    file, and that ``__metadata__`` and torchkeep's JSON fields in it are well formed.

    Args:
        raw: the file's first bytes: the 8-byte length and at least the whole header (the
            whole file will do).
        path: the file, for messages.
        file_size: the file's full length in bytes.

    Returns:
        The validated header.

    Raises:
        CorruptFileError: anything malformed, naming the file, the tensor and the offset.
    """
    if file_size < 8 or len(raw) < 8:
        raise _corrupt(path, f"the file is {file_size} bytes, shorter than the 8-byte length field")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > file_size - 8:
        raise _corrupt(
            path,
            f"the header length field says {length} bytes but only {file_size - 8} bytes follow "
            "it (the file is truncated, or its first bytes are damaged)",
        )
    if length > MAX_HEADER:
        raise _corrupt(path, f"the header length field says {length} bytes, over the 100 MB limit")
    if len(raw) < 8 + length:
        raise _corrupt(path, f"only {len(raw) - 8} of the header's {length} bytes were given")
    text = raw[8 : 8 + length]
    if not text.startswith(b"{"):
        raise _corrupt(path, "the header (from byte 8) does not start with '{'")
    header = _json.loads(text, path=path, what="safetensors header", max_bytes=MAX_HEADER)
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    tensors = {name: _parse_entry(path, name, spec) for name, spec in header.items()}
    data_start = 8 + length
    _check_layout(path, tensors, file_size - data_start)
    _check_json(path, metadata, MODEL_KEY)
    return Header(
        data_start,
        tensors,
        metadata,
        _json_field(path, metadata, ALIASES_KEY),
        _json_field(path, metadata, CHECKSUMS_KEY),
    )


def read_header(path: str, fd: int, size: int) -> Header:
    """Read the header of the open file ``fd`` (``size`` bytes long) and validate it."""
    head = read_at(fd, 8, 0) if size >= 8 else b""
    if len(head) == 8:
        (length,) = struct.unpack("<Q", head)
        if length <= min(size - 8, MAX_HEADER):
            head += read_at(fd, length, 8)
    return parse_header(head, path=path, file_size=size)


def _parse_entry(path: str, name: str, spec: Any) -> Entry:
    if not isinstance(spec, dict):
        raise _corrupt(path, f"the header entry for tensor {name!r} is not an object")
    code = spec.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unsupported dtype {code!r}")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_index(d, _INT64_MAX) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_index(o, _UINT64_MAX) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    count = 1
    for dim in shape:
        # Checked at every step, as the reference parser does, so a zero later in the shape
        # does not excuse an overflow earlier in it.
        count *= dim
        if count > _INT64_MAX:
            raise _corrupt(path, f"tensor {name!r} has a shape {shape} whose size overflows")
    expected = count * ITEM_SIZES[SAFETENSORS_DTYPES[code]]
    if code == "F4":
        # The shape counts 4-bit values, two to a byte and to a torch element.
        if count % 2:
            raise _corrupt(
                path, f"tensor {name!r} ({code}{shape}) holds {count} 4-bit values, not whole bytes"
            )
        if not shape or shape[-1] % 2:
            raise _corrupt(
                path,
                f"tensor {name!r} ({code}{shape}) has no torch form: torch keeps float4 values "
                "in pairs along the last dimension (float4_e2m1fn_x2), which must be even",
            )
        expected = count // 2
        shape = [*shape[:-1], shape[-1] // 2]
    if expected > _INT64_MAX:
        raise _corrupt(path, f"tensor {name!r} ({code}{shape}) is too large to exist")
    if offsets[1] - offsets[0] != expected:
        raise _corrupt(
            path,
            f"tensor {name!r} ({code}{shape}) needs {expected} bytes but its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}",
        )
    return Entry(code, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: str, entries: dict[str, Entry], data_size: int) -> None:
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap"
            raise _corrupt(path, f"tensor {name!r} at data offset {entry.begin} {problem}")
        position = entry.end
    if position > data_size:
        raise _corrupt(
            path,
            f"it is truncated: its header declares tensor data through byte {position} of the "
            f"data section, but the file holds only {data_size} bytes of data",
        )
    if position < data_size:
        raise _corrupt(
            path, f"{data_size - position} bytes follow the last tensor's data (damaged header?)"
        )


def _json_field(path: str, metadata: dict[str, str], key: str) -> dict[str, str]:
    """A torchkeep metadata field holding a JSON object of strings (aliases, checksums)."""
    if key not in metadata:
        return {}
    value = _json.loads(metadata[key], path=path, what=f"metadata field {key!r}")
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _corrupt(path, f"metadata field {key!r} is not a JSON object of strings")
    return value


def _check_json(path: str, metadata: dict[str, str], key: str) -> None:
    if key in metadata:
        _json.loads(metadata[key], path=path, what=f"metadata field {key!r}")


def sniff(head: bytes) -> bool:
    """Whether a file's first bytes look like safetensors: a plausible length, then ``{``."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return bool(2 <= length < (1 << 40))


def is_safetensors_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file the format registry would open as safetensors."""
    where = Path(path)
    if where.name.endswith(".index.json") or not where.is_file():
        return False
    try:
        with open(where, "rb") as f:
            return sniff(f.read(9))
    except OSError:
        return False


# Dtypes every torch this package supports has: a header holding only these needs no torch
# to say whether a load would accept it.
COMMON_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})


def uncommon_dtypes(header: Header) -> set[str]:
    """The dtype codes in ``header`` outside :data:`COMMON_DTYPES` (torch may lack them)."""
    return {entry.code for entry in header.tensors.values()} - COMMON_DTYPES


def tensor_infos(header: Header) -> dict[str, TensorInfo]:
    """Every tensor the header describes, tied names (torchkeep's aliases) included."""
    infos = {
        name: TensorInfo(name, e.shape, e.dtype, e.end - e.begin)
        for name, e in header.tensors.items()
    }
    for alias, target in header.aliases.items():
        if target in infos and alias not in infos:
            found = infos[target]
            infos[alias] = TensorInfo(alias, found.shape, found.dtype, found.nbytes)
    return infos


def read_file_header(path: str | os.PathLike[str]) -> Header:
    """The validated header of the safetensors file at ``path``."""
    where = os.fspath(path)
    fd = os.open(where, os.O_RDONLY | BINARY)
    try:
        return read_header(where, fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


__all__ = [
    "ALIASES_KEY",
    "CHECKSUMS_KEY",
    "MAX_HEADER",
    "MODEL_KEY",
    "COMMON_DTYPES",
    "Entry",
    "Header",
    "is_safetensors_file",
    "parse_header",
    "read_file_header",
    "read_header",
    "sniff",
    "tensor_infos",
    "uncommon_dtypes",
]
