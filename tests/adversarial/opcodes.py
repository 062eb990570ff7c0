"""A tiny pickle assembler: every byte of a hostile pickle is written on purpose.

Using ``pickle.dumps`` would let the pickler choose opcodes, memo slots and framing; these
payloads need exact control (a GLOBAL with a dotted name, a BUILD on a class, a memo index of
2**32 - 1), so they are spelled opcode by opcode.
"""

from __future__ import annotations

import pickle
import struct


class Asm:
    """Appends opcodes to a byte string; each method returns ``self`` so calls chain."""

    def __init__(self, proto: int | None = 2) -> None:
        self.out = bytearray()
        if proto is not None and proto >= 2:
            self.out += pickle.PROTO + bytes([proto])

    def raw(self, data: bytes) -> Asm:
        self.out += data
        return self

    def bytes(self) -> bytes:
        return bytes(self.out)

    # ---------------------------------------------------------------- values
    def none(self) -> Asm:
        return self.raw(pickle.NONE)

    def bool(self, value: bool) -> Asm:
        return self.raw(pickle.NEWTRUE if value else pickle.NEWFALSE)

    def int(self, value: int) -> Asm:
        if 0 <= value < 256:
            return self.raw(pickle.BININT1 + bytes([value]))
        if -(2**31) <= value < 2**31:
            return self.raw(pickle.BININT + struct.pack("<i", value))
        body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return self.raw(pickle.LONG1 + bytes([len(body)]) + body)

    def float(self, value: float) -> Asm:
        return self.raw(pickle.BINFLOAT + struct.pack(">d", value))

    def str(self, text: str) -> Asm:
        data = text.encode("utf-8", "surrogatepass")
        return self.raw(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

    def binbytes(self, data: bytes) -> Asm:
        return self.raw(pickle.BINBYTES + struct.pack("<I", len(data)) + data)

    def value(self, obj: object) -> Asm:
        """Push a plain value: None, bool, int, float, str, bytes, or tuples/lists/dicts of them."""
        if obj is None:
            return self.none()
        if isinstance(obj, bool):
            return self.bool(obj)
        if isinstance(obj, int):
            return self.int(obj)
        if isinstance(obj, float):
            return self.float(obj)
        if isinstance(obj, str):
            return self.str(obj)
        if isinstance(obj, bytes):
            return self.binbytes(obj)
        if isinstance(obj, tuple):
            return self.tuple(*obj)
        if isinstance(obj, list):
            self.raw(pickle.EMPTY_LIST)
            if obj:
                self.mark()
                for item in obj:
                    self.value(item)
                self.raw(pickle.APPENDS)
            return self
        if isinstance(obj, dict):
            self.raw(pickle.EMPTY_DICT)
            if obj:
                self.mark()
                for key, item in obj.items():
                    self.value(key).value(item)
                self.raw(pickle.SETITEMS)
            return self
        raise TypeError(f"cannot assemble {type(obj).__name__}")

    def tuple(self, *items: object) -> Asm:
        """Push a tuple of plain values (``Asm`` items are spliced in as already-built code)."""
        self.mark()
        for item in items:
            if isinstance(item, Asm):
                self.raw(item.bytes())
            else:
                self.value(item)
        return self.raw(pickle.TUPLE)

    # ---------------------------------------------------------------- structure
    def mark(self) -> Asm:
        return self.raw(pickle.MARK)

    def pop(self) -> Asm:
        return self.raw(pickle.POP)

    def put(self, index: int) -> Asm:
        if index < 256:
            return self.raw(pickle.BINPUT + bytes([index]))
        return self.raw(pickle.LONG_BINPUT + struct.pack("<I", index))

    def get(self, index: int) -> Asm:
        if index < 256:
            return self.raw(pickle.BINGET + bytes([index]))
        return self.raw(pickle.LONG_BINGET + struct.pack("<I", index))

    def stop(self) -> Asm:
        return self.raw(pickle.STOP)

    # ---------------------------------------------------------------- globals and calls
    def global_(self, module: str, name: str) -> Asm:
        return self.raw(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def stack_global(self, module: str, name: str) -> Asm:
        return self.str(module).str(name).raw(pickle.STACK_GLOBAL)

    def reduce(self) -> Asm:
        return self.raw(pickle.REDUCE)

    def build(self) -> Asm:
        return self.raw(pickle.BUILD)

    def call(self, module: str, name: str, *args: object) -> Asm:
        """``module.name(*args)`` through GLOBAL + TUPLE + REDUCE."""
        return self.global_(module, name).tuple(*args).reduce()

    def newobj(self) -> Asm:
        return self.raw(pickle.NEWOBJ)

    def newobj_ex(self) -> Asm:
        return self.raw(pickle.NEWOBJ_EX)

    def ext(self, code: int) -> Asm:
        if code < 256:
            return self.raw(pickle.EXT1 + bytes([code]))
        if code < 65536:
            return self.raw(pickle.EXT2 + struct.pack("<H", code))
        return self.raw(pickle.EXT4 + struct.pack("<i", code))

    def binpersid(self) -> Asm:
        return self.raw(pickle.BINPERSID)

    def persid(self, text: str) -> Asm:
        return self.raw(pickle.PERSID + text.encode() + b"\n")


def finish(asm: Asm) -> bytes:
    """The assembled pickle with its STOP."""
    return asm.stop().bytes()
