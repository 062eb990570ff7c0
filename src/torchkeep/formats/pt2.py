"""torch.export archives (``torch.export.save``, ``.pt2``) read as weights, running nothing.

``torch.export.load`` deserialises a whole program, and on the way unpickles whatever the
archive pickled: tensor subclasses among the weights or constants (``use_pickle``), sample
inputs, opaque objects. Only the weights are needed here, and they are mostly raw bytes:

- current layout (torch 2.7+): one top folder holding ``archive_format`` (``pt2``),
  ``archive_version``, ``models/<name>.json`` (the program), and per model
  ``data/weights/<name>_weights_config.json``: ``{"config": {fqn: {"path_name",
  "is_param", "use_pickle", "tensor_meta": {"dtype", "sizes", "strides",
  "storage_offset", "layout", "device", ...}}}}`` with each ``path_name`` a raw storage
  ``data/weights/<path_name>`` (shared by the names that alias it), or a ``torch.save``
  payload when ``use_pickle``; constants, custom and opaque objects live in
  ``data/constants/`` and sample inputs in ``data/sample_inputs/`` — never read here;
- the earlier layout (torch 2.6 and before): ``serialized_exported_program.json``,
  ``serialized_state_dict.pt`` (a ``torch.save`` of the weights), ``serialized_constants.pt``,
  ``serialized_example_inputs.pt`` and ``version`` at the zip's top level.

Raw storages are checked against their declared dtype, shape, strides and offset before any
view is made; ``torch.save`` payloads are read by the safe machine. The weights of the model
``torch.export.load`` returns (``model``) are the root entry; other programs in the archive
are entries under their own names. Names equal ``torch.export.load(path).module()
.state_dict()``'s: parameters and persistent buffers, ordered module by module.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchkeep._facts import TensorInfo, numel
from torchkeep._tensors import dtype_name, find_aliases
from torchkeep.errors import CorruptFileError, TorchkeepError, UnknownFormatError, UnsafeFileError
from torchkeep.formats._base import OpenOptions, Source, WriteRequest
from torchkeep.formats.torchscript import is_torchscript, target_for, zip_names
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.checks import StorageKind
from torchkeep.safety.rules import SafeRules
from torchkeep.safety.torch_files import (
    ZIP_MAGIC,
    ZipArchive,
    ZipStorages,
    check_crcs,
    open_zip,
    read_member,
)
from torchkeep.safety.unpickle import safe_torch_load

FORMAT_MARK = "archive_format"
FORMAT_VALUE = b"pt2"
VERSION_VALUE = b"0"
WEIGHTS_DIR = "data/weights"
LEGACY_PROGRAM = "serialized_exported_program.json"
LEGACY_STATE = "serialized_state_dict.pt"
_MODEL = re.compile(r"models/([A-Za-z0-9_.-]{1,128})\.json")
_PATH_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_MAX_DIMS = 64
_MAX_CONFIG = 64 << 20
# torch._export.serde.schema.ScalarType codes.
_DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    9: torch.complex32,
    10: torch.complex64,
    11: torch.complex128,
    12: torch.bool,
    13: torch.bfloat16,
    28: torch.uint16,
    29: torch.float8_e4m3fn,
    30: torch.float8_e5m2,
    31: torch.float8_e4m3fnuz,
    32: torch.float8_e5m2fnuz,
    34: torch.uint32,
    35: torch.uint64,
}
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES[33] = torch.float8_e8m0fnu
_STRIDED = 7


def is_pt2(names: list[str]) -> bool:
    """The marks of a torch.export archive: ``<top>/archive_format``, or the earlier layout."""
    return (
        any(n.count("/") == 1 and n.endswith("/" + FORMAT_MARK) for n in names)
        or LEGACY_PROGRAM in names
    )


@dataclass(frozen=True)
class Payload:
    """One weight as its archive's config declares it."""

    name: str
    path_name: str
    pickled: bool
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    location: str

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 62:
        raise CorruptFileError(f"{what} is {str(value)[:40]}, not a non-negative integer")
    return value


def _sym_int(value: Any, what: str) -> int:
    if not isinstance(value, dict) or set(value) != {"as_int"}:
        raise CorruptFileError(f"{what} is not a plain integer (symbolic sizes are not weights)")
    return _int(value["as_int"], what)


def _sym_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_DIMS:
        raise CorruptFileError(f"{what} is not a list of at most {_MAX_DIMS} integers")
    return tuple(_sym_int(v, what) for v in value)


def _location(device: Any) -> str:
    if not isinstance(device, dict) or not isinstance(device.get("type"), str):
        raise CorruptFileError("device is malformed")
    kind, index = device["type"], device.get("index")
    if index is None:
        return str(kind)
    return f"{kind}:{_int(index, 'device index')}"


def _payload(name: str, meta: Any) -> Payload:
    if not isinstance(meta, dict):
        raise CorruptFileError("its entry is not an object")
    path_name, is_param, pickled = (
        meta.get("path_name"),
        meta.get("is_param"),
        meta.get("use_pickle"),
    )
    if type(path_name) is not str or not _PATH_NAME.fullmatch(path_name):
        raise CorruptFileError(f"path_name {str(path_name)[:80]!r} is not a record name")
    if type(is_param) is not bool or type(pickled) is not bool:
        raise CorruptFileError("is_param and use_pickle must be booleans")
    tensor = meta.get("tensor_meta")
    if not isinstance(tensor, dict):
        raise CorruptFileError("it has no tensor_meta")
    code = tensor.get("dtype")
    if type(code) is not int or code not in _DTYPES:
        raise CorruptFileError(f"dtype code {str(code)[:20]} is not one torchkeep knows")
    if tensor.get("layout") != _STRIDED or type(tensor.get("layout")) is not int:
        raise CorruptFileError("it is not a dense (strided) tensor")
    shape = _sym_ints(tensor.get("sizes"), "sizes")
    stride = _sym_ints(tensor.get("strides"), "strides")
    if len(stride) != len(shape):
        raise CorruptFileError(f"it has {len(shape)} sizes but {len(stride)} strides")
    offset = _sym_int(tensor.get("storage_offset"), "storage_offset")
    return Payload(
        name,
        path_name,
        pickled,
        is_param,
        _DTYPES[code],
        shape,
        stride,
        offset,
        _location(tensor.get("device")),
    )


def _extent(payload: Payload) -> int:
    """Elements of storage the view reaches (0 for an empty tensor)."""
    if 0 in payload.shape:
        return 0
    return (
        payload.offset
        + 1
        + sum((s - 1) * st for s, st in zip(payload.shape, payload.stride, strict=True))
    )


def _state_dict_order(is_param: dict[str, bool]) -> list[str]:
    """Names in ``nn.Module.state_dict()`` order: module by module (parents first, children in
    order of first appearance), parameters before buffers within each."""
    children: dict[str, list[str]] = {"": []}
    own: dict[str, list[str]] = {"": []}
    for name in is_param:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            parent, child = ".".join(parts[: depth - 1]), ".".join(parts[:depth])
            if child not in children:
                children[child], own[child] = [], []
                children.setdefault(parent, []).append(child)
        own[".".join(parts[:-1])].append(name)
    out: list[str] = []
    stack = [""]
    while stack:
        module = stack.pop()
        names = own[module]
        out.extend(n for n in names if is_param[n])
        out.extend(n for n in names if not is_param[n])
        stack.extend(reversed(children[module]))
    return out


@contextlib.contextmanager
def _spilled(data: bytes) -> Iterator[str]:
    """A nested ``torch.save`` payload as a file of its own, for the safe reader."""
    fd, name = tempfile.mkstemp(prefix=".torchkeep-pt2-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield name
    finally:
        os.unlink(name)


def _relabel(exc: TorchkeepError, temp: str, label: str) -> TorchkeepError:
    text = str(exc).replace(temp, label)
    if isinstance(exc, UnsafeFileError):
        return UnsafeFileError(text, path=label, globals=exc.globals)
    if isinstance(exc, CorruptFileError):
        return CorruptFileError(text)
    return exc


def read_pickled(zf: ZipArchive, info: zipfile.ZipInfo, options: OpenOptions) -> Any:
    """A ``torch.save`` payload inside the archive, read by the safe machine (or, when the
    caller trusts the file, by ``torch.load``)."""
    label = f"{zf.path}:{info.filename}"
    with _spilled(read_member(zf, info)) as name:
        try:
            return safe_torch_load(
                name,
                map_location="meta" if options.meta else options.map_location,
                trust=options.trust,
                allow_globals=options.allow_globals,
            )
        except TorchkeepError as exc:
            raise _relabel(exc, name, label) from exc


def _exact(zf: ZipArchive, name: str) -> zipfile.ZipInfo | None:
    """The member ``name`` under the archive's top folder, spelled exactly so.

    torch's own reader finds members regardless of case while its Python code lists them
    case-exactly; a member that matches only without case could be read by one and missed by
    the other, so it is refused.
    """
    full = f"{zf.prefix}/{name}" if zf.prefix else name
    info = zf.members.get(full.lower())
    if info is not None and info.filename != full:
        raise UnsafeFileError(
            f"refusing {zf.path!r}: its member {info.filename!r} differs only in case from "
            f"{full!r}, and torch's readers disagree about such names",
            path=zf.path,
        )
    return info


class Pt2Source(Source):
    """The weights of a torch.export archive, read lazily from their raw records."""

    def __init__(self, path: Path, format: str, zf: ZipArchive, options: OpenOptions) -> None:
        super().__init__(str(path), format)
        self.zf = zf
        self.options = options
        self.payloads: dict[str, dict[str, Payload]] = {}
        self.loaded: dict[str, dict[str, torch.Tensor]] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._storages: ZipStorages | None = None

    def add_payloads(self, entry: str, payloads: dict[str, Payload]) -> None:
        order = _state_dict_order({name: p.is_param for name, p in payloads.items()})
        self.payloads[entry] = {name: payloads[name] for name in order}
        self._entries[entry] = {
            name: TensorInfo(name, p.shape, dtype_name(p.dtype), p.nbytes)
            for name, p in self.payloads[entry].items()
        }
        # Names viewing the same bytes of one record are tied weights, stored once.
        first: dict[tuple[object, ...], str] = {}
        aliases: dict[str, str] = {}
        for name, p in self.payloads[entry].items():
            key = (p.path_name, p.pickled, p.shape, p.stride, p.offset)
            if key in first:
                aliases[name] = first[key]
            else:
                first[key] = name
        self._aliases[entry] = aliases

    def add_tensors(self, entry: str, state: dict[str, torch.Tensor]) -> None:
        order = _state_dict_order({k: isinstance(v, torch.nn.Parameter) for k, v in state.items()})
        tensors = {name: state[name].detach() for name in order}
        self.loaded[entry] = tensors
        self._entries[entry] = {
            name: TensorInfo(
                name, tuple(t.shape), dtype_name(t.dtype), t.numel() * t.element_size()
            )
            for name, t in tensors.items()
        }
        self._aliases[entry] = find_aliases(tensors)

    def get(self, entry: str, name: str) -> torch.Tensor:
        if entry in self.loaded:
            return self.loaded[entry][name]
        payload = self.payloads[entry][name]
        if payload.pickled:
            return self._pickled_tensor(payload)
        return self._raw_tensor(payload)

    def _record(self, payload: Payload) -> zipfile.ZipInfo:
        info = _exact(self.zf, f"{WEIGHTS_DIR}/{payload.path_name}")
        assert info is not None  # checked when opened
        return info

    def _pickled_tensor(self, payload: Payload) -> torch.Tensor:
        if payload.path_name not in self._pickled:
            value = read_pickled(self.zf, self._record(payload), self.options)
            if not isinstance(value, torch.Tensor):
                raise CorruptFileError(
                    f"{self.path!r}: the pickled weight {payload.name!r} is a "
                    f"{type(value).__name__}, not a tensor"
                )
            self._pickled[payload.path_name] = value
        value = self._pickled[payload.path_name]
        if tuple(value.shape) != payload.shape or value.dtype != payload.dtype:
            raise CorruptFileError(
                f"{self.path!r}: the pickled weight {payload.name!r} is {tuple(value.shape)} "
                f"{dtype_name(value.dtype)}, but the archive declares {payload.shape} "
                f"{dtype_name(payload.dtype)}"
            )
        return value.detach()

    def _raw_tensor(self, payload: Payload) -> torch.Tensor:
        info = self._record(payload)
        if info.file_size == 0:
            # torch.export writes no bytes for fake and empty tensors and reads zeros back.
            device = "meta" if self.options.meta else "cpu"
            return torch.zeros(payload.shape, dtype=payload.dtype, device=device)
        if self._storages is None:
            self._storages = ZipStorages(
                self.zf, SafeRules(), target_for(self.options), WEIGHTS_DIR
            )
        count = info.file_size // payload.dtype.itemsize
        pid = ("storage", StorageKind(payload.dtype), payload.path_name, payload.location, count)
        storage = self._storages(pid)._untyped_storage
        tensor = torch.empty(0, dtype=payload.dtype, device=storage.device)
        return tensor.set_(storage, payload.offset, payload.shape, payload.stride)

    def verify(self, entry: str | None = None) -> None:
        check_crcs(self.path)

    def close(self) -> None:
        if self._storages is not None:
            self._storages.close()
        self.zf.archive.close()


def _config(zf: ZipArchive, name: str) -> dict[str, Any]:
    info = _exact(zf, name)
    if info is None:
        raise CorruptFileError(f"{zf.path!r} has no {name}, which its program needs")
    if info.file_size > _MAX_CONFIG:
        raise CorruptFileError(f"{zf.path!r}: {name} is {info.file_size} bytes, too large")
    document = _json.loads(read_member(zf, info), path=zf.path, what=name)
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise CorruptFileError(f"{zf.path!r}: {name} holds no config object")
    config: dict[str, Any] = document["config"]
    return config


def _payloads(zf: ZipArchive, model: str) -> dict[str, Payload]:
    name = f"{WEIGHTS_DIR}/{model}_weights_config.json"
    payloads: dict[str, Payload] = {}
    dtypes: dict[str, torch.dtype] = {}
    for fqn, meta in _config(zf, name).items():
        try:
            payload = _payload(fqn, meta)
        except CorruptFileError as exc:
            raise CorruptFileError(f"{zf.path!r}: {name} entry {fqn[:200]!r}: {exc}") from exc
        record = _exact(zf, f"{WEIGHTS_DIR}/{payload.path_name}")
        where = f"{zf.path!r}: weight {fqn[:200]!r}"
        if record is None:
            raise CorruptFileError(f"{where} names a record {payload.path_name!r} it lacks")
        if not payload.pickled:
            if dtypes.setdefault(payload.path_name, payload.dtype) != payload.dtype:
                raise CorruptFileError(f"{where} reads record {payload.path_name} as another dtype")
            if record.compress_type != zipfile.ZIP_STORED:
                raise CorruptFileError(f"{where}: its record is compressed; torch stores raw ones")
            item = payload.dtype.itemsize
            if record.file_size % item:
                raise CorruptFileError(
                    f"{where}: record {payload.path_name} holds {record.file_size} bytes, not a "
                    f"whole number of {dtype_name(payload.dtype)} elements"
                )
            reach = _extent(payload)
            if record.file_size and reach > record.file_size // item:
                raise CorruptFileError(
                    f"{where} is {payload.shape} with strides {payload.stride} from offset "
                    f"{payload.offset}, which reaches element {reach}, but its record holds "
                    f"{record.file_size // item}"
                )
        payloads[fqn] = payload
    return payloads


def _open_current(path: Path, options: OpenOptions, format: str) -> Pt2Source:
    label = str(path)
    zf = open_zip(label, FORMAT_MARK)
    source = Pt2Source(path, format, zf, options)
    try:
        stray = [
            i.filename for i in zf.members.values() if not i.filename.startswith(zf.prefix + "/")
        ]
        if stray:
            raise CorruptFileError(
                f"{label!r}: member {stray[0]!r} lies outside the archive's top folder "
                f"{zf.prefix!r}, which torch's reader refuses"
            )
        mark = _exact(zf, FORMAT_MARK)
        version = _exact(zf, "archive_version")
        assert mark is not None
        if read_member(zf, mark) != FORMAT_VALUE:
            raise CorruptFileError(f"{label!r}: its archive_format is not {FORMAT_VALUE.decode()}")
        if version is None or read_member(zf, version) != VERSION_VALUE:
            raise CorruptFileError(
                f"{label!r}: its archive_version is missing or not {VERSION_VALUE.decode()}, the "
                "one this torch reads"
            )
        prefix = zf.prefix + "/"
        models: list[str] = []
        for info in zf.members.values():
            rel = info.filename[len(prefix) :]
            if rel.startswith("models/"):
                found = _MODEL.fullmatch(rel)
                if found is None:
                    raise CorruptFileError(f"{label!r}: {rel!r} is not a program torch can read")
                models.append(found.group(1))
        if "model" not in models:
            raise CorruptFileError(
                f"{label!r} is a torch.export archive without the program torch.export.load "
                "returns (models/model.json)"
                + ("; it looks like an AOTInductor package" if models == [] else "")
            )
        for model in sorted(models, key=lambda m: m != "model"):
            entry = "" if model == "model" else model
            legacy = _exact(zf, f"{WEIGHTS_DIR}/{model}.pt")
            if legacy is not None:
                source.add_tensors(entry, _state_dict(read_pickled(zf, legacy, options), label))
            else:
                source.add_payloads(entry, _payloads(zf, model))
    except BaseException:
        source.close()
        raise
    return source


def _state_dict(value: Any, label: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise CorruptFileError(f"{label!r}: its weights payload is not a dict of named tensors")
    return value


def _open_legacy(path: Path, options: OpenOptions, format: str) -> Pt2Source:
    label = str(path)
    zf = open_zip(label, flat=True)
    source = Pt2Source(path, format, zf, options)
    try:
        state = _exact(zf, LEGACY_STATE)
        if _exact(zf, "serialized_state_dict.json") is not None:
            raise CorruptFileError(
                f"{label!r} keeps its weights as serialized_state_dict.json, a layout of early "
                "torch.export versions that torchkeep does not read"
                + (
                    "; it also has serialized_state_dict.pt, and loaders disagree on which wins"
                    if state is not None
                    else ""
                )
            )
        if state is None:
            raise CorruptFileError(f"{label!r} is an early torch.export archive without weights")
        source.add_tensors("", _state_dict(read_pickled(zf, state, options), label))
    except BaseException:
        source.close()
        raise
    return source


class Pt2Format:
    """``torch.export.save`` archives (``.pt2``): their weights, never their program."""

    name: str = "torch-export"
    is_folder: bool = False

    def sniff(self, path: Path, head: bytes) -> bool:
        if not head.startswith(ZIP_MAGIC):
            return False
        names = zip_names(path)
        return names is not None and is_pt2(names)

    def open(self, path: Path, options: OpenOptions) -> Source:
        names = zip_names(path) or []
        if is_torchscript(names) or any(
            n.count("/") == 1 and n.lower().endswith("/data.pkl") for n in names
        ):
            raise UnsafeFileError(
                f"refusing {str(path)!r}: it is laid out both as a torch.export archive and as a "
                "torch.save or TorchScript file, so loaders could disagree about its contents",
                path=str(path),
            )
        current = any(n.count("/") == 1 and n.endswith("/" + FORMAT_MARK) for n in names)
        if current and LEGACY_PROGRAM in names:
            raise UnsafeFileError(
                f"refusing {str(path)!r}: it holds both torch.export layouts, so loaders could "
                "disagree about its contents",
                path=str(path),
            )
        if current:
            return _open_current(path, options, self.name)
        return _open_legacy(path, options, self.name)

    def write(self, request: WriteRequest, path: Path) -> None:
        raise UnknownFormatError(
            "torchkeep does not write torch.export archives from weights; export the model with "
            "torchkeep.export(model, example_inputs, 'model.pt2')"
        )
