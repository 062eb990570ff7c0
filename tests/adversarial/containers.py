"""Wrap pickle bytes into the files torch writes: zip layout, legacy layout, plain pickle."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Iterable, Mapping

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def storage_ref(
    key: str, dtype_storage: str, numel: int, location: str = "cpu", *, legacy: bool = False
) -> bytes:
    """Opcodes pushing the persistent id torch writes for a storage (protocol 2, no memo).

    The legacy layout adds a sixth field (view metadata, None for a whole storage).
    """
    from .opcodes import Asm

    asm = Asm(proto=None)
    asm.mark().str("storage").global_("torch", dtype_storage).str(key).str(location)
    asm.int(numel)
    if legacy:
        asm.none()
    asm.raw(pickle.TUPLE).binpersid()
    return asm.bytes()


def as_legacy_refs(pickled: bytes, numels: Iterable[int] = (4,)) -> bytes:
    """Rewrite the zip-layout storage ids of record "0" into the legacy layout's."""
    for numel in numels:
        pickled = pickled.replace(
            storage_ref("0", "FloatStorage", numel),
            storage_ref("0", "FloatStorage", numel, legacy=True),
        )
    return pickled


def zip_members(
    pickle_bytes: bytes,
    records: Mapping[str, bytes] | None = None,
    *,
    prefix: str = "archive",
    byteorder: str = "little",
) -> list[tuple[str, bytes]]:
    """The members torch.save writes, with ``pickle_bytes`` as data.pkl."""
    members = [
        (f"{prefix}/data.pkl", pickle_bytes),
        (f"{prefix}/.format_version", b"1"),
        (f"{prefix}/.storage_alignment", b"64"),
        (f"{prefix}/byteorder", byteorder.encode()),
    ]
    members += [(f"{prefix}/data/{key}", data) for key, data in (records or {}).items()]
    members += [
        (f"{prefix}/version", b"3\n"),
        (f"{prefix}/.data/serialization_id", b"0" * 40),
    ]
    return members


def write_zip(
    members: Iterable[tuple[str, bytes]],
    *,
    compress: Mapping[str, int] | None = None,
) -> bytes:
    """A zip of ``members`` in order, every record stored unless ``compress`` names it.

    Duplicate names are written as given (zipfile warns; the warning is the point).
    """
    compress = compress or {}
    out = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(out, "w") as archive:
            for name, data in members:
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.compress_type = compress.get(name, zipfile.ZIP_STORED)
                archive.writestr(info, data)
    return out.getvalue()


def torch_zip(
    pickle_bytes: bytes, records: Mapping[str, bytes] | None = None, **kw: object
) -> bytes:
    """A torch zip file whose data.pkl is ``pickle_bytes``."""
    return write_zip(zip_members(pickle_bytes, records, **kw))  # type: ignore[arg-type]


def legacy(
    pickle_bytes: bytes,
    storages: Iterable[tuple[str, bytes, int]] = (),
    *,
    keys: list[str] | None = None,
    little_endian: bool = True,
) -> bytes:
    """A legacy (pre-1.6) torch file: magic, protocol, sys info, the pickle, storage data.

    ``storages`` holds (key, raw bytes, element count); ``keys`` overrides the key list torch
    reads back (so a storage can be referenced but never filled).
    """
    storages = list(storages)
    pickle_bytes = as_legacy_refs(pickle_bytes, {4, *(n for _, _, n in storages)})
    out = io.BytesIO()
    for header in (
        LEGACY_MAGIC,
        LEGACY_PROTOCOL,
        {
            "protocol_version": LEGACY_PROTOCOL,
            "little_endian": little_endian,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        },
    ):
        pickle.dump(header, out, protocol=2)
    out.write(pickle_bytes)
    pickle.dump(keys if keys is not None else [k for k, _, _ in storages], out, protocol=2)
    for _key, data, numel in storages:
        out.write(struct.pack("<q", numel))
        out.write(data)
    return out.getvalue()


def real_torch_bytes(obj: object, *, legacy_format: bool = False) -> bytes:
    """What torch.save writes for ``obj``."""
    out = io.BytesIO()
    torch.save(obj, out, _use_new_zipfile_serialization=not legacy_format)
    return out.getvalue()


def replace_data_pkl(zip_bytes: bytes, new_pickle: bytes) -> bytes:
    """A copy of a torch zip with data.pkl replaced; every other record kept, stored."""
    src = zipfile.ZipFile(io.BytesIO(zip_bytes))
    members = []
    for info in src.infolist():
        data = src.read(info.filename)
        if info.filename.endswith("/data.pkl"):
            data = new_pickle
        members.append((info.filename, data))
    return write_zip(members)
