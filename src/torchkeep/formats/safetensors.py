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
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from torchkeep._tensors import (
    DTYPE_FROM_NAME,
    FLOAT4,
    NAME_FROM_DTYPE,
    byte_view,
    check_saveable,
)
from torchkeep.errors import ChecksumError
from torchkeep.formats._base import OpenOptions, Source, Stretch, WriteRequest
from torchkeep.formats.safetensors_header import (
    ALIASES_KEY,
    CHECKSUMS_KEY,
    Entry,
    Header,
    _corrupt,
    read_header,
    sniff,
    tensor_infos,
)
from torchkeep.io.positional import BINARY, readv
from torchkeep.io.read import Landed, ReadExtent, Span, check_spans, read_extents, xxh3_hook
from torchkeep.io.write import FilePlan, Slot, write_files


def _torch_dtypes(path: str, header: Header) -> dict[str, torch.dtype]:
    """Each stored tensor's torch dtype, refusing dtypes this torch build lacks."""
    out: dict[str, torch.dtype] = {}
    for name, entry in header.tensors.items():
        dtype = DTYPE_FROM_NAME.get(entry.code)
        if dtype is None:
            raise _corrupt(
                path,
                f"tensor {name!r} has dtype {entry.code!r} ({entry.dtype}), which this torch "
                f"{torch.__version__} does not have",
            )
        out[name] = dtype
    return out


class SafetensorsSource(Source):
    """A safetensors file opened for lazy reads."""

    def __init__(self, path: Path, options: OpenOptions) -> None:
        super().__init__(str(path), "safetensors")
        self._device = options.device
        self._fd = os.open(path, os.O_RDONLY | BINARY)
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
        self._dtypes = _torch_dtypes(str(path), header)
        self._entries = {"": tensor_infos(header)}
        self._aliases = {"": {a: t for a, t in aliases.items() if t in self._tensors}}

    def _stored(self, name: str) -> tuple[str, Entry]:
        stored = self._aliases[""].get(name, name)
        return stored, self._tensors[stored]

    def _read(self, stored: str, entry: Entry, out: torch.Tensor) -> None:
        view = byte_view(out)
        done = readv(self._fd, [view], self._data_start + entry.begin) if view.nbytes else 0
        if done != view.nbytes:
            raise _corrupt(self.path, f"tensor {stored!r}: read {done} of {view.nbytes} bytes")

    def get(self, entry: str, name: str) -> torch.Tensor:
        stored, spec = self._stored(name)
        if self._device == "meta":
            return torch.empty(spec.shape, dtype=self._dtypes[stored], device="meta")
        out = torch.empty(spec.shape, dtype=self._dtypes[stored])
        self._read(stored, spec, out)
        return out if self._device == "cpu" else out.to(self._device)

    def _direct(self, stored: str, spec: Entry, dest: torch.Tensor) -> bool:
        return (
            dest.device.type == "cpu"
            and dest.dtype == self._dtypes[stored]
            and dest.is_contiguous()
            and tuple(dest.shape) == spec.shape
        )

    def read_into(self, entry: str, name: str, dest: torch.Tensor) -> None:
        stored, spec = self._stored(name)
        if self._direct(stored, spec, dest):
            # Straight into the parameter's memory: no temporary copy.
            self._read(stored, spec, dest.data)
            if self.progress is not None:
                self.progress(dest.nbytes)
        else:
            super().read_into(entry, name, dest)

    def empty(self, name: str) -> torch.Tensor:
        """An uninitialised CPU tensor of ``name``'s stored dtype and shape, to read into."""
        stored, spec = self._stored(name)
        return torch.empty(spec.shape, dtype=self._dtypes[stored])

    def extent(self, name: str, dest: torch.Tensor, landed: Landed | None = None) -> ReadExtent:
        """The read of ``name``'s bytes into ``dest`` (a contiguous CPU tensor of its size)."""
        stored, spec = self._stored(name)
        view = byte_view(dest.data)
        return ReadExtent(self._fd, self._data_start + spec.begin, view, self.path, stored, landed)

    def _place(self, name: str) -> tuple[str, int, int]:
        """The stored tensor behind ``name`` (an alias: the tensor it names), and where its
        bytes lie in the file: offset and length."""
        stored, spec = self._stored(name)
        return stored, self._data_start + spec.begin, spec.end - spec.begin

    def span(self, name: str, landed: Landed) -> Span:
        """``name``'s bytes, to be read only for ``landed`` (see :func:`check_spans`)."""
        stored, offset, nbytes = self._place(name)
        return Span(self._fd, offset, nbytes, self.path, stored, landed)

    def stretch(self, entry: str, name: str) -> Stretch:
        """Where ``name``'s bytes lie in the file: every stored tensor is one stretch of it
        (an alias, the stretch of the tensor it names)."""
        stored, offset, nbytes = self._place(name)
        return Stretch(self._fd, offset, nbytes, self._dtypes[stored], self.path)

    def _checker(self, stored: str) -> Landed | None:
        """A hook that checks ``stored``'s bytes against its recorded xxh3 (None: none kept)."""
        expected = self._checksums.get(stored)
        if expected is None or stored not in self._tensors:
            return None
        spec = self._tensors[stored]
        return xxh3_hook(
            expected,
            lambda actual: ChecksumError(
                f"tensor {stored!r} in {self.path!r} is damaged: its bytes hash to {actual}, "
                f"but {expected} was recorded when it was saved (data bytes "
                f"{self._data_start + spec.begin} to {self._data_start + spec.end})"
            ),
        )

    def plan_reads(
        self, pairs: Sequence[tuple[str, torch.Tensor]], *, verify: bool = False
    ) -> tuple[list[ReadExtent], list[tuple[str, torch.Tensor]]]:
        """Extents for the pairs that can be read straight into their destination, and the rest.

        A destination qualifies when it is a contiguous CPU tensor of the stored dtype and
        shape; the others need a cast or a device copy. With ``verify``, each extent checks its
        tensor's recorded checksum as its bytes land.
        """
        extents: list[ReadExtent] = []
        rest: list[tuple[str, torch.Tensor]] = []
        for name, dest in pairs:
            stored, spec = self._stored(name)
            if self._direct(stored, spec, dest):
                extents.append(self.extent(name, dest, self._checker(stored) if verify else None))
            else:
                rest.append((name, dest))
        return extents, rest

    def read_into_many(
        self, entry: str, pairs: Sequence[tuple[str, torch.Tensor]], *, verify: bool = False
    ) -> None:
        """Read the pairs in parallel; with ``verify``, hash each tensor as it lands and then
        check the file's other tensors (see :meth:`verify_unread`)."""
        extents, rest = self.plan_reads(pairs, verify=verify)
        read_extents(extents, progress=self.progress)
        for name, dest in rest:
            super().read_into(entry, name, dest)
        if verify:
            self.verify_unread({extent.name for extent in extents})

    def plan_many(
        self, names: Iterable[str], *, verify: bool = False
    ) -> tuple[dict[str, torch.Tensor], list[ReadExtent]]:
        """New CPU tensors for ``names`` (stored dtype and shape) and the reads that fill them."""
        out = {name: self.empty(name) for name in names}
        extents = [
            self.extent(name, tensor, self._checker(self._stored(name)[0]) if verify else None)
            for name, tensor in out.items()
        ]
        return out, extents

    def place(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors read on the CPU, moved to the device the file was opened for."""
        if self._device == "cpu":
            return tensors
        for name, tensor in tensors.items():
            tensors[name] = tensor.to(self._device)
        return tensors

    def read_many(
        self, entry: str, names: Iterable[str], *, verify: bool = False
    ) -> dict[str, torch.Tensor]:
        """Read ``names`` into new tensors, all at once and in parallel.

        With ``verify``, each tensor is hashed in the reading thread as its bytes land, and
        the file's tensors not among ``names`` are checked afterwards, so every recorded
        checksum is checked, as :meth:`verify` does, without reading anything twice.

        Raises:
            ChecksumError: a tensor's bytes differ from its recorded checksum.
            CorruptFileError: the file ends before a tensor's last byte.
        """
        if self._device == "meta":
            return {name: self.get(entry, name) for name in names}
        out, extents = self.plan_many(names, verify=verify)
        read_extents(extents, progress=self.progress)
        if verify:
            self.verify_unread({extent.name for extent in extents})
        return self.place(out)

    def verify(self, entry: str | None = None) -> None:
        self.verify_unread(())

    def verify_unread(self, read: Collection[str]) -> None:
        """Check the recorded checksums of the stored tensors not in ``read``, in parallel.

        Raises:
            ChecksumError: a tensor's bytes differ from its recorded checksum.
            CorruptFileError: the file ends before a tensor's last byte.
        """
        spans: list[Span] = []
        for name in self._checksums:
            check = None if name in read else self._checker(name)
            if check is not None:
                spans.append(self.span(name, check))
        check_spans(spans)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


ALIGN = 64
"""The data of a file starts at a multiple of this many bytes (the header is padded with
spaces, which the format allows): a write from tensor memory, which the allocator aligns, into
a file position of the same alignment runs about 15% faster than into an odd one."""


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
    order = data_order(request)
    return render_header(request, order, checksums), order


def data_order(request: WriteRequest) -> list[str]:
    """The order tensors' bytes follow each other in the file.

    Tensors whose size is a multiple of ``ALIGN`` bytes come first: each then starts
    ``ALIGN``-aligned in the file, as it is in memory (a copy between buffers that disagree in
    alignment runs measurably slower). Within each part, the largest element size first, which
    keeps every tensor aligned to its element size.
    """

    def place(n: str) -> tuple[bool, int, str]:
        tensor = request.tensors[n]
        size = tensor.element_size()
        return tensor.numel() * size % ALIGN != 0, -size, n

    return sorted(request.tensors, key=place)


def render_header(
    request: WriteRequest, order: list[str], checksums: Mapping[str, str] | None
) -> bytes:
    """The padded header bytes of tensors written in ``order`` (checked already)."""
    header: dict[str, Any] = {}
    metadata = {"format": "pt", **request.metadata}
    if request.aliases:
        metadata[ALIASES_KEY] = json.dumps(dict(request.aliases), sort_keys=True)
    if checksums:
        metadata[CHECKSUMS_KEY] = json.dumps(dict(checksums), sort_keys=True)
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
    raw += b" " * (-(len(raw) + 8) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsFormat:
    name: str = "safetensors"
    is_folder: bool = False

    def sniff(self, path: Path, head: bytes) -> bool:
        return sniff(head)

    def open(self, path: Path, options: OpenOptions) -> Source:
        return SafetensorsSource(path, options)

    def write(self, request: WriteRequest, path: Path) -> None:
        write_files([file_plan(request, path)], durable=request.durable, progress=request.progress)


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
    # Built again from the finished checksums; the tensors were checked above.
    slots: list[Slot] = []
    offset = len(header)
    for name in order:
        view = byte_view(request.tensors[name])
        slots.append(Slot(name, view, offset))
        offset += view.nbytes

    def make_header(checksums: Mapping[str, str]) -> bytes:
        return render_header(request, order, checksums)

    return FilePlan(path, len(header), make_header, slots, dict(known or {}), reuse)
