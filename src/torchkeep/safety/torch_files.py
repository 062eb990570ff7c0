"""Read ``torch.save`` files (zip and legacy layouts) without ``torch.load``.

``torch.load`` decides things a hostile file can steer: it hands TorchScript-looking zips to
``torch.jit.load``, writes ``.patch`` files for legacy whole-model pickles, copies a record's
bytes without asking whether they are compressed, byte-swaps storages it never filled. Here the
container is read by torchkeep: member names are checked, the pickle runs on the
:mod:`~torchkeep.safety.vm` machine, every persistent id is validated, and each storage is
taken from exactly one stored (uncompressed) record of exactly the declared size — or from the
legacy layout's data section, every storage of which must be present.
"""

from __future__ import annotations

import bisect
import mmap as mmap_module
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from torchkeep.errors import ChecksumError, CorruptFileError, UnsafeFileError
from torchkeep.safety.checks import StorageKind
from torchkeep.safety.rules import SafeRules
from torchkeep.safety.vm import DEFAULT_LIMITS, Limits, Machine

ZIP_MAGIC = b"PK\x03\x04"
# pickle.dump(torch's legacy magic number, protocol=2), the first bytes of every legacy file.
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_LEGACY_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# A compressed pickle member is expanded in memory; a stored one is as large as the file.
MAX_COMPRESSED_PICKLE = 256 << 20
_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
_LOCATION = re.compile(r"[a-z_]{1,32}(:[0-9]{1,4})?")

Restore = Callable[[torch.UntypedStorage, str], torch.UntypedStorage]


@dataclass(frozen=True)
class Record:
    """Where one storage's bytes lie in a torch zip: a stored record, validated.

    Attributes:
        name: the record's member name, for messages.
        offset: the file offset of its first data byte.
        nbytes: its length, exactly the storage's.
    """

    name: str
    offset: int
    nbytes: int


@dataclass
class Target:
    """Where storages go: on ``meta`` (shapes only), mapped from the file, or read."""

    restore: Restore
    meta: bool = False
    mmap: bool = False
    # Storages stay on the CPU (map_location "cpu").
    cpu: bool = False
    # Storages mapped from the file, by data pointer: the record each one is, so that their
    # tensors can be read straight from the file instead of through the mapping.
    records: dict[int, Record] = field(default_factory=dict)

    @classmethod
    def for_location(cls, map_location: Any, *, mmap: bool = False) -> Target:
        """The target for a ``torch.load``-style ``map_location`` (``"meta"``: shapes only)."""
        meta = str(map_location) == "meta"
        cpu = str(map_location) == "cpu"
        return cls(restore_for(None if meta else map_location), meta=meta, mmap=mmap, cpu=cpu)


def restore_for(map_location: Any) -> Restore:
    """``torch.load``'s ``map_location`` semantics as a function of (storage, location)."""
    return torch.serialization._get_restore_location(map_location)  # type: ignore[no-untyped-call,no-any-return]


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return int(torch._utils._element_size(dtype))  # type: ignore[no-untyped-call]


def _meta(nbytes: int) -> torch.UntypedStorage:
    return torch.UntypedStorage(nbytes, device="meta")  # type: ignore[no-untyped-call]


def run_pickle(
    buf: Any,
    start: int,
    *,
    rules: SafeRules,
    label: str,
    persistent_load: Callable[[Any], Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[Any, int]:
    """Run one pickle from ``buf[start:]``; return its value and where it ended."""
    machine = Machine(
        buf, start, rules=rules, persistent_load=persistent_load, label=label, limits=limits
    )
    return machine.run()


def _pid_fields(pid: Any, label: str, size: int) -> tuple[Any, ...]:
    if (
        not isinstance(pid, tuple)
        or len(pid) != size
        or pid[0] not in ("storage", b"storage")
        or not isinstance(pid[1], StorageKind)
    ):
        raise UnsafeFileError(
            f"refusing {label!r}: its pickle refers to an external object {_short(pid)} that is "
            "not a tensor storage; nothing was executed",
            path=label,
        )
    return pid


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


def _check_key(value: Any, what: str, label: str, pattern: re.Pattern[str] = _KEY) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if type(value) is not str or not pattern.fullmatch(value):
        raise CorruptFileError(f"{label!r} names a storage {what} {_short(value)}")
    return value


def _check_count(value: Any, label: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 48:
        raise CorruptFileError(f"{label!r} declares a storage of {_short(value)} elements")
    return value


def _typed(
    rules: SafeRules, storage: torch.UntypedStorage, dtype: torch.dtype
) -> torch.storage.TypedStorage:
    typed = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
        wrap_storage=storage, dtype=dtype, _internal=True
    )
    rules.storages[id(typed)] = typed
    return typed


# -- zip ------------------------------------------------------------------------------------


@dataclass
class ZipArchive:
    """A validated torch zip: its members by name, the pickle member and the record folder."""

    path: str
    archive: zipfile.ZipFile
    prefix: str
    members: dict[str, zipfile.ZipInfo] = field(default_factory=dict)

    def find(self, name: str) -> zipfile.ZipInfo | None:
        """The member ``prefix/name``, matched without regard to case as torch's reader does."""
        return self.members.get((f"{self.prefix}/{name}" if self.prefix else name).lower())


def meta_storage(pid: Any, rules: SafeRules, label: str) -> torch.storage.TypedStorage:
    """A storage persistent id (zip layout) checked and stood in for on the meta device."""
    _, kind, _, location, numel = _pid_fields(pid, label, 5)
    _check_key(location, "location", label, _LOCATION)
    nbytes = _check_count(numel, label) * element_size(kind.dtype)
    return _typed(rules, _meta(nbytes), kind.dtype)


def open_zip(path: str, pickle_name: str = "data.pkl", *, flat: bool = False) -> ZipArchive:
    """Open a torch zip and check its member names before anything is read.

    ``pickle_name=""`` skips looking for the pickle member (the prefix is then the first
    member's folder); ``flat`` is for archives whose members sit at the top level (prefix
    ``""``).

    Raises:
        CorruptFileError: not a readable zip, or no pickle member.
        UnsafeFileError: absolute or ``..`` member names, names that differ only in case,
            or more than one candidate pickle.
    """
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptFileError(
            f"{path!r} starts like a torch.save zip file but its zip directory cannot be read "
            f"({exc}): the file is truncated or damaged"
        ) from exc
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise UnsafeFileError(
                f"refusing {path!r}: its zip member {name!r} names a path outside the archive",
                path=path,
            )
        if name.lower() in members:
            raise UnsafeFileError(
                f"refusing {path!r}: it has two zip members named {name!r} (ignoring case), so "
                "readers could disagree about its contents",
                path=path,
            )
        members[name.lower()] = info
    if flat:
        return ZipArchive(path, archive, "", members)
    if not pickle_name:
        first = infos[0].filename.split("/")[0] if infos else ""
        return ZipArchive(path, archive, first, members)
    pickles = [
        info
        for info in infos
        if info.filename.count("/") == 1 and info.filename.lower().endswith("/" + pickle_name)
    ]
    if not pickles:
        raise CorruptFileError(f"{path!r} is a zip file without a {pickle_name} member")
    if len(pickles) > 1:
        raise UnsafeFileError(
            f"refusing {path!r}: it has {len(pickles)} {pickle_name} members", path=path
        )
    return ZipArchive(path, archive, pickles[0].filename.split("/")[0], members)


def check_crcs(path: str) -> None:
    """Check every zip member's CRC-32 against the zip directory (torch's reader does not).

    Raises:
        CorruptFileError: the zip cannot be read, or a member expands past what torchkeep
            reads (a compression bomb is not expanded to be checked).
        ChecksumError: a member's bytes do not match their CRC-32.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED and (
                    info.file_size > MAX_COMPRESSED_PICKLE
                ):
                    raise CorruptFileError(
                        f"{path!r}: member {info.filename!r} expands to {info.file_size} bytes; "
                        "it is not expanded to be checked"
                    )
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CorruptFileError(f"{path!r} is not a readable zip file: {exc}") from exc
    if bad is not None:
        raise ChecksumError(
            f"member {bad!r} of {path!r} is damaged: its CRC-32 does not match the one stored "
            "in the zip directory"
        )


def read_member(zf: ZipArchive, info: zipfile.ZipInfo) -> bytes:
    """A small member's bytes (a pickle), refusing compression bombs and unknown methods."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UnsafeFileError(
            f"refusing {zf.path!r}: member {info.filename!r} uses zip compression method "
            f"{info.compress_type}, which torch.save never writes",
            path=zf.path,
        )
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSED_PICKLE:
        raise UnsafeFileError(
            f"refusing {zf.path!r}: member {info.filename!r} expands to {info.file_size} bytes",
            path=zf.path,
        )
    try:
        with zf.archive.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CorruptFileError(f"cannot read {info.filename!r} in {zf.path!r}: {exc}") from exc
    if len(data) != info.file_size:
        raise CorruptFileError(f"member {info.filename!r} of {zf.path!r} has the wrong size")
    return data


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_DATA_DESCRIPTOR = 0x08
_ZIP64_EXTRA = 0x0001
_ZIP64_MARK = 0xFFFFFFFF


def _zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    """(uncompressed, compressed) sizes from a local header's zip64 extra field, if any."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, size = struct.unpack("<HH", extra[pos : pos + 4])
        if kind == _ZIP64_EXTRA and size >= 16:
            return struct.unpack("<QQ", extra[pos + 4 : pos + 20])  # type: ignore[return-value]
        pos += 4 + size
    return None


def _data_offset(f: BinaryIO, info: zipfile.ZipInfo, label: str) -> int:
    """The file offset of a stored record's data, its local header checked against the zip
    directory: same name, same method, and the same sizes (or none: zeros with a data
    descriptor, as torch writes, or a zip64 extra that holds them)."""
    f.seek(info.header_offset)
    head = f.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size or head[:4] != ZIP_MAGIC:
        raise CorruptFileError(f"{label!r}: the local header of {info.filename!r} is damaged")
    _, _, flags, method, _, _, _, compressed, size, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    name = f.read(name_len)
    if (
        name.decode("utf-8", "replace") != info.filename
        and name.decode("cp437", "replace") != info.filename
    ):
        raise UnsafeFileError(
            f"refusing {label!r}: the local header of {info.filename!r} names another file",
            path=label,
        )
    extra = f.read(extra_len)
    if len(extra) != extra_len:
        raise CorruptFileError(
            f"{label!r} is truncated inside the local header of {info.filename!r}"
        )
    if method != info.compress_type:
        raise CorruptFileError(
            f"{label!r}: the local header of {info.filename!r} declares compression method "
            f"{method}, the zip directory {info.compress_type}; readers would disagree about "
            "its bytes"
        )
    declared: tuple[int, int] | None = (size, compressed)
    if _ZIP64_MARK in (size, compressed):
        declared = _zip64_sizes(extra)
    no_sizes = flags & _DATA_DESCRIPTOR and declared == (0, 0)
    if not no_sizes and declared != (info.file_size, info.compress_size):
        said = (
            "no readable sizes"
            if declared is None
            else f"{declared[0]} bytes ({declared[1]} stored)"
        )
        raise CorruptFileError(
            f"{label!r}: the local header of {info.filename!r} declares {said}, but the zip "
            f"directory {info.file_size} ({info.compress_size} stored); the file is damaged or "
            "crafted"
        )
    start: int = info.header_offset
    return start + _LOCAL_HEADER.size + int(name_len) + int(extra_len)


class ZipStorages:
    """persistent_load for a torch zip: one stored record per storage key.

    Also what readers of other zip layouts call with a storage id they build themselves, to
    take a record with the same checks (stored, exact size, inside the file, byte order).
    """

    def __init__(self, zf: ZipArchive, rules: SafeRules, target: Target, records: str) -> None:
        self.zf = zf
        self.rules = rules
        self.target = target
        self.records = records
        self.loaded: dict[str, tuple[torch.storage.TypedStorage, int]] = {}
        self.file = open(zf.path, "rb")  # noqa: SIM115 - closed by close()
        self.size = self.file.seek(0, 2)
        # A record's data ends before the next member's local header (so no two records
        # overlap), and every member before the zip directory.
        self.end = min(self.size, zf.archive.start_dir)
        self.starts = sorted(info.header_offset for info in zf.members.values())
        self.mapped: torch.UntypedStorage | None = None
        byteorder = zf.find("byteorder")
        order = read_member(zf, byteorder).strip() if byteorder is not None else b"little"
        if order not in (b"little", b"big"):
            raise CorruptFileError(f"{zf.path!r} declares an unknown byte order {order[:16]!r}")
        self.swap = order.decode() != __import__("sys").byteorder

    def close(self) -> None:
        self.file.close()

    def __call__(self, pid: Any) -> torch.storage.TypedStorage:
        label = self.zf.path
        _, kind, key, location, numel = _pid_fields(pid, label, 5)
        key = _check_key(key, "key", label)
        location = _check_key(location, "location", label, _LOCATION)
        numel = _check_count(numel, label)
        dtype = kind.dtype
        nbytes = numel * element_size(dtype)
        if key in self.loaded:
            storage, size = self.loaded[key]
            if storage.dtype != dtype or size != nbytes:
                raise CorruptFileError(
                    f"{label!r} declares storage {key} twice with different types or sizes"
                )
            return storage
        info = self.zf.find(f"{self.records}/{key}")
        if info is None:
            raise CorruptFileError(f"{label!r} has no record {self.records}/{key} for a tensor")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptFileError(
                f"{label!r}: record {info.filename!r} is compressed; torch.save stores tensor "
                "records uncompressed, and compressed bytes are never read as tensor values"
            )
        if info.file_size != nbytes:
            raise CorruptFileError(
                f"{label!r}: record {info.filename!r} holds {info.file_size} bytes, but its "
                f"tensor storage needs {nbytes} ({numel} x {dtype})"
            )
        offset = _data_offset(self.file, info, label)
        if offset + nbytes > self.size:
            raise CorruptFileError(f"{label!r} is truncated inside record {info.filename!r}")
        bound = self._bound(info)
        if offset + nbytes > bound:
            after = "the zip directory" if bound == self.end else "the next zip member"
            raise CorruptFileError(
                f"{label!r}: record {info.filename!r} needs bytes {offset} to {offset + nbytes}, "
                f"but {after} starts at byte {bound}: it overlaps what follows, so the file is "
                "damaged or crafted"
            )
        untyped = self._storage(offset, nbytes, dtype)
        if not self.target.meta:
            untyped = self.target.restore(untyped, location)
        if self.target.mmap and self.target.cpu and not self.swap and nbytes:
            self.target.records[untyped.data_ptr()] = Record(info.filename, offset, nbytes)
        typed = _typed(self.rules, untyped, dtype)
        self.loaded[key] = (typed, nbytes)
        return typed

    def _bound(self, info: zipfile.ZipInfo) -> int:
        """Where the member after ``info`` starts: its data may not reach past that."""
        at = bisect.bisect_right(self.starts, info.header_offset)
        return self.starts[at] if at < len(self.starts) else self.end

    def _storage(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.UntypedStorage:
        if self.target.meta:
            return _meta(nbytes)
        if self.target.mmap and not self.swap:
            if self.mapped is None:
                self.mapped = torch.UntypedStorage.from_file(  # type: ignore[no-untyped-call,assignment]
                    self.zf.path, False, self.size
                )
            return self.mapped[offset : offset + nbytes]  # type: ignore[index,no-any-return]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.file.seek(offset)
        if nbytes and self.file.readinto(buffer.numpy()) != nbytes:  # type: ignore[arg-type]
            raise CorruptFileError(f"{self.zf.path!r} is truncated inside a tensor record")
        storage = buffer.untyped_storage()
        if self.swap and nbytes:
            storage.byteswap(dtype)  # type: ignore[no-untyped-call]
        return storage


def read_zip(
    path: str,
    *,
    rules: SafeRules,
    target: Target,
    pickle_name: str = "data.pkl",
    records: str = "data",
    zf: ZipArchive | None = None,
) -> Any:
    """Unpickle a torch zip's ``pickle_name`` with storages from its ``records`` folder."""
    zf = zf or open_zip(path, pickle_name)
    info = zf.find(pickle_name)
    assert info is not None  # open_zip found it
    data = read_member(zf, info)
    storages = ZipStorages(zf, rules, target, records)
    try:
        value, end = run_pickle(
            data, 0, rules=rules, label=f"{path}:{info.filename}", persistent_load=storages
        )
    finally:
        storages.close()
    if end != len(data):
        raise CorruptFileError(f"{path!r}: {info.filename!r} has bytes after the pickle's end")
    return value


def read_torch_zip(path: str, *, rules: SafeRules, target: Target) -> Any:
    """Unpickle a ``torch.save`` zip (refusing a TorchScript archive, which is another format).

    With a mapping target, ``target.records`` ends up naming the record of every storage.
    """
    zf = open_zip(path)
    if zf.find("constants.pkl") is not None:
        raise CorruptFileError(
            f"{path!r} is a TorchScript archive, not a torch.save file; read its weights "
            "with torchkeep.load_state_dict, or run it with torchkeep.load_model(..., "
            "trust=True)"
        )
    return read_zip(path, rules=rules, target=target, zf=zf)


# -- legacy ---------------------------------------------------------------------------------


@dataclass
class _Root:
    dtype: torch.dtype
    numel: int
    storage: torch.storage.TypedStorage | None = None


class _LegacyStorages:
    """persistent_load for the legacy layout, recording which storages the pickle uses.

    Without ``fill``, storages are allocated on ``device`` (``meta``, or ``cpu`` to be filled
    from the data section after the pickle, once every storage is known to be there).
    """

    def __init__(
        self,
        label: str,
        rules: SafeRules,
        fill: Callable[[str, _Root], Any] | None,
        device: str = "meta",
    ) -> None:
        self.label = label
        self.device = device
        self.rules = rules
        self.fill = fill
        self.roots: dict[str, _Root] = {}
        self.views: dict[str, torch.storage.TypedStorage] = {}

    def __call__(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
            # A pickled nn.Module class (with its source, which torch.load would compare and
            # possibly write out as a .patch file): only the class reference is kept.
            if len(pid) != 4:
                raise CorruptFileError(f"{self.label!r} has a malformed module record")
            return pid[1]
        _, kind, key, location, numel, view = _pid_fields(pid, self.label, 6)
        key = _check_key(key, "key", self.label)
        _check_key(location, "location", self.label, _LOCATION)
        numel = _check_count(numel, self.label)
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = _Root(kind.dtype, numel)
        elif root.dtype != kind.dtype or root.numel != numel:
            raise CorruptFileError(f"{self.label!r} declares storage {key} twice, differently")
        if root.storage is None:
            storage = (
                self.fill(key, root)
                if self.fill is not None
                else torch.UntypedStorage(  # type: ignore[no-untyped-call]
                    numel * element_size(root.dtype), device=self.device
                )
            )
            root.storage = _typed(self.rules, storage, root.dtype)
        if view is None:
            return root.storage
        if not isinstance(view, tuple) or len(view) != 3:
            raise CorruptFileError(f"{self.label!r} has a malformed storage view")
        view_key = _check_key(view[0], "view key", self.label)
        start, size = _check_count(view[1], self.label), _check_count(view[2], self.label)
        if start + size > numel:
            raise CorruptFileError(f"{self.label!r} has a storage view past its storage's end")
        if view_key not in self.views:
            item = element_size(root.dtype)
            sliced = root.storage._untyped_storage[start * item : (start + size) * item]
            self.views[view_key] = _typed(self.rules, sliced, root.dtype)
        return self.views[view_key]


def read_legacy(path: str, *, rules: SafeRules, target: Target) -> Any:
    """Read ``torch.save(..., _use_new_zipfile_serialization=False)`` files.

    The layout is four pickles (magic number, protocol, system info, the object) then a pickled
    list of storage keys and each storage's element count and bytes, in that order. The object
    pickle runs once on meta storages; the storage keys that follow must name every one of
    them, with matching element counts (an unfilled storage would be uninitialised memory).
    Unless the target is meta, the pickle then runs a second time with storages filled and
    restored as they are made, so that what checks values as it is built (sparse indices,
    nested offsets) sees the file's data.
    """
    with open(path, "rb") as f:
        try:
            buf: Any = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ)
        except (ValueError, OSError) as exc:
            raise CorruptFileError(f"cannot map {path!r}: {exc}") from exc
    try:
        return _read_legacy(path, buf, rules, target)
    finally:
        buf.close()


def _read_legacy(path: str, buf: Any, rules: SafeRules, target: Target) -> Any:
    header = SafeRules()
    magic, pos = run_pickle(buf, 0, rules=header, label=path)
    protocol, pos = run_pickle(buf, pos, rules=header, label=path)
    if magic != _LEGACY_NUMBER or protocol != _LEGACY_PROTOCOL:
        raise CorruptFileError(f"{path!r} is not a torch legacy file (bad magic or protocol)")
    _, pos = run_pickle(buf, pos, rules=header, label=path)
    if header.refused:
        raise UnsafeFileError(f"refusing {path!r}: its header pickles reference globals", path=path)
    object_start = pos
    # On meta the survey is the whole read; otherwise its storages stay apart.
    survey_rules = rules if target.meta else SafeRules(rules.extra, torch_nn=rules.torch_nn)
    survey = _LegacyStorages(path, survey_rules, None, "meta")
    value, pos = run_pickle(buf, pos, rules=survey.rules, label=path, persistent_load=survey)
    keys, pos = run_pickle(buf, pos, rules=header, label=path)
    if not isinstance(keys, list) or not all(type(k) is str for k in keys):
        raise CorruptFileError(f"{path!r}: its list of storage keys is damaged")
    if sorted(keys) != sorted(survey.roots) or len(set(keys)) != len(keys):
        missing = sorted(set(survey.roots) - set(keys))
        raise CorruptFileError(
            f"{path!r}: the storages listed after the pickle ({len(keys)}) do not match the "
            f"ones it uses ({len(survey.roots)})"
            + (f"; never filled: {', '.join(missing[:5])}" if missing else "")
        )
    offsets: dict[str, int] = {}
    for key in keys:
        root = survey.roots[key]
        if pos + 8 > len(buf):
            raise CorruptFileError(f"{path!r} is truncated in the data of storage {key}")
        (count,) = struct.unpack("<q", buf[pos : pos + 8])
        if count != root.numel:
            raise CorruptFileError(
                f"{path!r}: storage {key} declares {count} elements, its tensors {root.numel}"
            )
        offsets[key] = pos + 8
        pos += 8 + count * element_size(root.dtype)
    if pos > len(buf):
        raise CorruptFileError(f"{path!r} is truncated: its storages need {pos} bytes")
    if target.meta:
        return value

    def copy(key: str, into: torch.UntypedStorage) -> None:
        nbytes = into.nbytes()
        if nbytes:
            view = torch.empty(0, dtype=torch.uint8).set_(into)
            view.numpy()[:] = memoryview(buf)[offsets[key] : offsets[key] + nbytes]

    def fill(key: str, root: _Root) -> torch.UntypedStorage:
        data = torch.empty(root.numel * element_size(root.dtype), dtype=torch.uint8)
        copy(key, data.untyped_storage())
        return target.restore(data.untyped_storage(), "cpu")

    storages = _LegacyStorages(path, rules, fill)
    value, _ = run_pickle(buf, object_start, rules=rules, label=path, persistent_load=storages)
    return value
