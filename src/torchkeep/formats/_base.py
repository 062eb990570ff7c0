"""The one protocol every on-disk format implements, and the readers it returns.

A format sniffs its own bytes, opens a file as a :class:`Source` (validating the header before
any tensor data is trusted), and writes a flat ``{name: tensor}`` mapping. A source exposes one
or more *entries*: flat tensor dicts found in the file (the root of a state-dict file, or the
``"state_dict"``/``"model"``/... members of a checkpoint dict).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from torchkeep._facts import ModuleEntry, TensorInfo
from torchkeep._tensors import copy_into

MapLocation = Callable[[Any, str], Any] | str | None


@dataclass(frozen=True)
class OpenOptions:
    """How a file is opened.

    Attributes:
        map_location: where storages of pickled files are restored (torch.load semantics).
        device: where tensors of other formats are placed (``"meta"``: shapes only, no data).
        trust: unpickle without the allowlist (the caller vouches for the file).
        allow_globals: extra ``module.name`` globals the allowlist accepts.
        mmap: give torch zip storages addresses in a mapping of the file, and read each
            tensor's bytes from its record when it is asked for (straight into its
            destination, in parallel, where the layouts match) instead of reading every
            storage whole while the pickle runs.
    """

    map_location: MapLocation = "cpu"
    device: str = "cpu"
    trust: bool = False
    allow_globals: tuple[str, ...] = ()
    mmap: bool = False

    @property
    def meta(self) -> bool:
        return self.device == "meta"


@dataclass(frozen=True)
class Stretch:
    """Where a tensor's bytes lie as one unbroken stretch of a source's file, in the order a
    contiguous tensor holds them: ``nbytes`` from ``offset`` in the open file ``fd``.

    ``fd`` belongs to the source and stays open until the source is closed; ``path`` names
    the file in messages. The bytes are the file's, unchecked: a reader checks what it reads
    (the file may end before them).

    Attributes:
        fd: the source's open file.
        offset: where the bytes start in it.
        nbytes: how many there are.
        dtype: the dtype they are stored as.
        path: the file, for messages.
    """

    fd: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    path: str


class Source:
    """An opened file: its entries, their tensors, and what else it holds.

    Subclasses fill ``_entries`` with ``{entry: {name: TensorInfo}}`` and implement ``get``.
    """

    def __init__(self, path: str, format: str) -> None:
        self.path = path
        self.format = format
        self.metadata: dict[str, str] = {}
        self.extras: dict[str, Any] = {}
        self._entries: dict[str, dict[str, TensorInfo]] = {}
        self._aliases: dict[str, dict[str, str]] = {}
        # Whole-model pickles: each entry's module tree, and the classes stood in for by stubs.
        self.module_trees: dict[str, list[ModuleEntry]] = {}
        # Called with byte counts as tensors are read into destinations (torchkeep._progress).
        self.progress: Callable[[int], None] | None = None
        self.stubbed: list[str] = []

    def entries(self) -> dict[str, dict[str, TensorInfo]]:
        """Every flat tensor dict in the file, keyed by its path in the file (``""``: root)."""
        return self._entries

    def aliases(self, entry: str) -> dict[str, str]:
        """Names in ``entry`` that share their data with another name there (tied weights)."""
        return self._aliases.get(entry, {})

    def get(self, entry: str, name: str) -> torch.Tensor:
        """Read one tensor."""
        raise NotImplementedError

    def stretch(self, entry: str, name: str) -> Stretch | None:
        """Where ``name``'s bytes lie, when they are one unbroken stretch of the file.

        A reader can then copy them a piece at a time, without reading the whole tensor.

        Returns:
            The stretch, or None where the bytes are not one stretch of a file (a
            non-contiguous view, a tensor without bytes in the file, a file read whole).

        Raises:
            CorruptFileError: the file places the bytes where they cannot be (a view that
                runs past the record holding it), as the source's own reads would say.
        """
        return None

    def values(self, entry: str) -> dict[str, Any]:
        """Non-tensor values stored under state-dict names beside ``entry``'s tensors.

        Quantized modules keep packed parameters (tuples) and dtypes there, modules with
        ``get_extra_state`` their ``_extra_state``. Formats holding only tensors have none.
        """
        return {}

    def module_versions(self, entry: str) -> Mapping[str, Any] | None:
        """torch's per-module ``_metadata`` (versions) saved with ``entry``, when kept."""
        return None

    def read_into(self, entry: str, name: str, dest: torch.Tensor) -> None:
        """Copy one tensor into ``dest`` (same shape; dtype and device may differ)."""
        with torch.no_grad():
            copy_into(dest, self.get(entry, name), name)
        if self.progress is not None:
            self.progress(dest.nbytes)

    def read_into_many(self, entry: str, pairs: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Copy each ``(name, dest)`` pair's tensor into ``dest``; formats that can read in
        parallel, straight into the destinations, do so."""
        for name, dest in pairs:
            self.read_into(entry, name, dest)

    def verify(self, entry: str | None = None) -> None:
        """Check stored checksums, raising :class:`~torchkeep.errors.ChecksumError`.

        Formats without checksums check what they can (lengths, zip CRCs).
        """

    def close(self) -> None:
        """Release files and mappings."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class WriteRequest:
    """A flat state to write: tensors (contiguous, CPU), aliases and string metadata.

    ``durable`` says the caller fsyncs the result, so writers may start writeback early.
    """

    tensors: Mapping[str, torch.Tensor]
    aliases: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    max_shard_bytes: int | None = None
    order: tuple[str, ...] = ()
    durable: bool = False
    # Called with byte counts as tensor bytes are written (torchkeep._progress).
    progress: Callable[[int], None] | None = field(default=None, compare=False)

    def ordered_names(self) -> list[str]:
        """Every name, aliases included, in the caller's original order."""
        if self.order:
            return list(self.order)
        return [*self.tensors, *self.aliases]


class Format(Protocol):
    """One on-disk format."""

    name: str
    is_folder: bool

    def sniff(self, path: Path, head: bytes) -> bool:
        """Whether ``path`` (its first bytes in ``head``; empty for folders) is this format."""
        ...

    def open(self, path: Path, options: OpenOptions) -> Source:
        """Open and validate ``path``; tensor data is read lazily where the format allows."""
        ...

    def write(self, request: WriteRequest, path: Path) -> None:
        """Write to ``path`` (a fresh temporary file or folder the caller commits)."""
        ...
