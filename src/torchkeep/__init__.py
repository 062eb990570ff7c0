"""torchkeep: save, load, inspect, convert and resume PyTorch models, correctly and safely.

>>> import torchkeep as tk
>>> tk.save(model, "model.safetensors")
>>> report = tk.load(model, "any-checkpoint.pt")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from torchkeep.errors import CheckpointNotFoundError as CheckpointNotFoundError
from torchkeep.errors import CheckpointReadError as CheckpointReadError
from torchkeep.errors import CheckpointWriteError as CheckpointWriteError
from torchkeep.errors import ChecksumError as ChecksumError
from torchkeep.errors import CorruptFileError as CorruptFileError
from torchkeep.errors import DeviceError as DeviceError
from torchkeep.errors import DownloadError as DownloadError
from torchkeep.errors import EntryNotFoundError as EntryNotFoundError
from torchkeep.errors import ExportError as ExportError
from torchkeep.errors import FileAccessError as FileAccessError
from torchkeep.errors import InvalidArgumentError as InvalidArgumentError
from torchkeep.errors import InvalidStateError as InvalidStateError
from torchkeep.errors import KeyMismatchError as KeyMismatchError
from torchkeep.errors import ManagerClosedError as ManagerClosedError
from torchkeep.errors import MissingDependencyError as MissingDependencyError
from torchkeep.errors import ModelRebuildError as ModelRebuildError
from torchkeep.errors import TorchkeepError as TorchkeepError
from torchkeep.errors import TorchkeepWarning as TorchkeepWarning
from torchkeep.errors import UnknownFormatError as UnknownFormatError
from torchkeep.errors import UnsafeFileError as UnsafeFileError
from torchkeep.errors import UnsupportedTensorError as UnsupportedTensorError
from torchkeep.errors import UnsupportedValueError as UnsupportedValueError

# Everything else is imported on first use, so `import torchkeep` (and the command line,
# which needs torch for few commands) does not import torch. The names are the same either way.
_LAZY = {
    "TensorInfo": "torchkeep._facts",
    "ExportResult": "torchkeep.models.export",
    "export": "torchkeep.models.export",
    "load_for_inference": "torchkeep.models.model",
    "load_model": "torchkeep.models.model",
    "record_init": "torchkeep.models.model",
    "save_model": "torchkeep.models.model",
    "ModuleEntry": "torchkeep._facts",
    "ConvertResult": "torchkeep.tools.convert",
    "convert": "torchkeep.tools.convert",
    "DiffReport": "torchkeep.tools.diff",
    "diff": "torchkeep.tools.diff",
    "report": "torchkeep.tools.report",
    "Problem": "torchkeep.tools.verify",
    "VerifyResult": "torchkeep.tools.verify",
    "verify": "torchkeep.tools.verify",
    "load_checkpoint": "torchkeep.training.checkpoint",
    "save_checkpoint": "torchkeep.training.checkpoint",
    "ResumableLoader": "torchkeep.training.data",
    "CheckpointManager": "torchkeep.training.manager",
    "AnyOf": "torchkeep.training.retention",
    "KeepBest": "torchkeep.training.retention",
    "KeepEvery": "torchkeep.training.retention",
    "KeepLast": "torchkeep.training.retention",
    "inspect": "torchkeep.weights.api",
    "load": "torchkeep.weights.api",
    "load_state_dict": "torchkeep.weights.api",
    "save": "torchkeep.weights.api",
    "CheckpointInfo": "torchkeep.weights.info",
    "ModuleInfo": "torchkeep.weights.module_info",
    "LoadReport": "torchkeep.weights.report",
    "ShapeMismatch": "torchkeep.weights.report",
}

if TYPE_CHECKING:
    from torchkeep._facts import ModuleEntry as ModuleEntry
    from torchkeep._facts import TensorInfo as TensorInfo
    from torchkeep.models.export import ExportResult as ExportResult
    from torchkeep.models.export import export as export
    from torchkeep.models.model import load_for_inference as load_for_inference
    from torchkeep.models.model import load_model as load_model
    from torchkeep.models.model import record_init as record_init
    from torchkeep.models.model import save_model as save_model
    from torchkeep.tools.convert import ConvertResult as ConvertResult
    from torchkeep.tools.convert import convert as convert
    from torchkeep.tools.diff import DiffReport as DiffReport
    from torchkeep.tools.diff import diff as diff
    from torchkeep.tools.report import report as report
    from torchkeep.tools.verify import Problem as Problem
    from torchkeep.tools.verify import VerifyResult as VerifyResult
    from torchkeep.tools.verify import verify as verify
    from torchkeep.training.checkpoint import load_checkpoint as load_checkpoint
    from torchkeep.training.checkpoint import save_checkpoint as save_checkpoint
    from torchkeep.training.data import ResumableLoader as ResumableLoader
    from torchkeep.training.manager import CheckpointManager as CheckpointManager
    from torchkeep.training.retention import AnyOf as AnyOf
    from torchkeep.training.retention import KeepBest as KeepBest
    from torchkeep.training.retention import KeepEvery as KeepEvery
    from torchkeep.training.retention import KeepLast as KeepLast
    from torchkeep.weights.api import inspect as inspect
    from torchkeep.weights.api import load as load
    from torchkeep.weights.api import load_state_dict as load_state_dict
    from torchkeep.weights.api import save as save
    from torchkeep.weights.info import CheckpointInfo as CheckpointInfo
    from torchkeep.weights.module_info import ModuleInfo as ModuleInfo
    from torchkeep.weights.report import LoadReport as LoadReport
    from torchkeep.weights.report import ShapeMismatch as ShapeMismatch

__version__ = "0.1.0"

__all__ = [
    "AnyOf",
    "CheckpointManager",
    "ResumableLoader",
    "CheckpointWriteError",
    "ConvertResult",
    "DiffReport",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "UnsupportedValueError",
    "load_checkpoint",
    "save_checkpoint",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "ChecksumError",
    "CorruptFileError",
    "DeviceError",
    "DownloadError",
    "EntryNotFoundError",
    "ExportError",
    "ExportResult",
    "FileAccessError",
    "InvalidArgumentError",
    "InvalidStateError",
    "KeyMismatchError",
    "LoadReport",
    "ManagerClosedError",
    "MissingDependencyError",
    "ModelRebuildError",
    "ModuleEntry",
    "ModuleInfo",
    "Problem",
    "ShapeMismatch",
    "TensorInfo",
    "TorchkeepError",
    "TorchkeepWarning",
    "VerifyResult",
    "UnknownFormatError",
    "UnsafeFileError",
    "UnsupportedTensorError",
    "__version__",
    "convert",
    "diff",
    "export",
    "inspect",
    "load",
    "load_for_inference",
    "load_model",
    "load_state_dict",
    "record_init",
    "report",
    "save",
    "save_model",
    "verify",
]

# Modules that moved into subpackages; reaching them here still works (with a warning).
_MOVED = ("api", "checkpoint", "manager", "retention")


# The trainer integrations, each importing its framework (an optional extra) only when used:
# ``Trainer(plugins=[tk.lightning.CheckpointIO()])``.
_INTEGRATIONS = ("lightning", "transformers", "accelerate")


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    if name in _MOVED:
        return importlib.import_module(f"torchkeep.{name}")
    if name in _INTEGRATIONS:
        return importlib.import_module(f"torchkeep.integrations.{name}")
    raise AttributeError(f"module 'torchkeep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
