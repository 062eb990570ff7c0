"""torch.distributed.checkpoint folders (``.metadata`` + ``*.distcp``) as a weights source.

Each tensor is read whole, assembled from every rank's shards, whatever world size wrote it.
Entries: a folder written by torchkeep's ``CheckpointManager`` in a distributed run offers its
module entries (``model``, ...) like a native checkpoint; any other DCP folder offers all its
tensors under ``""`` and, for names with a first segment (``model.fc.weight``), each such
group under that segment (``model``). Non-tensor items are never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from torchkeep._facts import TensorInfo
from torchkeep.errors import UnknownFormatError
from torchkeep.formats._base import OpenOptions, Source, WriteRequest
from torchkeep.formats._guard import reading
from torchkeep.formats.native import _describe as describe

# torch.distributed.checkpoint takes most of a second to import: only on first use.
METADATA_FILE = ".metadata"


class DcpSource(Source):
    """The tensors of a DCP folder, read one at a time."""

    def __init__(self, path: Path, options: OpenOptions) -> None:
        # torch.distributed.checkpoint takes most of a second to import: only DCP folders pay.
        from torchkeep.formats.dcp_io import (
            MARKER,
            SafeReader,
            read_marker,
            tensor_infos,
            tensor_names,
        )

        super().__init__(str(path), "torch-distributed-checkpoint")
        self._device = options.device
        self._reader = SafeReader(path)
        infos = tensor_infos(self._reader.read_metadata())
        self._infos = infos
        self._stored: dict[str, dict[str, str]] = {}
        if (path / MARKER).is_file():
            marker = read_marker(path)
            for key, entry in marker["state"].items():
                if entry.get("kind") == "module":
                    names = {n: n[len(key) + 1 :] for n in tensor_names(entry["value"])}
                    self._group(key, names, infos)
                else:
                    self.extras[key] = describe(entry)
            self.metadata = {
                "step": str(marker.get("step")),
                "world_size": str(marker.get("world_size")),
                "created": str(marker.get("created")),
                "metrics": json.dumps(marker.get("metrics") or {}),
            }
            return
        self._group("", {n: n for n in infos}, infos)
        tops = sorted({n.split(".", 1)[0] for n in infos if "." in n})
        for top in tops:
            lead = top + "."
            self._group(top, {n: n[len(lead) :] for n in infos if n.startswith(lead)}, infos)

    def _group(self, entry: str, names: dict[str, str], infos: dict[str, TensorInfo]) -> None:
        """Register ``entry`` with ``{stored name: name in the entry}``."""
        self._stored[entry] = {short: stored for stored, short in names.items()}
        self._entries[entry] = {
            short: TensorInfo(short, infos[stored].shape, infos[stored].dtype, infos[stored].nbytes)
            for stored, short in names.items()
            if stored in infos
        }

    def get(self, entry: str, name: str) -> torch.Tensor:
        info = self._entries[entry][name]
        if self._device == "meta":
            return torch.empty(info.shape, dtype=getattr(torch, info.dtype), device="meta")
        out = self._load(self._stored[entry][name], info)
        return out if self._device == "cpu" else out.to(self._device)

    def _load(self, stored: str, info: TensorInfo) -> torch.Tensor:
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        from torchkeep.formats.dcp_io import quiet

        out = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
        with reading(self.path), quiet():
            dcp_load({stored: out}, storage_reader=self._reader, no_dist=True)
        return out

    def verify(self, entry: str | None = None) -> None:
        """Read every tensor item: DCP records no checksums, but each chunk must load whole."""
        for stored, info in self._infos.items():
            self._load(stored, info)


class DcpFormat:
    """A folder holding DCP's ``.metadata``."""

    name: str = "torch-distributed-checkpoint"
    is_folder: bool = True

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and (path / METADATA_FILE).is_file()

    def open(self, path: Path, options: OpenOptions) -> Source:
        return DcpSource(path, options)

    def write(self, request: WriteRequest, path: Path) -> None:
        raise UnknownFormatError(
            "torchkeep.save does not write torch.distributed.checkpoint folders: use a "
            "CheckpointManager in a distributed run, or "
            "torchkeep.distributed.dcp.safetensors_to_dcp"
        )
