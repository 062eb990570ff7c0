"""List the globals a pickle refers to, without unpickling it.

Unpickling runs code: every global a pickle names is imported and may be
called. This module walks the opcodes with :mod:`pickletools` instead, so a
caller can see every ``(module, name)`` pair before deciding to load a file.
Nothing is imported and nothing is executed.
"""

from __future__ import annotations

import io
import os
import pickletools
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeAlias

__all__ = [
    "GlobalRef",
    "PickleScanError",
    "scan_pickle_bytes",
    "scan_pickle_stream",
    "scan_torch_file",
]


@dataclass(frozen=True)
class GlobalRef:
    """A global that a pickle would import when loaded.

    Attributes:
        module: Module name exactly as recorded in the pickle, or ``"?"`` if it
            could not be determined without running the pickle.
        name: Attribute name (possibly dotted) within ``module``, or ``"?"``.
    """

    module: str
    name: str

    @property
    def qualname(self) -> str:
        """The reference as ``"module.name"``."""
        return f"{self.module}.{self.name}"


class PickleScanError(ValueError):
    """Raised when data is not a well-formed pickle or torch.save file.

    Attributes:
        reason: What was wrong, without the location.
        source: The file (or file and archive member) being scanned, if known.
        offset: Byte offset where decoding stopped, if known.
    """

    def __init__(
        self, reason: str, *, source: str | None = None, offset: int | None = None
    ) -> None:
        message = reason
        if offset is not None:
            message += f" at byte offset {offset}"
        if source is not None:
            message = f"{source}: {message}"
        super().__init__(message)
        self.reason = reason
        self.source = source
        self.offset = offset


# Recorded when a global's name is only known by running the pickle.
_UNRESOLVED = GlobalRef("?", "?")

# Errors pickletools raises on bad input. MemoryError comes from a corrupt
# length field asking a buffered file for an impossibly large read.
_DECODE_ERRORS = (ValueError, MemoryError)

# Signature torch.load uses to pick the zip format (torch.serialization).
_ZIP_MAGIC = b"PK\x03\x04"
# The first pickle of the legacy format holds exactly this integer.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Magic number, protocol version, sys info, the object, storage keys.
_LEGACY_PICKLE_COUNT = 5


class _Mark:
    """Stand-in for a MARK on the simulated stack."""


_MARK = _Mark()

# Only strings matter for STACK_GLOBAL; every other object is stored as None.
_Value: TypeAlias = "str | None"
_Slot: TypeAlias = "_Value | _Mark"

_TEXT_OPS = frozenset({"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})
# Python 2 str opcodes. They load as text through the loader's encoding, and
# only ASCII decodes the same under every encoding.
_BYTE_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# The extension registry maps codes to globals inside the loading process.
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})


def _stack_effect(op: pickletools.OpcodeInfo) -> tuple[bool, int, tuple[_Slot, ...]]:
    before = op.stack_before
    pops_to_mark = pickletools.markobject in before
    n_pop = before.index(pickletools.markobject) if pops_to_mark else len(before)
    pushes = tuple(_MARK if item is pickletools.markobject else None for item in op.stack_after)
    return pops_to_mark, n_pop, pushes


# (pops everything down to the topmost mark?, further items popped, pushes)
_STACK_EFFECTS = {op.name: _stack_effect(op) for op in pickletools.opcodes}


def scan_pickle_bytes(data: bytes) -> list[GlobalRef]:
    """List the globals referenced by one pickle.

    Args:
        data: A pickle; anything after its STOP opcode is ignored.

    Returns:
        Each distinct global once, in the order first referenced.

    Raises:
        PickleScanError: ``data`` is truncated or not a pickle.
    """
    return _scan_stream(io.BytesIO(data), 1, source=None)


def scan_pickle_stream(f: BinaryIO, count: int | None = None) -> list[GlobalRef]:
    """List the globals referenced by consecutive pickles in a file.

    Args:
        f: A seekable binary file positioned at the first pickle. It is left
            just after the last pickle scanned.
        count: How many pickles to scan. ``None`` scans until end of file or
            until the data that follows does not decode as a pickle (the file
            is then left at the start of that data).

    Returns:
        Each distinct global once, in the order first referenced.

    Raises:
        PickleScanError: A pickle is truncated or malformed, fewer than
            ``count`` pickles are present, or (with ``count=None``) the first
            one is not a pickle.
    """
    name = getattr(f, "name", None)
    return _scan_stream(f, count, source=name if isinstance(name, str) else None)


def scan_torch_file(path: str | os.PathLike[str]) -> list[GlobalRef]:
    """List the globals referenced by a file written by ``torch.save``.

    Handles the zip format (every ``*.pkl`` member, including TorchScript's
    ``constants.pkl``), the legacy format written with
    ``_use_new_zipfile_serialization=False`` (its five leading pickles), and a
    file written by plain ``pickle.dump``.

    Args:
        path: The file to scan.

    Returns:
        Each distinct global once, in the order first referenced.

    Raises:
        PickleScanError: The file is none of these formats, or is truncated or
            malformed.
        OSError: The file cannot be read.
    """
    source = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
        f.seek(0)
        if not head:
            raise PickleScanError("empty file", source=source)
        if head == _ZIP_MAGIC:
            return _scan_zip(f, source)
        # torch.load tries the pre-1.0 tar format first; its pickles are
        # archive members, which this scanner does not read.
        if tarfile.is_tarfile(f):
            raise PickleScanError("tar checkpoints are not supported", source=source)
        f.seek(0)
        count = _LEGACY_PICKLE_COUNT if _starts_with_legacy_magic(f) else None
        return _scan_stream(f, count, source=source)


def _scan_zip(f: BinaryIO, source: str) -> list[GlobalRef]:
    try:
        with zipfile.ZipFile(f) as archive:
            members = [n for n in archive.namelist() if n.endswith(".pkl")]
            if not members:
                raise PickleScanError("zip archive has no .pkl member", source=source)
            refs: list[GlobalRef] = []
            for member in members:
                data = io.BytesIO(archive.read(member))
                refs += _scan_stream(data, 1, source=f"{source}:{member}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise PickleScanError(f"corrupt zip archive ({exc})", source=source) from exc
    return list(dict.fromkeys(refs))


def _starts_with_legacy_magic(f: BinaryIO) -> bool:
    # Compare decoded values rather than bytes: the magic number may have been
    # written with any protocol.
    start = f.tell()
    try:
        values = [
            arg for op, arg, _ in pickletools.genops(f) if op.name not in ("PROTO", "FRAME", "STOP")
        ]
    except _DECODE_ERRORS:
        return False
    finally:
        f.seek(start)
    return values == [_LEGACY_MAGIC]


def _scan_stream(f: BinaryIO, count: int | None, source: str | None) -> list[GlobalRef]:
    refs: list[GlobalRef] = []
    scanned = 0
    while count is None or scanned < count:
        start = f.tell()
        if count is None and not f.read(1):
            break
        f.seek(start)
        try:
            refs += _scan_one(f, source)
        except PickleScanError:
            if count is not None or scanned == 0:
                raise
            f.seek(start)  # trailing data that is not a pickle
            break
        scanned += 1
    return list(dict.fromkeys(refs))


def _scan_one(f: BinaryIO, source: str | None) -> list[GlobalRef]:
    """Scan one pickle, simulating just enough of the stack for STACK_GLOBAL."""
    refs: list[GlobalRef] = []
    stack: list[_Slot] = []
    memo: dict[int, _Value] = {}
    arg: Any  # its type depends on the opcode
    try:
        for op, arg, pos in pickletools.genops(f):
            name = op.name
            if name in _TEXT_OPS:
                stack.append(arg)
            elif name in _BYTE_STRING_OPS:
                stack.append(arg if arg.isascii() else None)
            elif name in _PUT_OPS:
                memo[arg] = _top_string(stack)
            elif name == "MEMOIZE":
                memo[len(memo)] = _top_string(stack)
            elif name in _GET_OPS:
                stack.append(memo.get(arg))
            elif name == "DUP":
                stack.append(_top_string(stack))
            else:
                if name in ("GLOBAL", "INST"):
                    refs.append(_read_global_lines(f, pos))
                elif name == "STACK_GLOBAL":
                    refs.append(_stack_global(stack))
                elif name in _EXT_OPS:
                    refs.append(_UNRESOLVED)
                _apply_stack_effect(stack, name)
    except _DECODE_ERRORS as exc:
        reason = f"malformed or truncated pickle ({exc})"
        raise PickleScanError(reason, source=source, offset=f.tell()) from exc
    return refs


def _top_string(stack: list[_Slot]) -> _Value:
    top = stack[-1] if stack else None
    return top if isinstance(top, str) else None


def _stack_global(stack: list[_Slot]) -> GlobalRef:
    module, name = stack[-2:] if len(stack) >= 2 else (None, None)
    if isinstance(module, str) and isinstance(name, str):
        return GlobalRef(module, name)
    return _UNRESOLVED


def _apply_stack_effect(stack: list[_Slot], opname: str) -> None:
    # A malformed pickle may pop more than was pushed; the unpickler would
    # fail at that point, so an emptied stack is as good as any.
    pops_to_mark, n_pop, pushes = _STACK_EFFECTS[opname]
    if pops_to_mark:
        while stack and stack.pop() is not _MARK:
            pass
    if n_pop:
        del stack[-n_pop:]
    stack.extend(pushes)


def _read_global_lines(f: BinaryIO, pos: int | None) -> GlobalRef:
    # genops undoes backslash escapes and joins module and name with a space,
    # so its argument can differ from what the unpickler imports. Re-read the
    # two raw lines, which the unpickler takes verbatim.
    if pos is None:
        return _UNRESOLVED
    resume = f.tell()
    f.seek(pos + 1)
    module, name = f.readline(), f.readline()
    f.seek(resume)
    return GlobalRef(module[:-1].decode("utf-8"), name[:-1].decode("utf-8"))
