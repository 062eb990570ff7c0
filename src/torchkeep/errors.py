"""The errors torchkeep raises.

Every error derives from :class:`TorchkeepError` and from the nearest builtin exception, so
``except FileNotFoundError`` keeps working for callers that do not know torchkeep. Messages
name the file, the key or byte offset, and the fix.
"""

from __future__ import annotations

import pickle


class TorchkeepError(Exception):
    """Root of every error raised by torchkeep."""


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """The path does not exist, or a folder holds nothing torchkeep can load."""


class UnknownFormatError(TorchkeepError, ValueError):
    """The bytes of a file match no format torchkeep reads."""


class CorruptFileError(TorchkeepError, ValueError):
    """A file of a known format is empty, truncated, or its contents contradict its header."""


class ChecksumError(CorruptFileError):
    """A tensor's bytes do not match the checksum recorded when it was saved."""


class UnsafeFileError(TorchkeepError, pickle.UnpicklingError):
    """A pickle references globals outside the allowlist; nothing in it was executed.

    Attributes:
        path: the file.
        globals: the fully qualified names the pickle needs that are not allowed.
    """

    def __init__(self, message: str, *, path: str = "", globals: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.path = path
        self.globals = globals


class InvalidStateError(TorchkeepError, TypeError):
    """The object given to save holds no tensors, or is not what the call expects."""


class InvalidArgumentError(TorchkeepError, ValueError):
    """An argument has a value the call cannot use (a size, a suffix, a format name, a rule)."""


class EntryNotFoundError(TorchkeepError, KeyError):
    """The ``entry=`` asked for is not a tensor dict in the file; the message lists those there."""

    def __str__(self) -> str:
        # KeyError would repr() the message.
        return str(self.args[0]) if self.args else ""


class UnsupportedTensorError(TorchkeepError, TypeError):
    """A tensor of a kind (layout, dtype, quantization) the chosen format cannot hold, or
    that this torch cannot build here.

    The message names the formats that can hold it, or what to change.
    """


class DeviceError(TorchkeepError, RuntimeError):
    """A tensor cannot be placed on the requested device (for example CUDA is absent)."""


class MissingDependencyError(TorchkeepError, ImportError):
    """An optional package the call needs (fsspec, s3fs, ...) is not installed.

    The message names the package and how to install it.
    """


class ManagerClosedError(TorchkeepError, RuntimeError):
    """A :class:`~torchkeep.CheckpointManager` was asked to save after it was closed."""


class ModelRebuildError(TorchkeepError, ImportError):
    """A model cannot be rebuilt from a file: its class is missing, or it holds no model."""


class ExportError(TorchkeepError, RuntimeError):
    """A model could not be exported, or the optional exporter is not installed."""


class TorchkeepWarning(UserWarning):
    """A likely mistake that does not stop the operation (for example inference in train mode)."""


class UnsupportedValueError(TorchkeepError, TypeError):
    """A value in a training state cannot be stored without pickle.

    Attributes:
        path: where the value sits in the state (``extra.callback``).
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class CheckpointWriteError(TorchkeepError, OSError):
    """Writing a checkpoint failed (disk full, I/O error); nothing was committed."""


class CheckpointReadError(TorchkeepError, OSError):
    """Reading a file failed for a reason outside its bytes (an I/O error of the disk)."""


class FileAccessError(TorchkeepError, PermissionError):
    """A file or folder exists but may not be read or written (permissions)."""


class DownloadError(TorchkeepError, ConnectionError):
    """A download failed or stopped early; nothing was cached."""


class KeyMismatchError(TorchkeepError, KeyError):
    """A strict load found missing, unexpected or shape-mismatched keys.

    Attributes:
        report: the :class:`~torchkeep.LoadReport` of the attempted load (nothing was loaded),
            or None when there was nothing to compare (a checkpoint without the entry asked
            for, ``rename="by_position"`` on sides that do not line up).
    """

    def __init__(self, message: str, report: object) -> None:
        super().__init__(message)
        self.message = message
        self.report = report

    def __str__(self) -> str:
        # KeyError would repr() the message and turn the table into one quoted line.
        return self.message


__all__ = [
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "ChecksumError",
    "CorruptFileError",
    "DeviceError",
    "DownloadError",
    "EntryNotFoundError",
    "InvalidArgumentError",
    "InvalidStateError",
    "ExportError",
    "FileAccessError",
    "KeyMismatchError",
    "ManagerClosedError",
    "MissingDependencyError",
    "ModelRebuildError",
    "TorchkeepWarning",
    "TorchkeepError",
    "UnknownFormatError",
    "UnsafeFileError",
    "UnsupportedTensorError",
    "UnsupportedValueError",
]
