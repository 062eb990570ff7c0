"""Native checkpoint folders (``checkpoint.json`` + safetensors shards) as a weights source.

Lets ``load``, ``load_state_dict`` and ``inspect`` read the model weights out of a training
checkpoint written by ``save_checkpoint`` or ``CheckpointManager``: every module entry of the
state (``model``, ``ema``, ...) is one entry here; the other entries (optimizer, scheduler,
plain values) are described in ``extras``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from torchkeep._common import MANIFEST
from torchkeep._tensors import TensorInfo, numel
from torchkeep.errors import CorruptFileError, UnknownFormatError
from torchkeep.formats._base import OpenOptions, Source, WriteRequest
from torchkeep.training.checkpoint import NativeCheckpoint


class NativeSource(Source):
    """The module entries of a committed native checkpoint."""

    def __init__(self, path: Path, options: OpenOptions) -> None:
        super().__init__(str(path), "torchkeep-checkpoint")
        self._device = options.device
        self._checkpoint = NativeCheckpoint(path)
        manifest = self._checkpoint.manifest
        self._stored: dict[str, dict[str, str]] = {}
        stored_info = manifest["tensors"]
        for key, entry in manifest["state"].items():
            if not isinstance(entry, dict):
                continue
            kind, value = entry.get("kind"), entry.get("value")
            if kind == "module" and isinstance(value, dict):
                found = {key: _tensor_refs(value)}
            elif kind in ("value", "stateful"):
                # A state dict saved as a value (model=model.state_dict()), or one inside it.
                found = _tensor_dicts(value, key, 0)
            else:
                found = {}
            for entry_name, names in found.items():
                for name, stored in names.items():
                    if not isinstance(stored, str) or stored not in stored_info:
                        raise CorruptFileError(
                            f"checkpoint {str(path)!r} is damaged: entry {entry_name!r} refers "
                            f"to tensor {stored!r} for {name!r}, which is not stored"
                        )
                self._stored[entry_name] = names
                self._entries[entry_name] = {
                    name: _info(name, stored_info[stored]) for name, stored in names.items()
                }
            if kind != "module" and key not in found:
                self.extras[key] = _describe(entry)
        self.metadata = {
            "step": str(manifest.get("step")),
            "created": str(manifest.get("created")),
            "torch_version": str(manifest.get("torch_version")),
            "metrics": json.dumps(manifest.get("metrics") or {}),
        }

    def get(self, entry: str, name: str) -> torch.Tensor:
        if self._device == "meta":
            info = self._entries[entry][name]
            return torch.empty(info.shape, dtype=getattr(torch, info.dtype), device="meta")
        tensor = self._checkpoint.tensor(self._stored[entry][name])
        return tensor if self._device == "cpu" else tensor.to(self._device)

    def verify(self, entry: str | None = None) -> None:
        with NativeCheckpoint(Path(self.path), verify=True) as checked:
            checked.verify_rest()

    def close(self) -> None:
        self._checkpoint.close()


_MAX_DEPTH = 4  # as deep as entries are looked for in torch checkpoint dicts


def _tensor_refs(node: dict[str, Any]) -> dict[str, Any]:
    """``{name: stored tensor name}`` for the tensor references directly in a JSON dict."""
    return {
        name: ref.get("name")
        for name, ref in node.items()
        if isinstance(ref, dict) and ref.get("__tk__") == "tensor"
    }


def _tensor_dicts(node: Any, path: str, depth: int) -> dict[str, dict[str, Any]]:
    """Every plain dict holding tensors inside a value's JSON node, keyed by its dotted path."""
    if not isinstance(node, dict) or "__tk__" in node:
        return {}
    found: dict[str, dict[str, Any]] = {}
    refs = _tensor_refs(node)
    if refs:
        found[path] = refs
    if depth < _MAX_DEPTH:
        for key, child in node.items():
            found.update(_tensor_dicts(child, f"{path}.{key}", depth + 1))
    return found


def _info(name: str, stored: dict[str, Any]) -> TensorInfo:
    shape = tuple(int(d) for d in stored.get("shape", ()))
    dtype = str(stored.get("dtype", "float32"))
    itemsize = getattr(torch, dtype).itemsize if hasattr(torch, dtype) else 0
    return TensorInfo(name, shape, dtype, numel(shape) * itemsize)


class _Text(str):
    """A description that prints as itself (no quotes) where values are repr()-ed."""

    def __repr__(self) -> str:
        return str(self)


def _untag(value: Any) -> Any:
    """Tagged JSON tuples and lists as plain lists, for display."""
    if isinstance(value, dict):
        if value.get("__tk__") in ("tuple", "list") and isinstance(value.get("items"), list):
            return [_untag(v) for v in value["items"]]
        return {k: _untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag(v) for v in value]
    return value


def _describe(entry: dict[str, Any]) -> Any:
    """A non-module entry for display: its plain value, or a description of it."""
    kind, type_name, value = entry.get("kind"), entry.get("type"), entry.get("value")
    if kind == "value" and not isinstance(value, (dict, list)):
        return value
    if kind == "value" and isinstance(value, list):
        return _Text(f"list of {len(value)} items")
    if kind == "optimizer" and isinstance(value, dict):
        groups = value.get("param_groups")
        if isinstance(groups, list) and groups and isinstance(groups[0], dict):
            wanted = ("lr", "betas", "momentum", "weight_decay", "eps")
            hyper = {k: _untag(v) for k, v in groups[0].items() if k in wanted}
            return _Text(f"{type_name} {json.dumps(hyper)}")
    return _Text(f"{type_name} ({kind})")


class NativeFormat:
    """A folder holding ``checkpoint.json``."""

    name: str = "torchkeep-checkpoint"
    is_folder: bool = True

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and (path / MANIFEST).is_file()

    def open(self, path: Path, options: OpenOptions) -> Source:
        return NativeSource(path, options)

    def write(self, request: WriteRequest, path: Path) -> None:
        raise UnknownFormatError(
            "training checkpoints are written by torchkeep.save_checkpoint or a "
            "CheckpointManager, not by torchkeep.save"
        )
