"""Deprecated location: this module is now :mod:`torchkeep.training.manager`.

The verbs and classes are on the package itself (``import torchkeep as tk``); importing them
from here still works for this release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

from torchkeep._common import moved
from torchkeep.training.manager import *  # noqa: F403

__getattr__ = moved(__name__, "torchkeep.training.manager")
