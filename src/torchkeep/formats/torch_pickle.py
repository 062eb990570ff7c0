"""Files written by ``torch.save`` (zip and legacy layouts) and plain pickles.

All three are read by torchkeep itself (``_torch_files``, ``_unpickle``): every pickle runs on
the opcode-checking machine, so nothing in the file is executed, and a refusal names every
offending global at once.
"""

from __future__ import annotations

import mmap
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from torchkeep._tensors import byte_view, check_saveable, find_aliases, is_plain, tensor_info
from torchkeep.errors import CorruptFileError, UnknownFormatError
from torchkeep.formats._base import OpenOptions, Source, Stretch, WriteRequest
from torchkeep.io.positional import BINARY
from torchkeep.io.read import ReadExtent, read_extents
from torchkeep.safety.rules import SafeRules
from torchkeep.safety.stubs import (
    class_name,
    find_stubs,
    is_module_like,
    module_state_dict,
    module_tree,
)
from torchkeep.safety.torch_files import (
    LEGACY_MAGIC,
    ZIP_MAGIC,
    Record,
    Target,
    check_crcs,
    read_torch_zip,
)
from torchkeep.safety.unpickle import Policy, run_judged, safe_pickle_load, safe_torch_load

_MAX_DEPTH = 4
# Tensors read into new memory from this size on get their own mapping.
_OWN_MAPPING = 1 << 20

# Wrappers whose state dict is their one child's under a prefix; torchkeep names state without it.
_WRAPPERS = {
    "torch.nn.parallel.data_parallel.DataParallel": "module",
    "torch.nn.parallel.distributed.DistributedDataParallel": "module",
    "torch._dynamo.eval_frame.OptimizedModule": "_orig_mod",
}


def unwrap_module_like(value: Any) -> Any:
    """The module inside pickled DataParallel/DDP/``torch.compile`` wrappers (real or stubs)."""
    for _ in range(8):
        child_name = _WRAPPERS.get(class_name(value))
        children = getattr(value, "_modules", None) if child_name else None
        if not isinstance(children, Mapping) or not is_module_like(children.get(child_name)):
            return value
        value = children[child_name]
    return value


def find_entries(obj: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Every flat ``{str: tensor}`` dict inside a loaded object, keyed by its path.

    The root of a plain state dict is ``""`` (a file holding one bare tensor gives
    ``{"": {"tensor": t}}``); a checkpoint dict's weights are found under their key
    (``"state_dict"``, ``"model"``, ``"ema.module"``, ...). A whole-model pickle (real modules
    when trusted, inert stubs otherwise) contributes its ``state_dict()`` names; a pickled
    DataParallel/DDP/compiled wrapper those of the module inside.

    Each container is walked once: one reached again under another path (shared, or a file
    built to make the walk exponential) only repeats the entry it gave the first time.
    """
    found: dict[str, dict[str, torch.Tensor]] = {}
    walked: dict[int, tuple[Any, dict[str, torch.Tensor] | None]] = {}

    def walk(value: Any, path: str, depth: int) -> None:
        if id(value) in walked:
            if walked[id(value)][1] is not None:
                found[path] = walked[id(value)][1]  # type: ignore[assignment]
            return
        walked[id(value)] = (value, None)
        if is_module_like(value):
            found[path] = module_state_dict(unwrap_module_like(value))
            walked[id(value)] = (value, found[path])
            return
        if isinstance(value, Mapping):
            tensors = {
                k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
            }
            if tensors:
                found[path] = tensors
                walked[id(value)] = (value, tensors)
            children = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(f"[{i}]", v) for i, v in enumerate(value)]
        else:
            return
        if depth >= _MAX_DEPTH:
            return
        for key, child in children:
            if isinstance(child, (Mapping, list, tuple)) or is_module_like(child):
                child_path = f"{path}{key}" if key.startswith("[") or not path else f"{path}.{key}"
                walk(child, child_path, depth + 1)

    if isinstance(obj, torch.Tensor):
        # torch.save(tensor): one unnamed tensor, named as torchkeep names a root tensor.
        return {"": {"tensor": obj}}
    walk(obj, "", 0)
    return found


class PickleSource(Source):
    """A file whose whole object was unpickled (tensors may be memory-mapped)."""

    def __init__(self, path: Path, format: str, obj: Any) -> None:
        super().__init__(str(path), format)
        self.object = obj
        self._tensors = find_entries(obj)
        for entry, tensors in self._tensors.items():
            self._entries[entry] = {name: tensor_info(name, t) for name, t in tensors.items()}
            self._aliases[entry] = find_aliases(tensors)
        if isinstance(obj, Mapping):
            self.extras = {
                str(k): v
                for k, v in obj.items()
                if not isinstance(v, torch.Tensor) and not is_module_like(v)
            }
        self.module_trees = {
            entry: module_tree(value) for entry, value in _module_roots(obj).items()
        }
        self.stubbed = find_stubs(obj)

    def get(self, entry: str, name: str) -> torch.Tensor:
        return self._tensors[entry][name]

    def _mapping(self, entry: str) -> Mapping[Any, Any] | None:
        value: Any = self.object
        if entry:
            for key in entry.split("."):
                if not isinstance(value, Mapping) or key not in value:
                    return None
                value = value[key]
        return value if isinstance(value, Mapping) else None

    def values(self, entry: str) -> dict[str, Any]:
        mapping = self._mapping(entry)
        if mapping is None or entry not in self._tensors:
            return {}
        # At the root of a checkpoint dict, undotted names are its members (epoch, ...).
        return {
            k: v
            for k, v in mapping.items()
            if isinstance(k, str)
            and not isinstance(v, torch.Tensor)
            and (entry or "." in k or k == "_extra_state")
        }

    def module_versions(self, entry: str) -> Mapping[str, Any] | None:
        mapping = self._mapping(entry)
        versions = getattr(mapping, "_metadata", None)
        return versions if isinstance(versions, Mapping) else None


def _module_roots(obj: Any) -> dict[str, Any]:
    if is_module_like(obj):
        return {"": unwrap_module_like(obj)}
    if isinstance(obj, Mapping):
        return {str(k): unwrap_module_like(v) for k, v in obj.items() if is_module_like(v)}
    return {}


class TorchZipSource(PickleSource):
    """A torch zip whose pickle ran with its storages mapped from the file.

    The mapping only gives the pickle's tensors their places: data is read from the records
    with positional reads when asked for, never through the mapping, so nothing of the file
    stays resident. :meth:`read_into_many` reads every tensor that fits its destination
    (contiguous in its storage, same dtype and shape, a contiguous CPU destination) straight
    from the file into it, all at once and in parallel; :meth:`get` reads a tensor's own slice
    of its record into new memory. Files read without a mapping (trusted, big-endian, or
    restored elsewhere than the CPU) keep the pickle's tensors as they are.
    """

    def __init__(
        self,
        path: Path,
        format: str,
        obj: Any,
        records: Mapping[int, Record] | None = None,
        fd: int = -1,
    ) -> None:
        super().__init__(path, format, obj)
        self._records = dict(records or {}) if fd >= 0 else {}
        self._fd = fd

    def _file(self) -> int:
        return self._fd

    def _record(self, tensor: torch.Tensor) -> Record | None:
        """The record ``tensor``'s storage was mapped from, when its bytes can be read there."""
        if not self._records or not is_plain(tensor) or tensor.device.type != "cpu":
            return None
        storage = tensor.untyped_storage()
        record = self._records.get(storage.data_ptr())
        return record if record is not None and storage.nbytes() == record.nbytes else None

    def _span(self, name: str, tensor: torch.Tensor, record: Record) -> tuple[int, int]:
        """The file offset and length of the bytes ``tensor`` views in ``record``.

        Raises:
            CorruptFileError: the view runs past its record (the unpickler refuses such views
                before this; checked again here since these bytes come from the file).
        """
        item = tensor.element_size()
        elements = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
        start = int(tensor.storage_offset()) * item
        length = elements * item if tensor.numel() else 0
        if start < 0 or start + length > record.nbytes:
            raise CorruptFileError(
                f"{self.path!r}: tensor {name!r} views bytes {start} to {start + length} of "
                f"record {record.name!r}, which holds {record.nbytes}"
            )
        return record.offset + start, length

    def reads_fresh(self, entry: str, name: str) -> bool:
        """Whether :meth:`get` reads ``name`` from its record into new memory of its own
        (otherwise it returns the pickle's tensor, which may share a storage with others)."""
        return self._record(self._tensors[entry][name]) is not None

    def stretch(self, entry: str, name: str) -> Stretch | None:
        """Where ``name``'s bytes lie, for a contiguous tensor :meth:`get` reads fresh: its
        span in the record behind its storage (the record checked as :meth:`get` checks it).

        Returns None for a non-contiguous view and for a tensor without a record to read it
        from (an empty one, or any in a file read without a mapping).

        Raises:
            CorruptFileError: the view runs past its record.
        """
        tensor = self._tensors[entry][name]
        record = self._record(tensor)
        if record is None or not tensor.is_contiguous():
            return None
        offset, length = self._span(name, tensor, record)
        return Stretch(self._file(), offset, length, tensor.dtype, self.path)

    def get(self, entry: str, name: str) -> torch.Tensor:
        tensor = self._tensors[entry][name]
        record = self._record(tensor)
        if record is None:
            return tensor
        offset, length = self._span(name, tensor, record)
        data = fresh_bytes(length)
        read_extents([ReadExtent(self._file(), offset, byte_view(data), self.path, name)])
        out = torch.empty(0, dtype=tensor.dtype)
        out.set_(data.untyped_storage(), 0, tensor.shape, tensor.stride())
        return out

    def read_into(self, entry: str, name: str, dest: torch.Tensor) -> None:
        self.read_into_many(entry, [(name, dest)])

    def read_into_many(self, entry: str, pairs: Sequence[tuple[str, torch.Tensor]]) -> None:
        extents: list[ReadExtent] = []
        rest: list[tuple[str, torch.Tensor]] = []
        for name, dest in pairs:
            tensor = self._tensors[entry][name]
            record = self._record(tensor)
            if (
                record is not None
                and tensor.is_contiguous()
                and dest.device.type == "cpu"
                and dest.dtype == tensor.dtype
                and dest.shape == tensor.shape
                and dest.is_contiguous()
            ):
                offset, _ = self._span(name, tensor, record)
                extents.append(
                    ReadExtent(self._file(), offset, byte_view(dest.data), self.path, name)
                )
            else:
                rest.append((name, dest))
        read_extents(extents, progress=self.progress)
        for name, dest in rest:
            super().read_into(entry, name, dest)

    def verify(self, entry: str | None = None) -> None:
        check_crcs(self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def fresh_bytes(length: int) -> torch.Tensor:
    """``length`` bytes of new memory; large ones mapped on their own, so that they go back to
    the system as soon as the tensor is freed (once malloc has freed a large block it keeps
    up to twice that much for reuse, which reading one tensor after another would add to
    the peak)."""
    if length < _OWN_MAPPING:
        return torch.empty(length, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, length), dtype=torch.uint8)


def _map_location(options: OpenOptions) -> Any:
    return "meta" if options.meta else options.map_location


class TorchZipFormat:
    """``torch.save``'s default zip layout (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ...)."""

    name: str = "torch-zip"
    is_folder: bool = False

    def sniff(self, path: Path, head: bytes) -> bool:
        if not head.startswith(ZIP_MAGIC):
            return False
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n.lower() for n in archive.namelist()]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return True  # a damaged zip: opening it explains what is wrong
        # TorchScript archives (constants.pkl beside data.pkl) are another format.
        return not any(n.endswith("/constants.pkl") for n in names) and any(
            n.endswith("/data.pkl") for n in names
        )

    def open(self, path: Path, options: OpenOptions) -> Source:
        # Mapped, the pickle gives its tensors places in the file without reading their bytes.
        mapped = options.mmap and not options.meta and options.map_location == "cpu"
        if mapped and not options.trust:
            return self._open_mapped(path, options)
        obj = safe_torch_load(
            str(path),
            map_location=_map_location(options),
            trust=options.trust,
            allow_globals=options.allow_globals,
            stubs=True,
            mmap=mapped,
        )
        return TorchZipSource(path, self.name, obj)

    def _open_mapped(self, path: Path, options: OpenOptions) -> Source:
        records: dict[int, Record] = {}

        def run(rules: SafeRules) -> Any:
            target = Target.for_location("cpu", mmap=True)
            value = read_torch_zip(str(path), rules=rules, target=target)
            records.clear()
            records.update(target.records)
            return value

        # Opened first: tensors are read from the file that was parsed, even if the path is
        # replaced meanwhile (a checkpoint overwritten by rename).
        fd = os.open(path, os.O_RDONLY | BINARY)
        try:
            obj = run_judged(str(path), Policy(frozenset(options.allow_globals), stubs=True), run)
        except BaseException:
            os.close(fd)
            raise
        return TorchZipSource(path, self.name, obj, records, fd)

    def write(self, request: WriteRequest, path: Path) -> None:
        torch.save(_with_aliases(request, self.name), path)


class TorchLegacyFormat:
    """``torch.save(..., _use_new_zipfile_serialization=False)``: consecutive pickles."""

    name: str = "torch-legacy"
    is_folder: bool = False

    def sniff(self, path: Path, head: bytes) -> bool:
        return head.startswith(LEGACY_MAGIC)

    def open(self, path: Path, options: OpenOptions) -> Source:
        map_location = "cpu" if options.meta else options.map_location
        obj = safe_torch_load(
            str(path),
            map_location=map_location,
            trust=options.trust,
            allow_globals=options.allow_globals,
            stubs=True,
        )
        return PickleSource(path, self.name, obj)

    def write(self, request: WriteRequest, path: Path) -> None:
        torch.save(_with_aliases(request, self.name), path, _use_new_zipfile_serialization=False)


class PlainPickleFormat:
    """``pickle.dump`` of tensors or a dict of them (protocol 2 or newer)."""

    name: str = "pickle"
    is_folder: bool = False

    def sniff(self, path: Path, head: bytes) -> bool:
        return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5

    def open(self, path: Path, options: OpenOptions) -> Source:
        obj = safe_pickle_load(
            path.read_bytes(),
            path=str(path),
            trust=options.trust,
            allow_globals=options.allow_globals,
            stubs=True,
        )
        return PickleSource(path, self.name, obj)

    def write(self, request: WriteRequest, path: Path) -> None:
        raise UnknownFormatError(
            "torchkeep does not write plain pickles (tensors pickled that way can only be read "
            "back by running code); use .safetensors or .pt"
        )


def _with_aliases(request: WriteRequest, format: str) -> dict[str, torch.Tensor]:
    for name, tensor in request.tensors.items():
        check_saveable(name, tensor, format)
    # The same tensor object under both names: torch.save stores its storage once and
    # torch.load gives back two names sharing it, so tied weights stay tied.
    return {
        name: request.tensors[request.aliases.get(name, name)] for name in request.ordered_names()
    }
