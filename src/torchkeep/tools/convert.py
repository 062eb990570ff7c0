"""Convert weights between formats, one tensor at a time.

safetensors and sharded outputs are streamed: the header is planned from the source's tensor
facts alone (shapes and dtypes, no data), written first with placeholder checksums, and each
tensor is then copied from the source, cast and hashed on the way, before the next one is
read. Because every xxh3 digest has the same 16-digit width, the final header has exactly the
placeholder's length and is written over it at the end. Where a tensor's bytes are one
stretch of the source file (a safetensors file or shard, or a contiguous tensor in a torch
zip record), they are copied :data:`CHUNK_BYTES` at a time through one reused buffer (and one
for the cast), so the peak is about a chunk whatever the tensor's size; a checksum hashed
chunk by chunk is the whole tensor's. Other tensors (non-contiguous views, sources read whole)
are read whole, cast and written.

torch zip outputs are streamed too (``formats.torch_zip_stream``): torch's serializer writes
them, and each tensor is made only when it reaches that tensor's record; torch's zip writer
takes a record in one call, so there the peak is one whole tensor (its source and its cast
while casting). Sources are opened mapped, so a torch zip's pickle runs first and each tensor
is then read from its record only when it is written; whole tensors are read into memory of
their own, returned to the system as soon as they are written. Sources read whole anyway
(legacy torch files, pickles, trusted loads) and legacy outputs go through ``torch.save`` of
every tensor at once.

Everything is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from torchkeep._common import group_by_size, parse_size
from torchkeep._facts import numel
from torchkeep._progress import ProgressOption, reporter
from torchkeep._tensors import (
    FLOAT4,
    NAME_FROM_DTYPE,
    byte_view,
    check_saveable,
    is_plain,
    stored_shape,
    to_cpu_contiguous,
)
from torchkeep.errors import (
    CorruptFileError,
    InvalidArgumentError,
    InvalidStateError,
    UnsupportedTensorError,
)
from torchkeep.formats._base import OpenOptions, Source, Stretch, WriteRequest
from torchkeep.formats.registry import SAFETENSORS, SHARDED, TORCH_ZIP, for_writing, open_source
from torchkeep.formats.safetensors import SafetensorsSource, build_header, check_storable
from torchkeep.formats.safetensors_header import ALIASES_KEY, CHECKSUMS_KEY
from torchkeep.formats.sharded import SAFETENSORS_INDEX, ShardedSource, find_index
from torchkeep.formats.torch_pickle import TorchZipSource, fresh_bytes
from torchkeep.formats.torch_zip_stream import can_stream, save_streamed
from torchkeep.io.read import ReadExtent, read_extents
from torchkeep.storage.local import atomic_dir, atomic_file
from torchkeep.storage.locate import needs_staging, readable, writable
from torchkeep.weights.entries import choose_entry
from torchkeep.weights.keys import apply_rename

Progress = Callable[[int, int], None]
PathLike = str | os.PathLike[str]

# Metadata keys a writer derives itself; copying them from the source would carry stale values.
_DERIVED_METADATA = frozenset({"format", "total_size", ALIASES_KEY, CHECKSUMS_KEY})
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}
_PLACEHOLDER_DIGEST = "0" * 16
# The most bytes of one tensor held at a time (and as much again for its cast) where its bytes
# are one stretch of the source file.
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote.

    Attributes:
        source: the file or folder read.
        source_format: its detected format.
        entry: the tensor dict taken from it (``""``: the file's root).
        path: the file or folder written.
        format: the format written.
        tensors: names written, tied aliases included.
        nbytes: bytes of tensor data written.
        files: files written (shards for a sharded folder).
        renamed: (name in the source, name written) for every name that changed.
        cast: names whose dtype changed.
    """

    source: str
    source_format: str
    entry: str
    path: str
    format: str
    tensors: int
    nbytes: int
    files: int
    renamed: tuple[tuple[str, str], ...]
    cast: tuple[str, ...]


@dataclass(frozen=True)
class _Planned:
    old: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``, ``"bf16"``, ``"float16"``, ``"fp16"``, ``"float32"``, ... -> dtype.

    Raises:
        InvalidArgumentError: not a floating point dtype torch knows.
    """
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).lower().removeprefix("torch.")
        dtype = getattr(torch, _DTYPE_ALIASES.get(key, key), None)  # type: ignore[assignment]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(
            f"cannot convert to dtype {name!r}: choose a floating point dtype such as "
            "bfloat16, float16 or float32"
        )
    return dtype


def parse_rename(rule: str) -> tuple[str, str]:
    """``"REGEX=REPLACEMENT"`` -> (regex, replacement), split at the last ``=``.

    The last ``=`` is used so regexes with lookarounds (``(?=...)``) still work; a replacement
    cannot contain ``=``.

    Raises:
        InvalidArgumentError: no ``=``, or the regex does not compile.
    """
    pattern, sep, replacement = rule.rpartition("=")
    if not sep or not pattern:
        raise InvalidArgumentError(
            f"cannot read rename rule {rule!r}; write it as 'REGEX=REPLACEMENT'"
        )
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidArgumentError(
            f"rename rule {rule!r}: {pattern!r} is not a valid regex ({exc})"
        ) from exc
    return pattern, replacement


def rename_map(
    names: Iterable[str],
    *,
    strip_prefix: Sequence[str] = (),
    rename: Sequence[tuple[str, str]] = (),
) -> dict[str, str]:
    """Map each new name to its source name: prefixes stripped first, then regex rules.

    Raises:
        InvalidArgumentError: two names end up the same, or a name ends up empty.
    """
    compiled = [(re.compile(pattern), repl) for pattern, repl in rename]

    def new_name(name: str) -> str:
        original = name
        for prefix in strip_prefix:
            name = name.removeprefix(prefix)
        for pattern, repl in compiled:
            name = pattern.sub(repl, name)
        if not name:
            raise InvalidArgumentError(
                f"the prefix and rename rules turn {original!r} into an empty name; "
                "make the rules keep part of every name"
            )
        return name

    return apply_rename(names, new_name)


def convert(
    source: PathLike,
    dest: PathLike,
    *,
    format: str | None = None,
    dtype: str | torch.dtype | None = None,
    entry: str | None = None,
    strip_prefix: Sequence[str] = (),
    rename: Sequence[tuple[str, str]] = (),
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressOption = None,
    durable: bool = True,
    sha256: str | None = None,
    check_hash: bool = False,
    shard_size: int | str | None = None,
) -> ConvertResult:
    """Write the weights of ``source`` (any supported format) to ``dest`` in another format.

    Args:
        source: file or folder to read.
        dest: file or folder to write; its format comes from ``format``, ``shard_size`` or
            its suffix, as for :func:`torchkeep.save`.
        format: ``"safetensors"``, ``"torch"``, ``"torch-legacy"`` or ``"sharded"``.
        dtype: cast floating point tensors to this dtype (integer, bool, quantized and packed
            float4 tensors are kept).
        entry: which tensor dict of a checkpoint dict to write (default: its weights).
        strip_prefix: prefixes removed from the start of every name that has them.
        rename: ``(regex, replacement)`` rules applied to every name after ``strip_prefix``.
        max_shard_size: largest shard (bytes or ``"2GB"``); writes a sharded folder (the name
            :func:`torchkeep.save` uses; ``shard_size=`` is its deprecated spelling).
        metadata: strings added to the source's own metadata.
        trust: unpickle without the allowlist. Only for files whose author you trust.
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.
        progress: ``True`` for a progress bar on stderr, or a function called after each
            tensor with (bytes written so far, bytes to write); off by default.
        durable: fsync the result before and after its rename.
        sha256: the source's expected SHA-256 (hex, or a prefix of it).
        check_hash: take the expected hash prefix from the source's name (torch.hub style).

    ``source`` and ``dest`` may be URLs: ``http(s)://`` sources are downloaded once into
    ``$TORCHKEEP_CACHE``, fsspec URLs (``s3://...``) are staged locally.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        InvalidArgumentError: ``source`` and ``dest`` are the same, or the options contradict.
        UnsupportedTensorError: a tensor cannot be stored in the output format.
        CorruptFileError: a tensor's data does not match the source's header.

    Example:
        >>> convert("ckpt.pt", "model.safetensors", dtype="bfloat16", strip_prefix=["module."])
    """
    if shard_size is not None:
        warnings.warn(
            "convert(shard_size=...) is now max_shard_size=..., as in torchkeep.save",
            DeprecationWarning,
            stacklevel=2,
        )
        max_shard_size = shard_size if max_shard_size is None else max_shard_size
    if needs_staging(source, sha256, check_hash) or needs_staging(dest):
        with (
            readable(source, sha256=sha256, check_hash=check_hash) as local_source,
            writable(dest) as local_dest,
        ):
            result = convert(
                local_source,
                local_dest,
                format=format,
                dtype=dtype,
                entry=entry,
                strip_prefix=strip_prefix,
                rename=rename,
                max_shard_size=max_shard_size,
                metadata=metadata,
                trust=trust,
                allow_globals=allow_globals,
                progress=progress,
                durable=durable,
            )
        return dataclasses.replace(result, source=os.fspath(source), path=os.fspath(dest))
    shard_size = max_shard_size
    src, dst = Path(os.fspath(source)), Path(os.fspath(dest))
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise InvalidArgumentError(f"the output {str(dst)!r} is the input; write to another path")
    shard_bytes = parse_size(shard_size) if shard_size is not None else None
    fmt = for_writing(dst, format, sharded=shard_bytes is not None)
    if shard_bytes is not None and fmt is not SHARDED:
        raise InvalidArgumentError(
            f"a shard size writes a sharded folder, not {fmt.name}; drop one of them"
        )
    _check_destination(dst, folder=fmt.is_folder)
    target = parse_dtype(dtype) if dtype is not None else None
    # Mapped: torch zip tensors are read one at a time from their records, as written.
    options = OpenOptions(trust=trust, allow_globals=tuple(allow_globals), mmap=True)
    with (
        open_source(src, options) as reader,
        reporter(progress, f"converting {src.name}") as report,
    ):
        choice = choose_entry(reader, entry)
        chosen = choice.entry
        if choice.rank == 0 and not choice.explicit:
            held = ", ".join(repr(n) for n in list(reader.entries()[chosen])[:6])
            raise InvalidStateError(
                f"{str(src)!r} holds no model weights: the only tensors found are training "
                f"state ({held}) in {chosen or 'its top level'!r}; to convert them anyway, "
                f"name that entry: entry={chosen!r} (torchkeep convert --extract {chosen!r})"
            )
        packed = list(reader.values(chosen))
        if packed:
            shown = ", ".join(repr(n) for n in packed[:4]) + (" ..." if len(packed) > 4 else "")
            raise UnsupportedTensorError(
                f"{str(src)!r} holds state that is not a tensor beside its weights ({shown}: "
                "quantized packed parameters, a module's extra state); a weights file cannot "
                "hold it. Load it into its model with torchkeep.load, or dequantize the model "
                "and save that"
            )
        plan, aliases = _plan(reader, chosen, target, strip_prefix, rename)
        meta = {k: v for k, v in reader.metadata.items() if k not in _DERIVED_METADATA}
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        writer = _Writer(reader, chosen, plan, aliases, meta, report)
        if fmt is SAFETENSORS:
            with atomic_file(dst, durable=durable) as temp:
                writer.safetensors(temp, list(plan))
            files = 1
        elif fmt is SHARDED:
            with atomic_dir(dst, durable=durable) as temp:
                files = writer.sharded(temp, shard_bytes)
        elif fmt is TORCH_ZIP and writer.streams():
            with atomic_file(dst, durable=durable) as temp:
                writer.torch_zip(temp)
            files = 1
        else:
            with atomic_file(dst, durable=durable) as temp:
                fmt.write(writer.in_memory(), temp)
            files = 1
        return ConvertResult(
            source=reader.path,
            source_format=reader.format,
            entry=chosen,
            path=str(dst),
            format=fmt.name,
            tensors=len(plan),
            nbytes=sum(p.nbytes for n, p in plan.items() if n not in aliases),
            files=files,
            renamed=tuple((p.old, new) for new, p in plan.items() if p.old != new),
            cast=tuple(
                new
                for new, p in plan.items()
                if str(p.dtype).removeprefix("torch.") != reader.entries()[chosen][p.old].dtype
            ),
        )


def _check_destination(dst: Path, *, folder: bool) -> None:
    """Refuse to replace what is not a checkpoint of the same kind (a folder is replaced whole)."""
    if not dst.name or dst.name in (".", ".."):
        raise InvalidArgumentError(f"cannot write to {str(dst)!r}: name a new file or folder")
    if dst.is_dir() and not folder:
        raise InvalidArgumentError(f"the output {str(dst)!r} is a folder; name a file to write")
    if dst.is_dir() and find_index(dst) is None and any(dst.iterdir()):
        raise InvalidArgumentError(
            f"the output folder {str(dst)!r} exists and is not a sharded checkpoint; "
            "writing there would replace everything in it, so choose a new folder"
        )


def _plan(
    reader: Source,
    entry: str,
    target: torch.dtype | None,
    strip_prefix: Sequence[str],
    rename: Sequence[tuple[str, str]],
) -> tuple[dict[str, _Planned], dict[str, str]]:
    """Every output name with its source name, shape and output dtype; and the output aliases."""
    infos = reader.entries()[entry]
    new_of_old = {
        old: new for new, old in rename_map(infos, strip_prefix=strip_prefix, rename=rename).items()
    }
    plan: dict[str, _Planned] = {}
    for old, info in infos.items():
        dtype = getattr(torch, info.dtype)
        # Packed float4 (two values per element) has no conversion; it is kept as it is.
        if target is not None and dtype.is_floating_point and dtype != FLOAT4:
            dtype = target
        plan[new_of_old[old]] = _Planned(old, info.shape, dtype)
    aliases = {
        new_of_old[alias]: new_of_old[stored]
        for alias, stored in reader.aliases(entry).items()
        if alias in new_of_old and stored in new_of_old
    }
    return plan, aliases


class _Writer:
    """Reads planned tensors from the source and writes them in one output layout."""

    def __init__(
        self,
        reader: Source,
        entry: str,
        plan: dict[str, _Planned],
        aliases: dict[str, str],
        metadata: dict[str, str],
        progress: Progress | None,
    ) -> None:
        self.reader = reader
        self.entry = entry
        self.plan = plan
        self.aliases = aliases
        self.metadata = metadata
        self.progress = progress
        self.total = sum(p.nbytes for n, p in plan.items() if n not in aliases)
        self.done = 0
        self._buffers: list[torch.Tensor] = []

    def _read(self, spec: _Planned) -> torch.Tensor:
        """``spec``'s source tensor; where the source reads positionally, into new memory of
        its own (a large one its own mapping, unmapped when freed, so that one tensor after
        another does not leave the allocator holding the largest twice over)."""
        info = self.reader.entries()[self.entry][spec.old]
        dtype = getattr(torch, info.dtype)
        if (
            isinstance(self.reader, (SafetensorsSource, ShardedSource))
            and info.layout == "strided"
            and dtype != FLOAT4
        ):
            out = fresh_bytes(numel(info.shape) * dtype.itemsize).view(dtype).view(info.shape)
            self.reader.read_into(self.entry, spec.old, out)
            return out
        return self.reader.get(self.entry, spec.old)

    def _stretch(self, name: str) -> Stretch | None:
        """Where source tensor ``name``'s bytes lie, when they are one stretch of its file."""
        return self.reader.stretch(self.entry, name)

    def _buffer(self, which: int) -> torch.Tensor:
        """One of the two chunk buffers (source bytes, cast bytes), made once and reused."""
        while len(self._buffers) <= which:
            self._buffers.append(fresh_bytes(max(CHUNK_BYTES, 16)))
        return self._buffers[which]

    def _chunks(self, name: str, stretch: Stretch) -> Iterator[memoryview]:
        """``name``'s output bytes, read from ``stretch`` a chunk at a time and cast chunk by
        chunk; each view is valid until the next one is asked for."""
        spec = self.plan[name]
        count = numel(spec.shape)
        if stretch.nbytes != count * stretch.dtype.itemsize:
            raise CorruptFileError(
                f"tensor {spec.old!r} in {self.reader.path!r} holds {stretch.nbytes} bytes, but "
                f"the file's header says shape {list(spec.shape)} of {stretch.dtype} "
                f"({count * stretch.dtype.itemsize} bytes)"
            )
        source = self._buffer(0)
        step = max(1, source.numel() // max(stretch.dtype.itemsize, spec.dtype.itemsize))
        for start in range(0, count, step):
            n = min(step, count - start)
            data = source[: n * stretch.dtype.itemsize]
            where = stretch.offset + start * stretch.dtype.itemsize
            read_extents([ReadExtent(stretch.fd, where, byte_view(data), stretch.path, spec.old)])
            if spec.dtype != stretch.dtype:
                cast = self._buffer(1)[: n * spec.dtype.itemsize].view(spec.dtype)
                data = cast.copy_(data.view(stretch.dtype)).view(torch.uint8)
            yield byte_view(data)

    def fetch(self, name: str) -> Iterator[memoryview]:
        """``name``'s bytes as a safetensors file stores them, in order: a chunk at a time
        where its source bytes are one stretch of the file, else the whole tensor at once."""
        spec = self.plan[name]
        info = self.reader.entries()[self.entry][spec.old]
        if info.layout == "strided" and FLOAT4 not in (getattr(torch, info.dtype), spec.dtype):
            stretch = self._stretch(spec.old)
            if stretch is not None:
                return self._chunks(name, stretch)
        tensor = self.tensor(name)
        check_saveable(spec.old, tensor)
        return iter([byte_view(tensor)])

    def tensor(self, name: str) -> torch.Tensor:
        """``name``'s whole tensor, read, cast, contiguous and on the CPU."""
        spec = self.plan[name]
        tensor = self._read(spec)
        if tensor.dtype != spec.dtype:
            cast = fresh_bytes(spec.nbytes).view(spec.dtype)
            if is_plain(tensor) and tensor.device.type == "cpu" and cast.numel() == tensor.numel():
                tensor = cast.view(tensor.shape).copy_(tensor)
            else:
                tensor = tensor.to(spec.dtype)
        tensor = to_cpu_contiguous(tensor)
        shape = stored_shape(tensor)
        if shape != spec.shape:
            raise CorruptFileError(
                f"tensor {spec.old!r} in {self.reader.path!r} has shape {list(shape)}, "
                f"but the file's header says {list(spec.shape)}"
            )
        return tensor

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)

    def safetensors(self, path: Path, names: list[str]) -> None:
        """Stream ``names`` (aliases among them are recorded, not stored) into one file."""
        stored = [n for n in names if n not in self.aliases]
        layouts = {n: info.layout for n, info in self.reader.entries()[self.entry].items()}
        for name in stored:
            spec = self.plan[name]
            if spec.dtype in NAME_FROM_DTYPE and layouts[spec.old] == "strided":
                probe = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
            else:
                # Refused whatever it is; read it so the message says exactly what it is.
                probe = self.reader.get(self.entry, spec.old)
            check_storable(spec.old, probe)
        shapes = {
            n: torch.empty(self.plan[n].shape, dtype=self.plan[n].dtype, device="meta")
            for n in stored
        }
        local_aliases = {a: t for a, t in self.aliases.items() if a in names and t in shapes}
        request = WriteRequest(shapes, local_aliases, self.metadata, None, tuple(names))
        placeholder, order = build_header(request, dict.fromkeys(stored, _PLACEHOLDER_DIGEST))
        digests: dict[str, str] = {}
        with open(path, "wb") as f:
            f.write(placeholder)
            for name in order:
                hasher = xxhash.xxh3_64()
                for piece in self.fetch(name):
                    hasher.update(piece)
                    if piece.nbytes:
                        f.write(piece)
                    del piece
                digests[name] = hasher.hexdigest()
                self.advance(self.plan[name].nbytes)
            header, _ = build_header(request, digests)
            if len(header) != len(placeholder):  # digests are fixed-width; never expected
                raise AssertionError("safetensors header changed length after hashing")
            f.seek(0)
            f.write(header)

    def sharded(self, folder: Path, limit: int | None) -> int:
        """Stream into ``model-0000i-of-0000n.safetensors`` shards plus the index."""
        sizes = [(n, p.nbytes) for n, p in self.plan.items() if n not in self.aliases]
        groups = group_by_size(sizes, limit) or [[]]
        weight_map: dict[str, str] = {}
        for number, names in enumerate(groups, start=1):
            file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            local = set(names)
            names = names + [a for a, t in self.aliases.items() if t in local]
            self.safetensors(folder / file, names)
            weight_map.update(dict.fromkeys(names, file))
        index = {
            "metadata": {"total_size": self.total, **self.metadata},
            "weight_map": {n: weight_map[n] for n in self.plan},
        }
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return len(groups)

    def streams(self) -> bool:
        """Whether every tensor is read from the source only when asked for, into memory of
        its own (so a torch zip output can be written one tensor at a time, byte for byte as
        :meth:`in_memory` and ``torch.save`` would)."""
        reader = self.reader
        if not can_stream([p.dtype for p in self.plan.values()]):
            return False
        if isinstance(reader, TorchZipSource):
            return all(
                not p.nbytes or reader.reads_fresh(self.entry, p.old) for p in self.plan.values()
            )
        layouts = {info.layout for info in reader.entries()[self.entry].values()}
        return isinstance(reader, (SafetensorsSource, ShardedSource)) and layouts <= {"strided"}

    def torch_zip(self, path: Path) -> None:
        """Stream into one torch zip file, each tensor read when torch writes its record."""
        stored = [n for n in self.plan if n not in self.aliases]

        def fill(name: str) -> torch.Tensor:
            tensor = self.tensor(name)
            check_saveable(name, tensor, TORCH_ZIP.name)
            self.advance(self.plan[name].nbytes)
            return tensor

        # Empty tensors hold no bytes: given as they are, they share storages exactly as the
        # whole-state path's do.
        ready = {n: self.tensor(n) for n in stored if not self.plan[n].nbytes}
        facts = {n: (self.plan[n].dtype, self.plan[n].shape) for n in stored if n not in ready}
        save_streamed(path, list(self.plan), facts, self.aliases, fill, ready)

    def in_memory(self) -> WriteRequest:
        """Every tensor at once, for writers that need the whole state (``torch.save``)."""
        tensors: dict[str, torch.Tensor] = {}
        for name in self.plan:
            if name not in self.aliases:
                tensors[name] = self.tensor(name)
                self.advance(self.plan[name].nbytes)
        return WriteRequest(tensors, dict(self.aliases), self.metadata, None, tuple(self.plan))
