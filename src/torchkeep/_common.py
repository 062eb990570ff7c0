"""Names every layer shares, in a module that imports nothing of torchkeep's.

File names that mark a committed checkpoint, the marker of temporary files, the path type the
verbs accept, byte sizes written as text, and the module inside training wrappers.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torchkeep.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike[str]

# A native checkpoint folder is committed when this manifest exists (written last).
MANIFEST = "checkpoint.json"
# The entry of a torchkeep .pt checkpoint (and of a native folder's description) that holds
# its own records: format, version, RNG states, metrics. Never model weights.
BOOKKEEPING = "__torchkeep__"
# A distributed (DCP) checkpoint folder is committed when this marker exists (written last).
DCP_MARKER = "torchkeep-dcp.json"
# Both: the files whose presence means "this folder is a complete checkpoint".
COMMIT_MARKERS = (MANIFEST, DCP_MARKER)
# Pickled side objects of a native checkpoint (read only with trust=True).
OBJECTS = "objects.pkl"
# In the names of temporary files and folders, written beside their destination.
TEMP_MARKER = ".tmp-torchkeep-"
# Suffixes that make a new file a torch zip file (torch.save's layout), for every writer.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt", ".tar")
SAFETENSORS_SUFFIX = ".safetensors"


def parse_size(size: int | str) -> int:
    """``"500MB"``, ``"2GB"``, ``"1GiB"`` or a byte count -> bytes.

    Raises:
        InvalidArgumentError: not a positive byte count or a size such as ``"2GB"``.
    """
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise InvalidArgumentError(
            f"a size is a byte count or text such as '500MB' or '2GB', got a "
            f"{type(size).__name__} {size!r}"
        )
    if isinstance(size, int):
        if size <= 0:
            raise InvalidArgumentError(f"shard size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*", size.lower())
    if not match:
        raise InvalidArgumentError(f"cannot read size {size!r}; write it like '500MB' or '2GB'")
    number, unit = float(match.group(1)), match.group(2) or "b"
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0]) if unit[0] != "b" else 0
    return int(number * base**power)


def group_by_size(sizes: Iterable[tuple[str, int]], limit: int | None) -> list[list[str]]:
    """Names grouped in order into runs of at most ``limit`` bytes (a bigger one alone).

    The one shard planner of every sharded writer; ``None`` puts everything in one group.
    An empty input gives no group.
    """
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if groups[-1] and limit is not None and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups if groups[0] else []


def moved(old: str, new: str) -> Callable[[str], Any]:
    """For a module's former place: warn that ``old`` is now ``new``, and return the
    ``__getattr__`` that hands out ``new``'s names (those ``import *`` did not bring)."""
    warnings.warn(
        f"{old} is now {new}; import what you need from torchkeep itself",
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)

    def forward(name: str) -> Any:
        return getattr(module, name)

    return forward


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DataParallel, DistributedDataParallel and ``torch.compile`` wrappers."""
    import torch  # already imported by whoever holds a module; this leaf stays torch-free

    while True:
        if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        else:
            return module


__all__ = [
    "BOOKKEEPING",
    "COMMIT_MARKERS",
    "DCP_MARKER",
    "MANIFEST",
    "OBJECTS",
    "SAFETENSORS_SUFFIX",
    "TEMP_MARKER",
    "TORCH_SUFFIXES",
    "group_by_size",
    "moved",
    "PathLike",
    "parse_size",
    "unwrap",
]
