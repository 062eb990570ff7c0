"""Distributed training checkpoints: torch.distributed.checkpoint (DCP) underneath.

Every rank writes its own shards of the model and optimizer state (DDP replicas are written
once, FSDP2 ``DTensor`` shards by their owners); the state comes from
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` /
``get_optimizer_state_dict``, so names are plain FQNs whatever the wrapping. The non-tensor
part (hyperparameters, step counters, plain values, metrics, every rank's RNG state) is JSON
in torchkeep's commit marker ``torchkeep-dcp.json``, written by rank 0 after a barrier once
every rank finished: no pickle is written or read.

Committing, on a local (or shared) filesystem: rank 0 creates a hidden temporary folder and
tells the others its name; all ranks write into it; after a barrier rank 0 writes the marker,
fsyncs and renames the folder into place. On an fsspec URL the folder is written in place and
the marker written last. Either way a rank that dies mid-save leaves no marker, and the
previous checkpoint stays the latest.

Loading reshards: each rank asks DCP for the pieces its own (possibly differently sharded)
tensors need, so a checkpoint saved by 2 ranks loads on 1, 3 or 4.

``dcp_to_safetensors`` / ``safetensors_to_dcp`` (in :mod:`torchkeep.distributed.convert`) convert
between a DCP folder and one safetensors file, one tensor in memory at a time.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torchkeep.distributed.convert import dcp_to_safetensors, safetensors_to_dcp
from torchkeep.errors import InvalidStateError, TorchkeepWarning
from torchkeep.formats.dcp_io import (
    FORMAT,
    MARKER,
    VERSION,
    Location,
    empty_like_stored,
    encode,
    marker_bytes,
    quiet,
    read_marker,
    reader,
    tensor_names,
    writer,
)
from torchkeep.formats.tree import Unflattener
from torchkeep.storage import commit as storage_commit
from torchkeep.storage.commit import FolderCommit
from torchkeep.training import state as _state
from torchkeep.training.checkpoint import _check_name
from torchkeep.training.manifest import manifest_header
from torchkeep.weights.report import LoadReport, ShapeMismatch, refusal

Group = Any  # a torch.distributed ProcessGroup, or None for the default one


def group_active() -> bool:
    """Whether this process belongs to an initialized torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def _rank(group: Group) -> int:
    return dist.get_rank(group) if group_active() else 0


def _world(group: Group) -> int:
    return dist.get_world_size(group) if group_active() else 1


def _barrier(group: Group) -> None:
    if group_active():
        dist.barrier(group=group)


def is_distributed_module(module: torch.nn.Module) -> bool:
    """DistributedDataParallel, or a module holding DTensor parameters (FSDP2, TP)."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return True
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def wants_dcp(state: Mapping[str, object], distributed: bool | None) -> bool:
    """Whether a save of ``state`` goes through DCP (explicit, or a distributed model)."""
    if distributed is not None:
        return distributed
    return group_active() and any(
        isinstance(v, torch.nn.Module) and is_distributed_module(v) for v in state.values()
    )


def _owner(
    optimizer: torch.optim.Optimizer, modules: Mapping[str, torch.nn.Module], name: str
) -> torch.nn.Module:
    """The module whose parameters ``optimizer`` updates."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules.values():
        if any(id(p) in owned for p in module.parameters()):
            return module
    raise InvalidStateError(
        f"the optimizer {name}= updates parameters of no model in this call; a distributed "
        "checkpoint names optimizer state by parameter name, so pass its model too "
        "(model=..., optimizer=...)"
    )


def _modules(state: Mapping[str, object]) -> dict[str, torch.nn.Module]:
    return {n: v for n, v in state.items() if isinstance(v, torch.nn.Module)}


# ------------------------------------------------------------------------------------ save


@dataclass
class DcpSnapshot:
    """A state captured for a DCP save: this rank's tensors and rank 0's marker."""

    marker: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def take_snapshot(
    state: Mapping[str, object],
    *,
    step: int | None,
    rng: bool,
    metrics: Mapping[str, object] | None,
    metadata: Mapping[str, object] | None,
    copy: bool,
    group: Group = None,
) -> DcpSnapshot:
    """Capture ``state`` on this rank (a collective: every rank calls it, in the same order).

    Args:
        copy: clone every tensor, so training may change them while a background thread
            writes (asynchronous saves); otherwise the live tensors are written.
    """
    if not state:
        raise InvalidStateError("nothing to save: pass the state as keywords, model=..., ...")
    modules = _modules(state)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for name, value in state.items():
        _check_name(name)
        captured: Any
        if isinstance(value, torch.nn.Module):
            kind, captured = "module", get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            owner = _owner(value, modules, name)
            kind, captured = "optimizer", get_optimizer_state_dict(owner, value)
        else:
            kind, captured, _ = _state.capture(value)
        node = encode(captured, name, tensors)
        entries[name] = {"kind": kind, "type": _state.type_name(value), "value": node}
    rank = _rank(group)
    rng_nodes: list[Any] = []
    if rng:
        node = encode(_state.capture_rng(), f"__rng__.{rank}", tensors)
        rng_nodes = [None] * _world(group)
        if group_active():
            dist.all_gather_object(rng_nodes, node, group=group)
        else:
            rng_nodes = [node]
    if copy:
        tensors = {name: t.detach().clone() for name, t in tensors.items()}
    marker = {
        **manifest_header(FORMAT, VERSION, step, metrics, metadata),
        "world_size": _world(group),
        "state": entries,
        "rng": rng_nodes or None,
    }
    return DcpSnapshot(marker, tensors)


def write(
    snapshot: DcpSnapshot,
    location: Location,
    *,
    group: Group = None,
    options: Mapping[str, Any] | None = None,
) -> Location:
    """Write a snapshot as a DCP checkpoint at ``location`` and commit it (collective).

    Raises:
        CheckpointWriteError, CheckpointException: a rank failed; nothing was committed.
    """
    rank = _rank(group)
    with contextlib.ExitStack() as stack:
        # Rank 0 runs the commit (rename-last locally, marker-last at a URL); every rank
        # writes its shards where rank 0 says.
        places: list[Any] = [None]
        commit: FolderCommit | None = None
        if rank == 0:
            commit = stack.enter_context(storage_commit.folder(location, options))
            places[0] = commit.where
        if group_active():
            dist.broadcast_object_list(places, src=dist.get_global_rank(group, 0), group=group)
        with quiet():
            dcp_save(
                snapshot.tensors,
                storage_writer=writer(places[0], options),
                process_group=group,
                no_dist=not group_active(),
            )
        _barrier(group)  # every rank's shards are written
        if commit is not None:
            commit.mark(MARKER, marker_bytes(snapshot.marker))
    _barrier(group)  # rank 0 committed: the checkpoint is in place for every rank
    return location


# --------------------------------------------------------------------------------- restore


def _check_module(
    name: str, module: torch.nn.Module, saved: list[str], ours: dict[str, torch.Tensor], stored: Any
) -> None:
    """Refuse, before anything is loaded, a module whose names or shapes differ."""

    def local(names: Iterable[str]) -> tuple[str, ...]:
        return tuple(n.removeprefix(f"{name}.") for n in sorted(names))

    mismatched = tuple(
        ShapeMismatch(
            key.removeprefix(f"{name}."),
            key.removeprefix(f"{name}."),
            tuple(stored[key].size),
            tuple(ours[key].shape),
        )
        for key in sorted(set(ours) & set(saved))
        if key in stored and tuple(stored[key].size) != tuple(ours[key].shape)
    )
    missing, unexpected = local(set(ours) - set(saved)), local(set(saved) - set(ours))
    if missing or unexpected or mismatched:
        report = LoadReport(
            path=name,
            format="checkpoint entry",
            entry=name,
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
        raise refusal(
            report,
            f"cannot load checkpoint entry {name!r} into {type(module).__name__}; nothing was "
            "loaded (shape mismatches and names in the table):",
            "Pass strict=False to load what fits.",
        )


def _destinations(
    targets: Mapping[str, object], entries: Mapping[str, Any], stored: Any, strict: bool
) -> dict[str, torch.Tensor]:
    """The targets' own tensors (DTensor shards included) that DCP loads into, in place."""
    modules = _modules(targets)
    dest: dict[str, torch.Tensor] = {}
    for name, target in targets.items():
        ours: dict[str, torch.Tensor] = {}
        if isinstance(target, torch.nn.Module):
            encode(get_model_state_dict(target), name, ours)
            if strict:
                _check_module(name, target, tensor_names(entries[name]["value"]), ours, stored)
        elif isinstance(target, torch.optim.Optimizer):
            encode(get_optimizer_state_dict(_owner(target, modules, name), target), name, ours)
        dest.update({k: v for k, v in ours.items() if k in stored})
    return dest


def restore(
    location: Location,
    targets: Mapping[str, object],
    *,
    strict: bool = True,
    rng: bool = True,
    device: str | torch.device | None = None,
    group: Group = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore a torchkeep DCP checkpoint into ``targets``, resharding to this world size.

    Every rank calls it (when a process group is active). Modules and optimizers are loaded
    through ``set_model_state_dict`` / ``set_optimizer_state_dict``; other targets as in
    :func:`~torchkeep.load_checkpoint`. Every module is checked before anything is loaded.

    Returns:
        The entries not restored in place.
    """
    marker = read_marker(location, options)
    entries: dict[str, Any] = marker["state"]
    _state.require_entries(entries, targets, str(location))
    storage = reader(location, options)
    metadata = storage.read_metadata()
    dest = _destinations(targets, entries, metadata.state_dict_metadata, strict)
    rank = _rank(group)
    rng_nodes = marker.get("rng") or []
    rng_node = rng_nodes[rank] if rng and rank < len(rng_nodes) else None
    # Everything else the structure refers to is read whole onto the CPU.
    wanted = [n for entry in entries.values() for n in tensor_names(entry.get("value"))]
    for name in [*wanted, *tensor_names(rng_node)]:
        if name not in dest:
            dest[name] = empty_like_stored(metadata, name, str(location))
    with quiet():
        dcp_load(dest, storage_reader=storage, process_group=group, no_dist=not group_active())
    decoder = Unflattener(dest.__getitem__, where=str(location))
    values = {name: decoder.decode(entry.get("value"), name) for name, entry in entries.items()}
    modules = _modules(targets)
    loaders: dict[str, _state.Loader] = {}
    for name, target in targets.items():
        if isinstance(target, torch.nn.Module):
            loaders[name] = functools.partial(
                set_model_state_dict, target, options=StateDictOptions(strict=strict)
            )
        elif isinstance(target, torch.optim.Optimizer):
            loaders[name] = functools.partial(
                set_optimizer_state_dict, _owner(target, modules, name), target
            )
    out = _state.restore_all(
        values,
        targets,
        strict=strict,
        device=device,
        where=str(location),
        rng_state=None if rng_node is None else decoder.decode(rng_node, "__rng__"),
        loaders=loaders,
    )
    if rng and rng_nodes and len(rng_nodes) != _world(group) and rank == 0:
        warnings.warn(
            f"checkpoint {str(location)!r} holds the RNG states of {len(rng_nodes)} ranks and "
            f"this run has {_world(group)}; ranks without a saved state keep their own",
            TorchkeepWarning,
            stacklevel=3,
        )
    return out


__all__ = [
    "DcpSnapshot",
    "dcp_to_safetensors",
    "group_active",
    "is_distributed_module",
    "restore",
    "safetensors_to_dcp",
    "take_snapshot",
    "wants_dcp",
    "write",
]
