"""Write what ``torch.save({name: tensor})`` writes, holding one tensor's bytes at a time.

``torch.save`` pickles the whole object first, then writes each storage's record from its
memory, so every tensor must exist at once. Here the pickle runs over placeholder tensors:
each has the dtype, shape and size of the tensor it stands for, but its storage is a fresh
anonymous mapping that is never touched, so it costs no resident memory. torch's own
serializer then writes the records in its order; as it reaches a placeholder's record, the
real tensor is made (read from the source, cast) and written in its place, and freed before
the next one is made. The pickle, the records, their alignment and the zip directory are
torch's own, so the file is byte-identical to ``torch.save`` of the real tensors.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.serialization as _serialization

from torchkeep._facts import numel
from torchkeep._tensors import FLOAT4
from torchkeep.errors import InvalidArgumentError
from torchkeep.formats.torch_pickle import fresh_bytes

Fill = Callable[[str], torch.Tensor]


def can_stream(dtypes: Sequence[torch.dtype]) -> bool:
    """Whether this torch has the serializer this module drives, and every dtype is plain.

    Packed float4's shape in a file differs from its tensor's, so it goes through ``torch.save``.
    """
    return (
        callable(getattr(_serialization, "_save", None))
        and callable(getattr(_serialization, "_open_zipfile_writer", None))
        and all(dtype != FLOAT4 for dtype in dtypes)
    )


def _placeholder(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return fresh_bytes(numel(shape) * dtype.itemsize).view(dtype).view(shape)


class _Filling:
    """The zip writer ``torch.serialization._save`` writes to, with each placeholder's record
    written from the real tensor instead."""

    def __init__(self, writer: Any, owners: Mapping[int, str], fill: Fill) -> None:
        self._writer = writer
        self._owners = owners
        self._fill = fill

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        owner = (
            self._owners.get(data.data_ptr()) if isinstance(data, torch.UntypedStorage) else None
        )
        if owner is None or not nbytes:
            self._writer.write_record(name, data, nbytes)
            return
        tensor = self._fill(owner)
        storage = tensor.untyped_storage()
        if (
            tensor.device.type != "cpu"
            or not tensor.is_contiguous()
            or tensor.storage_offset()
            or storage.nbytes() != nbytes
        ):
            # A view into a larger storage: its own bytes only, as the placeholder's record.
            tensor = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            storage = tensor.untyped_storage()
        if storage.nbytes() != nbytes:
            raise InvalidArgumentError(
                f"the tensor given for {owner!r} holds {storage.nbytes()} bytes, but its dtype "
                f"and shape say {nbytes}; fill must return a tensor of the planned dtype and shape"
            )
        self._writer.write_record(name, storage, nbytes)
        del tensor, storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def save_streamed(
    path: Path,
    names: Sequence[str],
    facts: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    aliases: Mapping[str, str],
    fill: Fill,
    ready: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``torch.save({name: tensor for name in names}, path)``, one tensor in memory.

    Args:
        path: the file to write.
        names: every name, in the dict's order, aliases among them.
        facts: dtype and shape of each stored (not aliased) name.
        aliases: alias -> stored name; both names hold the same tensor object, so torch
            stores it once and loads it back tied.
        fill: returns the tensor of a stored name (contiguous, of its dtype and shape),
            called once per name in the order torch writes the records.
        ready: stored names whose tensors are given as they are (empty ones), not filled.

    Raises:
        InvalidArgumentError: ``fill`` returned a tensor of another size than planned.
    """
    placeholders = {name: _placeholder(*fact) for name, fact in facts.items()}
    tensors = {**(ready or {}), **placeholders}
    obj = {name: tensors[aliases.get(name, name)] for name in names}
    owners = {
        tensor.untyped_storage().data_ptr(): name
        for name, tensor in placeholders.items()
        if tensor.untyped_storage().nbytes()
    }
    with _serialization._open_zipfile_writer(str(path)) as writer:
        _serialization._save(  # type: ignore[no-untyped-call]
            obj,
            _Filling(writer, owners, fill),
            pickle,
            _serialization.DEFAULT_PROTOCOL,
            False,
        )
