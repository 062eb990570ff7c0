"""What :func:`torchkeep.inspect` returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torchkeep._facts import ModuleEntry, TensorInfo, numel
from torchkeep.formats.safetensors_header import (
    is_safetensors_file,
    read_file_header,
    tensor_infos,
)
from torchkeep.weights.info_render import checkpoint_blocks, checkpoint_summary
from torchkeep.weights.render import Block, Rendered

if TYPE_CHECKING:
    from torchkeep.weights.summary import TrainingSummary


@dataclass(frozen=True, repr=False)
class CheckpointInfo(Rendered):
    """A file's contents, read without its tensor data where the format allows.

    ``print(info)`` shows what ``torchkeep inspect`` shows; in a notebook it displays as a
    table; ``repr(info)`` is one line.

    Attributes:
        path: the file or folder.
        format: the detected format.
        size: bytes on disk (all files of a folder together).
        entry: the tensor dict the tensors below come from (``""``: the file's root).
        entries: every tensor dict in the file and how many tensors it holds.
        tensors: the tensors of ``entry``.
        metadata: string metadata stored with the tensors (safetensors ``__metadata__``).
        extras: the file's other top-level values, as short text (``epoch``, ``loss``, ...);
            scalar tensors beside the weights (a ``loss`` saved as a tensor) are values too.
        modules: for whole-model pickles, the module tree of ``entry`` with class names and
            parameter counts, read without importing the classes.
        stubbed: classes the file names that were not imported (inert stand-ins were used).
        alternatives: other tensor dicts that could hold weights (``model_ema`` beside
            ``model``), best first; ``entry=`` chooses one of them.
        values: non-tensor state values stored beside ``entry``'s tensors (quantized packed
            parameters, ``_extra_state``), as short text.
    """

    path: str
    format: str
    size: int
    entry: str
    entries: dict[str, int]
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, str] = field(default_factory=dict)
    modules: tuple[ModuleEntry, ...] = ()
    stubbed: tuple[str, ...] = ()
    alternatives: tuple[str, ...] = ()
    values: dict[str, str] = field(default_factory=dict)
    training: TrainingSummary | None = None
    bookkeeping: dict[str, str] = field(default_factory=dict)

    def blocks(self) -> list[Block]:
        """The description ``str()``, ``rich.print()`` and notebooks show."""
        return checkpoint_blocks(self)

    def summary(self) -> str:
        """One line: path, format, entry, tensor and parameter counts."""
        return checkpoint_summary(self)

    def __repr__(self) -> str:
        return f"<CheckpointInfo {self.summary()}>"

    @property
    def num_params(self) -> int:
        """Elements over all tensors of ``entry``."""
        return sum(numel(info.shape) for info in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in ``entry``."""
        return sum(info.nbytes for info in self.tensors)

    @property
    def dtypes(self) -> dict[str, int]:
        """How many tensors of each dtype ``entry`` holds."""
        counts: dict[str, int] = {}
        for info in self.tensors:
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return counts


def header_info(path: str | os.PathLike[str], entry: str | None = None) -> CheckpointInfo | None:
    """The description of a local file whose header says it all (safetensors), else None.

    Needs no torch: ``torchkeep inspect`` answers from it without importing torch, and
    :func:`torchkeep.inspect` returns the same for the same file.
    """
    if entry in (None, "") and is_safetensors_file(path):
        return safetensors_info(path)
    return None


def safetensors_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe a safetensors file from its header alone; needs no torch.

    What :func:`torchkeep.inspect` returns for such a file, and what ``torchkeep inspect``
    shows without importing torch.
    """
    header = read_file_header(path)
    tensors = tuple(tensor_infos(header).values())
    return CheckpointInfo(
        path=os.fspath(path),
        format="safetensors",
        size=os.stat(path).st_size,
        entry="",
        entries={"": len(tensors)},
        tensors=tensors,
        metadata=dict(header.metadata),
    )
