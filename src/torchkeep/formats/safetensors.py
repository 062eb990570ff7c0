"""safetensors files: an 8-byte header length, a JSON header, then raw tensor bytes.

Read and written here directly, so the header is validated with precise messages before any
data is read, tensors are read straight into their destination, and torchkeep's extras live in
the standard ``__metadata__`` (string to string) where other tools ignore them:

- ``torchkeep.aliases``: JSON ``{alias: stored name}`` for tied weights stored once;
- ``torchkeep.xxh3``: JSON ``{name: xxh3-64 hex}`` checked by ``verify``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchkeep._tensors import (
    DTYPE_FROM_NAME,
    FLOAT4,
    NAME_FROM_DTYPE,
    TensorInfo,
    byte_view,
    check_saveable,
    dtype_name,
    xxh3,
)
from torchkeep.errors import ChecksumError, CorruptFileError
from torchkeep.formats._base import OpenOptions, Source, WriteRequest
from torchkeep.io.read import ReadExtent, read_extents
from torchkeep.io.write import FilePlan, Slot, write_files
from torchkeep.safety import bounded_json as _json

ALIASES_KEY = "torchkeep.aliases"
CHECKSUMS_KEY = "torchkeep.xxh3"
# Read by torchkeep.models.model; checked here so that every reader refuses a malformed one.
MODEL_KEY = "torchkeep.model"
# The reference parser's limit on the header length.
MAX_HEADER = 100_000_000
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1


class _Entry:
    __slots__ = ("begin", "dtype", "end", "shape")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.dtype = dtype
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
    tensors: dict[str, _Entry]
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
    head = os.pread(fd, 8, 0) if size >= 8 else b""
    if len(head) == 8:
        (length,) = struct.unpack("<Q", head)
        if length <= min(size - 8, MAX_HEADER):
            head += os.pread(fd, length, 8)
    return parse_header(head, path=path, file_size=size)


def _parse_entry(path: str, name: str, spec: Any) -> _Entry:
    if not isinstance(spec, dict):
        raise _corrupt(path, f"the header entry for tensor {name!r} is not an object")
    code = spec.get("dtype")
    if not isinstance(code, str) or code not in DTYPE_FROM_NAME:
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
    dtype = DTYPE_FROM_NAME[code]
    count = 1
    for dim in shape:
        # Checked at every step, as the reference parser does, so a zero later in the shape
        # does not excuse an overflow earlier in it.
        count *= dim
        if count > _INT64_MAX:
            raise _corrupt(path, f"tensor {name!r} has a shape {shape} whose size overflows")
    expected = count * dtype.itemsize
    if dtype == FLOAT4:
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
    return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: str, entries: dict[str, _Entry], data_size: int) -> None:
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


class SafetensorsSource(Source):
    """A safetensors file opened for lazy reads."""

    def __init__(self, path: Path, options: OpenOptions) -> None:
        super().__init__(str(path), "safetensors")
        self._device = options.device
        self._fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            header = read_header(str(path), self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._data_start, self._tensors, self.metadata = (
            header.data_start,
            header.tensors,
            header.metadata,
        )
        self._checksums, aliases = header.checksums, header.aliases
        infos = {
            name: TensorInfo(name, e.shape, dtype_name(e.dtype), e.end - e.begin)
            for name, e in self._tensors.items()
        }
        for alias, target in aliases.items():
            if target in infos and alias not in infos:
                infos[alias] = TensorInfo(
                    alias, infos[target].shape, infos[target].dtype, infos[target].nbytes
                )
        self._entries = {"": infos}
        self._aliases = {"": {a: t for a, t in aliases.items() if t in self._tensors}}

    def _stored(self, name: str) -> tuple[str, _Entry]:
        stored = self._aliases[""].get(name, name)
        return stored, self._tensors[stored]

    def _read(self, stored: str, entry: _Entry, out: torch.Tensor) -> None:
        view = byte_view(out)
        done = os.preadv(self._fd, [view], self._data_start + entry.begin) if view.nbytes else 0
        if done != view.nbytes:
            raise _corrupt(self.path, f"tensor {stored!r}: read {done} of {view.nbytes} bytes")

    def get(self, entry: str, name: str) -> torch.Tensor:
        stored, spec = self._stored(name)
        if self._device == "meta":
            return torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        out = torch.empty(spec.shape, dtype=spec.dtype)
        self._read(stored, spec, out)
        return out if self._device == "cpu" else out.to(self._device)

    def _direct(self, spec: _Entry, dest: torch.Tensor) -> bool:
        return (
            dest.device.type == "cpu"
            and dest.dtype == spec.dtype
            and dest.is_contiguous()
            and tuple(dest.shape) == spec.shape
        )

    def read_into(self, entry: str, name: str, dest: torch.Tensor) -> None:
        stored, spec = self._stored(name)
        if self._direct(spec, dest):
            # Straight into the parameter's memory: no temporary copy.
            self._read(stored, spec, dest.data)
        else:
            super().read_into(entry, name, dest)

    def plan_reads(
        self, pairs: Sequence[tuple[str, torch.Tensor]]
    ) -> tuple[list[ReadExtent], list[tuple[str, torch.Tensor]]]:
        """Extents for the pairs that can be read straight into their destination, and the rest.

        A destination qualifies when it is a contiguous CPU tensor of the stored dtype and
        shape; the others need a cast or a device copy.
        """
        extents: list[ReadExtent] = []
        rest: list[tuple[str, torch.Tensor]] = []
        for name, dest in pairs:
            stored, spec = self._stored(name)
            if self._direct(spec, dest):
                offset = self._data_start + spec.begin
                extents.append(
                    ReadExtent(self._fd, offset, byte_view(dest.data), self.path, stored)
                )
            else:
                rest.append((name, dest))
        return extents, rest

    def read_into_many(self, entry: str, pairs: Sequence[tuple[str, torch.Tensor]]) -> None:
        extents, rest = self.plan_reads(pairs)
        read_extents(extents)
        for name, dest in rest:
            super().read_into(entry, name, dest)

    def verify(self, entry: str | None = None) -> None:
        for name, expected in self._checksums.items():
            if name not in self._tensors:
                continue
            spec = self._tensors[name]
            tensor = torch.empty(spec.shape, dtype=spec.dtype)
            self._read(name, spec, tensor)
            actual = xxh3(tensor)
            if actual != expected:
                raise ChecksumError(
                    f"tensor {name!r} in {self.path!r} is damaged: its bytes hash to {actual}, "
                    f"but {expected} was recorded when it was saved (data bytes "
                    f"{self._data_start + spec.begin} to {self._data_start + spec.end})"
                )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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


def file_shape(tensor: torch.Tensor) -> list[int]:
    """The shape a safetensors header gives ``tensor``: float4's last dimension counts values."""
    shape = list(tensor.shape)
    if tensor.dtype == FLOAT4:
        shape[-1] *= 2
    return shape


def check_storable(name: str, tensor: torch.Tensor) -> None:
    """Refuse what safetensors cannot hold (``tensor`` may be a meta tensor, for its facts).

    Raises:
        UnsupportedTensorError: a sparse, nested or quantized tensor, a dtype safetensors has
            no name for, or a 0-d float4 tensor; the message names the formats that can.
    """
    if tensor.device.type == "meta" and tensor.layout == torch.strided and not tensor.is_nested:
        # Planned from a file's facts: only the dtype and the number of dimensions matter.
        tensor = torch.empty((0,) * tensor.dim(), dtype=tensor.dtype)
    check_saveable(name, tensor, "safetensors")


def build_header(
    request: WriteRequest, checksums: dict[str, str] | None
) -> tuple[bytes, list[str]]:
    """The padded header bytes and the order tensors are written in.

    Raises:
        UnsupportedTensorError: a tensor safetensors cannot hold.
    """
    for name, tensor in request.tensors.items():
        check_storable(name, tensor)
    # Largest element size first keeps every tensor aligned to its element size.
    order = sorted(request.tensors, key=lambda n: (-request.tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    metadata = {"format": "pt", **request.metadata}
    if request.aliases:
        metadata[ALIASES_KEY] = json.dumps(dict(request.aliases), sort_keys=True)
    if checksums:
        metadata[CHECKSUMS_KEY] = json.dumps(checksums, sort_keys=True)
    header["__metadata__"] = metadata
    offsets: dict[str, list[int]] = {}
    position = 0
    for name in order:
        tensor = request.tensors[name]
        size = tensor.numel() * tensor.element_size()
        offsets[name] = [position, position + size]
        position += size
    # Header entries keep the caller's order (readers list them so); data follows `order`.
    for name in request.ordered_names():
        if name in request.tensors:
            tensor = request.tensors[name]
            header[name] = {
                "dtype": NAME_FROM_DTYPE[tensor.dtype],
                "shape": file_shape(tensor),
                "data_offsets": offsets[name],
            }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


class SafetensorsFormat:
    name: str = "safetensors"
    is_folder: bool = False

    def sniff(self, path: Path, head: bytes) -> bool:
        if len(head) < 9 or head[8:9] != b"{":
            return False
        (length,) = struct.unpack("<Q", head[:8])
        return bool(2 <= length < (1 << 40))

    def open(self, path: Path, options: OpenOptions) -> Source:
        return SafetensorsSource(path, options)

    def write(self, request: WriteRequest, path: Path) -> None:
        write_files([file_plan(request, path)], durable=request.durable)


def file_plan(
    request: WriteRequest,
    path: Path,
    *,
    known: Mapping[str, str] | None = None,
    reuse: bool = False,
) -> FilePlan:
    """Where every byte of ``request`` goes in a safetensors file, for the parallel writer.

    The header is sized with placeholder checksums: xxh3 digests are always 16 hex digits, so
    the header built from the real ones, after the data is written, has the same length.

    Args:
        request: the tensors (contiguous, on the CPU), aliases and metadata.
        path: the file to write.
        known: checksums already computed for some tensors.
        reuse: ``path`` is an existing file to overwrite in place.
    """
    header, order = build_header(request, dict.fromkeys(request.tensors, "0" * 16))
    slots: list[Slot] = []
    offset = len(header)
    for name in order:
        view = byte_view(request.tensors[name])
        slots.append(Slot(name, view, offset))
        offset += view.nbytes

    def make_header(checksums: Mapping[str, str]) -> bytes:
        return build_header(request, dict(checksums))[0]

    return FilePlan(path, len(header), make_header, slots, dict(known or {}), reuse)
