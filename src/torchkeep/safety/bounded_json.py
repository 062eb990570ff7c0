"""JSON read from files, with bounds: size, nesting depth, strict UTF-8, no duplicate keys.

``json.loads`` recurses once per nesting level, so a header of 100 000 ``[`` ends in a
``RecursionError``; it also accepts ``NaN``, lone surrogates and duplicate keys (the last one
wins, silently). Every JSON document torchkeep reads from a file goes through :func:`loads`,
which refuses all of these with a :class:`~torchkeep.errors.CorruptFileError` naming the file
and the document. The nesting depth is measured before parsing, without recursion.
"""

from __future__ import annotations

import array
import itertools
import json
import math
import re
from typing import Any

from torchkeep.errors import CorruptFileError

MAX_DEPTH = 64
MAX_BYTES = 256 << 20

# A JSON string, unrolled so the regex engine does not backtrack; strings may hold brackets.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# An escaped UTF-16 surrogate: only then can a parsed string hold a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Brackets only, then each as a signed step: opening +1, closing -1 (0xFF as a signed byte).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
# Longer runs of brackets are summed by numpy, imported only then (it costs ~0.1 s).
_VECTORISED = 1 << 20


class _Refused(ValueError):
    """A problem found while parsing, reported as a CorruptFileError by :func:`loads`."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key[:100]!r} appears twice in one object")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _integer(text: str) -> int | float:
    # "-0" is a float to strict parsers (serde_json reads it as -0.0): never a size or index.
    return -0.0 if text == "-0" else int(text)


def depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data``, brackets in strings ignored.

    A linear scan (vectorised), never a recursion, so any depth is measured safely.
    """
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = brackets.translate(_STEPS)
    if len(steps) < _VECTORISED:
        return max(0, max(itertools.accumulate(array.array("b", steps))))
    import numpy as np

    return max(0, int(np.cumsum(np.frombuffer(steps, dtype=np.int8), dtype=np.int64).max()))


def loads(
    data: bytes | str,
    *,
    path: str,
    what: str,
    max_depth: int = MAX_DEPTH,
    max_bytes: int | None = MAX_BYTES,
) -> Any:
    """Parse one JSON document read from a file, refusing anything a strict parser would.

    Args:
        data: the document: bytes (strict UTF-8, no byte-order mark) or text.
        path: the file it comes from, for messages.
        what: what the document is (``"safetensors header"``, ``"index.json"``), for messages.
        max_depth: the deepest nesting of arrays and objects accepted.
        max_bytes: the longest document accepted (``None``: no limit).

    Returns:
        The parsed value.

    Raises:
        CorruptFileError: the document is too large or too deep, not UTF-8, not JSON, holds
            a duplicate key, ``NaN``/``Infinity``, an out-of-range number or a lone surrogate.
    """

    def refuse(problem: str) -> CorruptFileError:
        return CorruptFileError(f"the {what} of {path!r} is not valid: {problem}")

    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise refuse(f"it holds a character that is not valid UTF-8 ({exc.reason})") from exc
    else:
        raw = bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise refuse(f"it is {len(raw)} bytes, over the limit of {max_bytes}")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise refuse("it starts with a byte-order mark; JSON must be plain UTF-8")
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise refuse(f"byte {exc.start} is not valid UTF-8 ({exc.reason})") from exc
    found = depth(raw)
    if found > max_depth:
        raise refuse(f"it nests {found} levels deep; at most {max_depth} are accepted")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_constant,
            parse_float=_finite,
            parse_int=_integer,
        )
    except _Refused as exc:
        raise refuse(str(exc)) from exc
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, and ints longer than Python's digit limit.
        raise refuse(f"it is not valid JSON: {exc}") from exc
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise refuse("it holds a lone UTF-16 surrogate escape") from exc
    return value
