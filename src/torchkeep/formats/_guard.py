"""One conversion, at the readers' boundary, of whatever a parser raises into a typed error.

Parsers of hostile bytes fail in many ways (``struct.error``, ``KeyError``, ``RecursionError``,
``zipfile.BadZipFile``, torch's ``RuntimeError`` and ``CheckpointException``, ...). Callers
should see one kind: a :class:`~torchkeep.errors.TorchkeepError` naming the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torchkeep.errors import CorruptFileError, ModelRebuildError, TorchkeepError

# Not about the file's bytes: a missing file, no permission, memory exhausted, an interrupt.
_PASS = (
    TorchkeepError,
    FileNotFoundError,
    PermissionError,
    MemoryError,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
)


@contextlib.contextmanager
def reading(path: object) -> Iterator[None]:
    """Re-raise anything but a torchkeep error (or a missing/forbidden file) as corrupt data.

    Raises:
        CorruptFileError: ``cannot read '<path>': <what went wrong>``, from the original.
    """
    try:
        yield
    except _PASS:
        raise
    except ImportError as exc:
        # A trusted pickle names a module this environment lacks: the bytes are fine.
        raise ModelRebuildError(
            f"cannot read {str(path)!r}: it needs {exc.name or 'a module'!r}, which cannot be "
            f"imported here ({exc}); install it, or read the file without trust=True, which "
            "turns unknown classes into inert stand-ins"
        ) from exc
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if isinstance(exc, OSError) and not isinstance(exc, IsADirectoryError | NotADirectoryError):
            raise  # an I/O failure, not malformed data
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CorruptFileError(
            f"cannot read {str(path)!r}: {type(exc).__name__}"
            + (f": {detail}" if detail else "")
            + " (the file is damaged or was not written by a supported tool)"
        ) from exc
