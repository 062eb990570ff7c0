"""A pickle machine that decides, opcode by opcode, what a pickle may do.

``pickle.Unpickler`` with ``find_class`` overridden limits which names a pickle can reach, not
what it does with them: BUILD sets attributes on whatever is on the stack (classes included),
NEWOBJ_EX passes keyword arguments to C constructors, REDUCE calls any allowed callable with any
arguments. This machine reads every opcode itself and hands the risky ones (globals, calls,
object creation, BUILD, persistent ids) to a :class:`Rules` object that checks them; containers
may only be filled when the machine built them itself, and work and memory are bounded
(:class:`Limits`). Nothing in this module imports, calls or sets anything on its own.
"""

from __future__ import annotations

import codecs
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torchkeep.errors import (
    CorruptFileError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedTensorError,
)


@dataclass(frozen=True)
class Limits:
    """Bounds on the work one pickle may ask for; exceeding one is a typed refusal.

    Attributes:
        max_ops: opcodes executed.
        max_depth: nesting of containers and tuples (a deeper value would crash later code).
        max_memo: entries in the memo.
    """

    max_ops: int = 20_000_000
    max_depth: int = 200
    max_memo: int = 5_000_000


DEFAULT_LIMITS = Limits()


class Rules(Protocol):
    """What the machine asks before any opcode that could reach code."""

    def resolve(self, module: str, name: str) -> Any:
        """The object a GLOBAL stands for (real when allowed, an inert stub otherwise)."""

    def call(self, func: Any, args: tuple[Any, ...]) -> Any:
        """REDUCE: ``func(*args)`` when ``func`` is an allowed callable and ``args`` check out."""

    def new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """NEWOBJ / NEWOBJ_EX / OBJ / INST: a new instance of an allowed class."""

    def build(self, obj: Any, state: Any) -> None:
        """BUILD: give an instance this machine created its pickled state."""

    def container(self, obj: Any, kind: str) -> bool:
        """Whether ``obj`` may be filled as a ``"list"``, ``"dict"`` or ``"set"`` (APPEND,
        SETITEM, ADDITEMS); it must also have been created by this machine."""


class Refusal(Exception):
    """Raised by the rules: an opcode's operands are not acceptable (the machine adds where).

    Attributes:
        corrupt: the data is inconsistent (a damaged file) rather than hostile.
        plain: the reason already says what the pickle does ("calls ...").
    """

    def __init__(self, reason: str, *, corrupt: bool = False, plain: bool = False) -> None:
        super().__init__(reason)
        self.corrupt = corrupt
        self.plain = plain


# What an allowed call may raise on bad operands that its checker let through; it becomes a
# CorruptFileError naming the file and byte.
_DATA_ERRORS = (
    ValueError,
    TypeError,
    RuntimeError,
    OverflowError,
    IndexError,
    KeyError,
    AttributeError,
    RecursionError,
    struct.error,
)
_ASCII_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


class Machine:
    """Run one pickle from ``buf[start:]`` under ``rules``.

    Args:
        buf: the bytes (``bytes``, ``memoryview`` or ``mmap``).
        start: where the pickle starts.
        rules: the checks for globals, calls, object creation and BUILD.
        persistent_load: what BINPERSID / PERSID ids resolve to (``None``: refused).
        label: the file (and member) named in errors.
        limits: bounds on work and memory.
    """

    def __init__(
        self,
        buf: Any,
        start: int,
        *,
        rules: Rules,
        persistent_load: Callable[[Any], Any] | None,
        label: str,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.buf = buf
        self.pos = start
        self.end = len(buf)
        self.rules = rules
        self.persistent_load = persistent_load
        self.label = label
        self.limits = limits
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        # Objects this machine created, kept alive so their ids stay theirs; only these may be
        # filled by APPEND / SETITEM / ADDITEMS or receive BUILD state.
        self.owned: dict[int, Any] = {}
        self.depth: dict[int, int] = {}
        self.ops = 0

    # -- errors ---------------------------------------------------------------------------

    def corrupt(self, reason: str) -> CorruptFileError:
        return CorruptFileError(
            f"{self.label!r} holds a damaged pickle: {reason} (at byte {self.pos})"
        )

    def unbuildable(self, exc: NotImplementedError) -> UnsupportedTensorError:
        torch = sys.modules.get("torch")
        hint = ""
        if torch is not None and torch.are_deterministic_algorithms_enabled():
            hint = (
                "; torch.use_deterministic_algorithms(True) makes torch fill every new tensor, "
                "which it cannot do for every dtype: load with it off, or set "
                "torch.utils.deterministic.fill_uninitialized_memory = False while loading"
            )
        return UnsupportedTensorError(
            f"{self.label!r} holds a tensor this torch cannot build here: "
            f"NotImplementedError: {exc} (at byte {self.pos}; torch.load fails the same "
            f"way){hint}"
        )

    def unsafe(self, reason: str) -> UnsafeFileError:
        return UnsafeFileError(
            f"refusing {self.label!r}: its pickle {reason} (at byte {self.pos}); nothing was "
            "executed. Do not load this file with torch.load unless you wrote it yourself.",
            path=self.label,
        )

    # -- reading --------------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        pos = self.pos
        if n < 0 or pos + n > self.end:
            raise self.corrupt(f"it ends early (wanted {n} more bytes)")
        self.pos = pos + n
        return self.buf[pos : pos + n]  # type: ignore[no-any-return]  # bytes or mmap: bytes

    def readline(self) -> bytes:
        cut = self.buf.find(b"\n", self.pos, min(self.end, self.pos + (1 << 20)))
        if cut < 0:
            raise self.corrupt("a text opcode has no end of line")
        data = self.buf[self.pos : cut]
        self.pos = cut + 1
        return data  # type: ignore[no-any-return]

    def unpack(self, fmt: str, size: int) -> Any:
        pos = self.pos
        if pos + size > self.end:
            raise self.corrupt(f"it ends early (wanted {size} more bytes)")
        self.pos = pos + size
        return struct.unpack_from(fmt, self.buf, pos)[0]

    # -- stack ----------------------------------------------------------------------------

    def push(self, value: Any) -> None:
        # A method, not a bound self.stack.append taken early: pop_mark replaces self.stack.
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack:
            raise self.corrupt("it pops an empty stack")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise self.corrupt("it needs a value on an empty stack")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        items = self.stack
        if not self.metastack:
            raise self.corrupt("it closes a MARK that was never opened")
        self.stack = self.metastack.pop()
        return items

    def own(self, obj: Any, children: Any = ()) -> Any:
        """Record ``obj`` as made here, with a nesting depth one more than its deepest child."""
        depths = self.depth
        depth = 1
        for child in children:
            inner = depths.get(id(child))
            if inner is not None and inner >= depth:
                depth = inner + 1
        if depth > self.limits.max_depth:
            raise self.unsafe(f"nests values more than {self.limits.max_depth} levels deep")
        self.owned[id(obj)] = obj
        depths[id(obj)] = depth
        return obj

    def deepen(self, container: Any, item: Any) -> None:
        depth = max(self.depth.get(id(container), 1), 1 + self.depth.get(id(item), 0))
        if depth > self.limits.max_depth:
            raise self.unsafe(f"nests values more than {self.limits.max_depth} levels deep")
        self.depth[id(container)] = depth

    def fillable(self, obj: Any, kind: str, opcode: str) -> None:
        if id(obj) not in self.owned:  # owned objects stay alive, so an id is theirs alone
            raise self.unsafe(f"uses {opcode} on an object it did not build ({_kind(obj)})")
        if not self.rules.container(obj, kind):
            raise self.unsafe(f"uses {opcode} on {_kind(obj)}, which is not a {kind}")

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> tuple[Any, int]:
        """Execute up to STOP; return the value and the position just after STOP.

        Raises:
            UnsafeFileError: an opcode asks for something the rules refuse, or a limit is hit.
            CorruptFileError: the pickle is malformed, or its values are inconsistent.
        """
        try:
            return self._run()
        except (UnsafeFileError, CorruptFileError):
            raise
        except Refusal as exc:
            if exc.corrupt:
                raise self.corrupt(str(exc)) from None
            raise self.unsafe(str(exc)) from None
        except NotImplementedError as exc:
            # torch itself cannot build a tensor the file describes, here: not damage.
            raise self.unbuildable(exc) from exc
        except _DATA_ERRORS as exc:
            if isinstance(exc, TorchkeepError):
                raise
            raise self.corrupt(f"{type(exc).__name__}: {exc}") from exc
        except MemoryError as exc:
            raise self.unsafe("asks for more memory than is available") from exc

    def _run(self) -> tuple[Any, int]:
        handlers = _HANDLERS
        max_ops = self.limits.max_ops
        while True:
            if self.pos >= self.end:
                raise self.corrupt("it ends without a STOP opcode")
            code = self.buf[self.pos]
            self.pos += 1
            self.ops += 1
            if self.ops > max_ops:
                raise self.unsafe(f"runs more than {max_ops:,} opcodes")
            if code == 0x2E:  # STOP
                value = self.pop()
                return value, self.pos
            handler = handlers.get(code)
            if handler is None:
                self.pos -= 1
                raise self.corrupt(f"opcode {bytes([code])!r} is not one torchkeep accepts")
            handler(self)

    # -- opcodes --------------------------------------------------------------------------

    def op_proto(self) -> None:
        proto = self.read(1)[0]
        if proto > 5:
            raise self.corrupt(f"pickle protocol {proto} is unknown")

    def op_frame(self) -> None:
        self.read(8)  # frames only group opcodes; the data follows inline

    def op_mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_pop_mark(self) -> None:
        self.pop_mark()

    def op_dup(self) -> None:
        self.push(self.top())

    def op_none(self) -> None:
        self.push(None)

    def op_true(self) -> None:
        self.push(True)

    def op_false(self) -> None:
        self.push(False)

    def op_int(self) -> None:
        line = self.readline()
        if line == b"01":
            self.push(True)
        elif line == b"00":
            self.push(False)
        else:
            self.push(self.parse_int(line))

    def op_long(self) -> None:
        line = self.readline()
        self.push(self.parse_int(line[:-1] if line.endswith(b"L") else line))

    def parse_int(self, text: bytes) -> int:
        if len(text) > 4000:
            raise self.corrupt("a text integer is too long")
        try:
            return int(text, 0) if text.startswith((b"0x", b"0X")) else int(text)
        except ValueError as exc:
            raise self.corrupt(f"{text[:20]!r} is not an integer") from exc

    def op_binint(self) -> None:
        self.push(self.unpack("<i", 4))

    def op_binint1(self) -> None:
        self.push(self.read(1)[0])

    def op_binint2(self) -> None:
        self.push(self.unpack("<H", 2))

    def op_long1(self) -> None:
        n = self.read(1)[0]
        self.push(int.from_bytes(self.read(n), "little", signed=True))

    def op_long4(self) -> None:
        n = self.unpack("<i", 4)
        if n < 0 or n > 1 << 16:
            raise self.corrupt(f"a LONG4 of {n} bytes")
        self.push(int.from_bytes(self.read(n), "little", signed=True))

    def op_float(self) -> None:
        line = self.readline()
        try:
            self.push(float(line))
        except ValueError as exc:
            raise self.corrupt(f"{line[:20]!r} is not a float") from exc

    def op_binfloat(self) -> None:
        self.push(self.unpack(">d", 8))

    def text(self, data: bytes) -> Any:
        # Python 2 strings: text when they decode, else bytes (numpy and torch files use both).
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            return data

    def op_string(self) -> None:
        line = self.readline()
        if len(line) < 2 or line[0] != line[-1] or line[0] not in b"'\"":
            raise self.corrupt("a STRING opcode is not quoted")
        try:
            value = codecs.escape_decode(line[1:-1])[0]
        except ValueError as exc:
            raise self.corrupt("a STRING opcode has a bad escape") from exc
        self.push(self.text(value))

    def op_binstring(self) -> None:
        n = self.unpack("<i", 4)
        self.push(self.text(self.read(n)))

    def op_short_binstring(self) -> None:
        self.push(self.text(self.read(self.read(1)[0])))

    def decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise self.corrupt("a string is not valid UTF-8") from exc

    def op_unicode(self) -> None:
        try:
            self.push(self.readline().decode("raw-unicode-escape"))
        except UnicodeDecodeError as exc:
            raise self.corrupt("a UNICODE opcode is not valid") from exc

    def op_binunicode(self) -> None:
        self.push(self.decode(self.read(self.unpack("<I", 4))))

    def op_short_binunicode(self) -> None:
        self.push(self.decode(self.read(self.read(1)[0])))

    def op_binunicode8(self) -> None:
        self.push(self.decode(self.read(self.unpack("<Q", 8))))

    def op_binbytes(self) -> None:
        self.push(self.read(self.unpack("<I", 4)))

    def op_short_binbytes(self) -> None:
        self.push(self.read(self.read(1)[0]))

    def op_binbytes8(self) -> None:
        self.push(self.read(self.unpack("<Q", 8)))

    def op_bytearray8(self) -> None:
        self.push(self.own(bytearray(self.read(self.unpack("<Q", 8)))))

    def op_empty_list(self) -> None:
        self.push(self.own([]))

    def op_empty_dict(self) -> None:
        self.push(self.own({}))

    def op_empty_set(self) -> None:
        self.push(self.own(set()))

    def op_empty_tuple(self) -> None:
        self.push(())

    def op_list(self) -> None:
        items = self.pop_mark()
        self.push(self.own(items, items))

    def op_tuple(self) -> None:
        self.push(self.tuple(self.pop_mark()))

    def tuple(self, items: list[Any]) -> tuple[Any, ...]:
        value = tuple(items)
        self.own(value, items)
        return value

    def op_tuple1(self) -> None:
        self.push(self.tuple([self.pop()]))

    def op_tuple2(self) -> None:
        b = self.pop()
        a = self.pop()
        self.push(self.tuple([a, b]))

    def op_tuple3(self) -> None:
        c = self.pop()
        b = self.pop()
        a = self.pop()
        self.push(self.tuple([a, b, c]))

    def op_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise self.corrupt("DICT has an odd number of items")
        value: dict[Any, Any] = {}
        self.setitems(value, items)
        self.push(self.own(value, items))

    def setitems(self, target: Any, items: list[Any]) -> None:
        for i in range(0, len(items), 2):
            key = items[i]
            try:
                target[key] = items[i + 1]
            except TypeError as exc:
                raise self.corrupt(f"a dict key of type {_kind(key)} cannot be hashed") from exc

    def op_frozenset(self) -> None:
        items = self.pop_mark()
        try:
            value = frozenset(items)
        except TypeError as exc:
            raise self.corrupt("a frozenset item cannot be hashed") from exc
        self.push(self.own(value, items))

    def op_append(self) -> None:
        item = self.pop()
        target = self.top()
        self.fillable(target, "list", "APPEND")
        self.deepen(target, item)
        target.append(item)

    def op_appends(self) -> None:
        items = self.pop_mark()
        target = self.top()
        self.fillable(target, "list", "APPENDS")
        for item in items:
            self.deepen(target, item)
        target.extend(items)

    def op_setitem(self) -> None:
        value = self.pop()
        key = self.pop()
        target = self.top()
        self.fillable(target, "dict", "SETITEM")
        self.deepen(target, value)
        self.setitems(target, [key, value])

    def op_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise self.corrupt("SETITEMS has an odd number of items")
        target = self.top()
        self.fillable(target, "dict", "SETITEMS")
        for item in items[1::2]:
            self.deepen(target, item)
        self.setitems(target, items)

    def op_additems(self) -> None:
        items = self.pop_mark()
        target = self.top()
        self.fillable(target, "set", "ADDITEMS")
        try:
            target.update(items)
        except TypeError as exc:
            raise self.corrupt("a set item cannot be hashed") from exc

    # memo

    def put(self, index: int) -> None:
        if index not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise self.unsafe(f"stores more than {self.limits.max_memo:,} memo entries")
        self.memo[index] = self.top()

    def get(self, index: int) -> None:
        try:
            self.push(self.memo[index])
        except KeyError:
            raise self.corrupt(f"memo entry {index} is read before it is written") from None

    def op_put(self) -> None:
        self.put(self.parse_int(self.readline()))

    def op_binput(self) -> None:
        self.put(self.read(1)[0])

    def op_long_binput(self) -> None:
        self.put(self.unpack("<I", 4))

    def op_memoize(self) -> None:
        self.put(len(self.memo))

    def op_get(self) -> None:
        self.get(self.parse_int(self.readline()))

    def op_binget(self) -> None:
        self.get(self.read(1)[0])

    def op_long_binget(self) -> None:
        self.get(self.unpack("<I", 4))

    # globals, calls, objects

    def global_name(self, module: Any, name: Any) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.unsafe("computes a global's name from values that are not strings")
        if not module or not name or not set(module + name) <= _ASCII_NAME:
            raise self.unsafe(f"names a global with unusual characters: {module!r} {name!r}")
        return self.rules.resolve(module, name)

    def op_global(self) -> None:
        module = self.readline().decode("utf-8", "replace")
        name = self.readline().decode("utf-8", "replace")
        self.push(self.global_name(module, name))

    def op_stack_global(self) -> None:
        name = self.pop()
        module = self.pop()
        self.push(self.global_name(module, name))

    def op_ext(self) -> None:
        raise self.unsafe("uses the copyreg extension registry (EXT1/EXT2/EXT4)")

    def op_reduce(self) -> None:
        args = self.pop()
        func = self.pop()
        if not isinstance(args, tuple):
            raise self.corrupt("REDUCE arguments are not a tuple")
        self.push(self.own(self.rules.call(func, args), args))

    def op_newobj(self) -> None:
        args = self.pop()
        cls = self.pop()
        if not isinstance(args, tuple):
            raise self.corrupt("NEWOBJ arguments are not a tuple")
        self.push(self.own(self.rules.new(cls, args, {}), args))

    def op_newobj_ex(self) -> None:
        kwargs = self.pop()
        args = self.pop()
        cls = self.pop()
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise self.corrupt("NEWOBJ_EX arguments are not a tuple and a dict")
        self.push(self.own(self.rules.new(cls, args, kwargs), (*args, *kwargs.values())))

    def op_obj(self) -> None:
        items = self.pop_mark()
        if not items:
            raise self.corrupt("OBJ without a class")
        cls, args = items[0], tuple(items[1:])
        self.push(self.own(self.rules.new(cls, args, {}), args))

    def op_inst(self) -> None:
        module = self.readline().decode("utf-8", "replace")
        name = self.readline().decode("utf-8", "replace")
        cls = self.global_name(module, name)
        args = tuple(self.pop_mark())
        self.push(self.own(self.rules.new(cls, args, {}), args))

    def op_build(self) -> None:
        state = self.pop()
        obj = self.top()
        if id(obj) not in self.owned:  # owned objects stay alive, so an id is theirs alone
            raise self.unsafe(f"sets the state of an object it did not build ({_kind(obj)})")
        self.deepen(obj, state)
        self.rules.build(obj, state)

    def op_binpersid(self) -> None:
        self.persistent(self.pop())

    def op_persid(self) -> None:
        self.persistent(self.readline().decode("ascii", "replace"))

    def persistent(self, pid: Any) -> None:
        if self.persistent_load is None:
            raise self.unsafe("refers to external objects (persistent ids) in a plain pickle")
        self.push(self.persistent_load(pid))

    def op_buffer(self) -> None:
        raise self.corrupt("out-of-band buffers (NEXT_BUFFER/READONLY_BUFFER) are not supported")


def _kind(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"the callable {getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


_OPCODES: dict[bytes, Callable[[Machine], None]] = {
    b"\x80": Machine.op_proto,
    b"\x95": Machine.op_frame,
    b"(": Machine.op_mark,
    b"0": Machine.op_pop,
    b"1": Machine.op_pop_mark,
    b"2": Machine.op_dup,
    b"N": Machine.op_none,
    b"\x88": Machine.op_true,
    b"\x89": Machine.op_false,
    b"I": Machine.op_int,
    b"L": Machine.op_long,
    b"J": Machine.op_binint,
    b"K": Machine.op_binint1,
    b"M": Machine.op_binint2,
    b"\x8a": Machine.op_long1,
    b"\x8b": Machine.op_long4,
    b"F": Machine.op_float,
    b"G": Machine.op_binfloat,
    b"S": Machine.op_string,
    b"T": Machine.op_binstring,
    b"U": Machine.op_short_binstring,
    b"V": Machine.op_unicode,
    b"X": Machine.op_binunicode,
    b"\x8c": Machine.op_short_binunicode,
    b"\x8d": Machine.op_binunicode8,
    b"B": Machine.op_binbytes,
    b"C": Machine.op_short_binbytes,
    b"\x8e": Machine.op_binbytes8,
    b"\x96": Machine.op_bytearray8,
    b"]": Machine.op_empty_list,
    b"}": Machine.op_empty_dict,
    b"\x8f": Machine.op_empty_set,
    b")": Machine.op_empty_tuple,
    b"l": Machine.op_list,
    b"t": Machine.op_tuple,
    b"\x85": Machine.op_tuple1,
    b"\x86": Machine.op_tuple2,
    b"\x87": Machine.op_tuple3,
    b"d": Machine.op_dict,
    b"\x91": Machine.op_frozenset,
    b"a": Machine.op_append,
    b"e": Machine.op_appends,
    b"s": Machine.op_setitem,
    b"u": Machine.op_setitems,
    b"\x90": Machine.op_additems,
    b"p": Machine.op_put,
    b"q": Machine.op_binput,
    b"r": Machine.op_long_binput,
    b"\x94": Machine.op_memoize,
    b"g": Machine.op_get,
    b"h": Machine.op_binget,
    b"j": Machine.op_long_binget,
    b"c": Machine.op_global,
    b"\x93": Machine.op_stack_global,
    b"\x82": Machine.op_ext,
    b"\x83": Machine.op_ext,
    b"\x84": Machine.op_ext,
    b"R": Machine.op_reduce,
    b"\x81": Machine.op_newobj,
    b"\x92": Machine.op_newobj_ex,
    b"o": Machine.op_obj,
    b"i": Machine.op_inst,
    b"b": Machine.op_build,
    b"Q": Machine.op_binpersid,
    b"P": Machine.op_persid,
    b"\x97": Machine.op_buffer,
    b"\x98": Machine.op_buffer,
}
_HANDLERS: dict[int, Callable[[Machine], None]] = {k[0]: v for k, v in _OPCODES.items()}
