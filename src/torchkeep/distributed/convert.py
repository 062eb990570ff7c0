"""Converting between a torch.distributed.checkpoint folder and one safetensors file.

Both directions hold one tensor in memory at a time. DCP -> safetensors: the header is built
from the DCP metadata (shapes and dtypes) before any data is read, each tensor is then loaded
whole (assembled from every rank's shards) and appended, and the header is rewritten at the
end with the tensors' checksums (fixed-width, so its length does not change).
safetensors (or any file torchkeep reads) -> DCP: DCP plans the save from shape-only tensors
and reads each one from the source just before it is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torchkeep._tensors import NAME_FROM_DTYPE, byte_view, dtype_name, xxh3
from torchkeep.errors import CheckpointNotFoundError, UnsupportedTensorError
from torchkeep.formats._base import OpenOptions, WriteRequest
from torchkeep.formats._guard import reading
from torchkeep.formats.dcp_io import Location, quiet, reader, tensor_infos, writer
from torchkeep.formats.registry import open_source
from torchkeep.formats.safetensors import build_header
from torchkeep.storage.local import atomic_dir, atomic_file
from torchkeep.storage.locate import readable, writable
from torchkeep.storage.remote import is_remote
from torchkeep.weights.entries import default_entry

PathLike = str | os.PathLike[str]
_PLACEHOLDER = "0" * 16  # an xxh3-64 hex digest is always 16 characters


def _location(path: PathLike) -> Location:
    where = os.fspath(path)
    if is_remote(where):
        return where
    return Path(where.removeprefix("file://"))


def _selected(names: list[str], prefix: str | None, where: str) -> dict[str, str]:
    """``{stored name: output name}`` for the names under ``prefix`` (all when None)."""
    if prefix is None:
        return {n: n for n in names}
    lead = prefix.rstrip(".") + "."
    chosen = {n: n[len(lead) :] for n in names if n.startswith(lead)}
    if not chosen:
        tops = sorted({n.split(".", 1)[0] for n in names})
        raise CheckpointNotFoundError(
            f"{where!r} holds no tensors under {prefix!r}; its top-level names are: "
            + ", ".join(tops)
        )
    return chosen


def dcp_to_safetensors(
    src: PathLike,
    dst: PathLike,
    *,
    prefix: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Path | str:
    """Write every tensor of a DCP folder into one safetensors file, one at a time.

    Sharded tensors (FSDP, any world size) are assembled whole. Non-tensor items are left
    out. Peak memory is about the largest tensor.

    Args:
        src: a DCP folder (``.metadata`` plus ``*.distcp``), local or an fsspec URL; a
            ``CheckpointManager`` step folder written by a distributed run works too.
        dst: the ``.safetensors`` file to write (atomically), local or an fsspec URL.
        prefix: keep only the tensors under this name (``"model"``), without it.
        options: fsspec storage options for ``src``.

    Returns:
        ``dst``.

    Example:
        >>> dcp_to_safetensors("runs/exp1/step-00001000", "model.safetensors", prefix="model")
    """
    location = _location(src)
    storage = reader(location, options)
    metadata = storage.read_metadata()
    infos = tensor_infos(metadata)
    names = _selected(list(infos), prefix, str(src))
    for stored in names:
        if infos[stored].dtype not in {dtype_name(d) for d in NAME_FROM_DTYPE}:
            raise UnsupportedTensorError(
                f"tensor {stored!r} in {str(src)!r} has dtype {infos[stored].dtype}, which "
                "safetensors cannot store"
            )
    shapes = {
        out: torch.empty(
            infos[stored].shape, dtype=getattr(torch, infos[stored].dtype), device="meta"
        )
        for stored, out in names.items()
    }
    stored_of = {out: stored for stored, out in names.items()}
    request = WriteRequest(shapes, order=tuple(shapes))
    header, order = build_header(request, dict.fromkeys(shapes, _PLACEHOLDER))
    with writable(dst) as local, atomic_file(local) as temp:
        checksums: dict[str, str] = {}
        with open(temp, "wb") as f:
            f.write(header)
            for out in order:
                tensor = torch.empty(shapes[out].shape, dtype=shapes[out].dtype)
                with reading(src), quiet():
                    dcp_load({stored_of[out]: tensor}, storage_reader=storage, no_dist=True)
                checksums[out] = xxh3(tensor)
                if tensor.numel():
                    f.write(byte_view(tensor))
                del tensor
            final, _ = build_header(request, checksums)
            assert len(final) == len(header)
            f.seek(0)
            f.write(final)
    return dst if isinstance(dst, str) else Path(dst)


class _StreamingPlanner(DefaultSavePlanner):
    """Plans from shape-only (meta) tensors; reads each real tensor just before writing it."""

    def __init__(self, read: Any) -> None:
        super().__init__(flatten_state_dict=False, dedup_save_to_lowest_rank=False)
        self._read_tensor = read

    def lookup_object(self, index: MetadataIndex) -> Any:
        return self._read_tensor(index.fqn)


def safetensors_to_dcp(
    src: PathLike,
    dst: PathLike,
    *,
    prefix: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Path | str:
    """Write the weights of any file torchkeep reads as a DCP folder, one tensor at a time.

    Args:
        src: a safetensors file, sharded folder, ``.pt`` file, ... (local or a URL).
        dst: the DCP folder to write (committed atomically when local).
        prefix: put every name under this one (``"model"`` gives ``model.fc.weight``), as
            ``dcp_save({"model": state_dict})`` would.
        options: fsspec storage options for ``dst``.

    Returns:
        ``dst``.
    """
    lead = f"{prefix.rstrip('.')}." if prefix else ""
    with readable(src) as local, open_source(local, OpenOptions()) as source:
        entry = default_entry(source)
        infos = source.entries()[entry]
        shapes = {
            lead + name: torch.empty(info.shape, dtype=getattr(torch, info.dtype), device="meta")
            for name, info in infos.items()
        }
        names = {lead + name: name for name in infos}

        def read(name: str) -> torch.Tensor:
            return source.get(entry, names[name])

        planner = _StreamingPlanner(read)
        target = _location(dst)
        with quiet():
            if isinstance(target, Path):
                with atomic_dir(target) as temp:
                    dcp_save(shapes, storage_writer=writer(temp), planner=planner, no_dist=True)
            else:
                dcp_save(
                    shapes, storage_writer=writer(target, options), planner=planner, no_dist=True
                )
    return target
