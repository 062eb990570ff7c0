"""Deprecated location: this module is now :mod:`torchkeep.training.retention`.

The verbs and classes are on the package itself (``import torchkeep as tk``); importing them
from here still works for this release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from torchkeep.training import retention as _moved
from torchkeep.training.retention import *  # noqa: F403

warnings.warn(
    "torchkeep.retention is now torchkeep.training.retention"
    "; import what you need from torchkeep itself",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
