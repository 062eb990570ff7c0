"""One conversion, at the readers' boundary, of whatever a parser raises into a typed error.

Parsers of hostile bytes fail in many ways (``struct.error``, ``KeyError``, ``RecursionError``,
``zipfile.BadZipFile``, torch's ``RuntimeError`` and ``CheckpointException``, ...). Callers
should see one kind: a :class:`~torchkeep.errors.TorchkeepError` naming the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptFileError,
    FileAccessError,
    ModelRebuildError,
    TorchkeepError,
)

# Not about the file's bytes and not the file's fault: memory exhausted, an interrupt.
_PASS = (TorchkeepError, MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit)


def os_error(exc: OSError, path: object) -> TorchkeepError:
    """The typed form of an operating-system error met while reading ``path``."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    message = f"cannot read {str(path)!r}{where}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(f"{message}; it disappeared while being read")
    if isinstance(exc, PermissionError):
        return FileAccessError(exc.errno, f"{message}; check the file's permissions")
    return CheckpointReadError(
        exc.errno, f"{message}; the disk or file system failed, not the file"
    )


@contextlib.contextmanager
def reading(path: object) -> Iterator[None]:
    """Re-raise anything a parser raises as a typed error naming the file.

    Raises:
        CorruptFileError: ``cannot read '<path>': <what went wrong>``, from the original.
        CheckpointNotFoundError, FileAccessError, CheckpointReadError: the operating system's
            own errors (gone, not permitted, an I/O error), which say nothing of the bytes.
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
            raise os_error(exc, path) from exc  # an I/O failure, not malformed data
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CorruptFileError(
            f"cannot read {str(path)!r}: {type(exc).__name__}"
            + (f": {detail}" if detail else "")
            + " (the file is damaged or was not written by a supported tool)"
        ) from exc
