"""The tensor shards of a native checkpoint: planned, linked when unchanged, written in parallel.

Incremental saves. Frozen parameters (``requires_grad=False``) are grouped into shards of
their own, in the same order every time, so that a fine-tuning run produces the same frozen
shards at every save. Before writing, those tensors are hashed (xxh3, much faster than
writing them); a shard whose tensors all match, by name, dtype, shape and checksum, one file of
the previous checkpoint's manifest is hard-linked from there instead of written. Every
checkpoint stays self-contained: a hard link is a second name of the same file, so deleting
the older checkpoint leaves the newer one whole. Files are never modified after their
checkpoint is committed, and the recycle bin only takes files with a single link, so a shared
file cannot change under either checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep._common import MANIFEST, group_by_size
from torchkeep._tensors import alias_key, byte_view, dtype_name
from torchkeep.errors import UnsafeFileError
from torchkeep.formats._base import WriteRequest
from torchkeep.formats.safetensors import file_plan
from torchkeep.io.recycle import RecycleBin
from torchkeep.io.write import FilePlan, checksum_views, write_files
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.contain import member


def shard_name(number: int) -> str:
    """``tensors-00003.safetensors``."""
    return f"tensors-{number:05d}.safetensors"


def frozen_names(
    state: Mapping[str, object], tensors: Mapping[str, torch.Tensor]
) -> frozenset[str]:
    """The names in ``tensors`` that are frozen parameters of a module in ``state``.

    A module's ``state_dict()`` holds detached views of its parameters, which share their
    memory; that is how a flat tensor is traced back to its ``requires_grad=False`` parameter.
    Must run before the tensors are copied into staging buffers.
    """
    frozen: set[tuple[object, ...]] = set()
    for value in state.values():
        if isinstance(value, torch.nn.Module):
            frozen.update(alias_key(p) for p in value.parameters() if not p.requires_grad)
    if not frozen:
        return frozenset()
    return frozenset(name for name, t in tensors.items() if t.numel() and alias_key(t) in frozen)


def _group(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    sizes = ((name, t.numel() * t.element_size()) for name, t in tensors.items())
    return [{name: tensors[name] for name in names} for names in group_by_size(sizes, max_bytes)]


def plan_shards(
    tensors: Mapping[str, torch.Tensor], max_bytes: int, frozen: Collection[str] = ()
) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (a bigger one alone).

    Frozen tensors get shards of their own, after the others; each shard comes with whether
    it is frozen.
    """
    moving = {n: t for n, t in tensors.items() if n not in frozen}
    still = {n: t for n, t in tensors.items() if n in frozen}
    return [(s, False) for s in _group(moving, max_bytes)] + [
        (s, True) for s in _group(still, max_bytes)
    ]


@dataclass
class ShardsWritten:
    """What :func:`write_shards` did.

    Attributes:
        files: the shard file names, in plan order.
        shards: each shard's tensors.
        checksums: each shard's ``{name: xxh3 hex}``.
        sizes: ``{file name: bytes}``.
        written: bytes written.
        linked: bytes hard-linked from the previous checkpoint.
        recycled: bytes written over recycled files.
    """

    files: list[str] = field(default_factory=list)
    shards: list[dict[str, torch.Tensor]] = field(default_factory=list)
    checksums: list[dict[str, str]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    written: int = 0
    linked: int = 0
    recycled: int = 0


def _previous_shards(folder: Path) -> dict[frozenset[str], tuple[Path, dict[str, Any], int]]:
    """The previous checkpoint's files by the set of tensor names each holds."""
    try:
        where = str(folder / MANIFEST)
        raw = member(folder, MANIFEST, path=where, what="manifest", flat=True).read_bytes()
        manifest = _json.loads(raw, path=where, what="checkpoint.json manifest")
        tensors, files = manifest["tensors"], manifest["files"]
        by_file: dict[str, dict[str, Any]] = {}
        for name, info in tensors.items():
            by_file.setdefault(str(info["file"]), {})[name] = info
        return {
            frozenset(infos): (
                member(folder, file, path=where, what="file", flat=True),
                infos,
                int(files[file]["bytes"]),
            )
            for file, infos in by_file.items()
            if file in files
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnsafeFileError):
        return {}  # no usable previous checkpoint: everything is written


def _unchanged(
    shard: Mapping[str, torch.Tensor], checksums: Mapping[str, str], recorded: Mapping[str, Any]
) -> bool:
    return all(
        recorded[name].get("xxh3") == checksums[name]
        and recorded[name].get("dtype") == dtype_name(tensor.dtype)
        and recorded[name].get("shape") == list(tensor.shape)
        for name, tensor in shard.items()
    )


def _link(source: Path, expected: int, target: Path) -> bool:
    with contextlib.suppress(OSError):
        if source.stat().st_size == expected:
            os.link(source, target)
            return True
    return False  # moved, changed, or a filesystem without hard links: write it instead


def shard_plan(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    recycle: RecycleBin | None,
    known: Mapping[str, str] | None = None,
) -> FilePlan:
    """The plan of one shard file at ``path``, overwriting a recycled file of its size when
    ``recycle`` holds one (``known``: checksums already computed)."""
    plan = file_plan(WriteRequest(tensors), path, known=known)
    if recycle is not None and recycle.take(plan.size, plan.path):
        plan.reuse = True
    return plan


def write_shards(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    max_bytes: int,
    *,
    frozen: Collection[str] = (),
    previous: Path | None = None,
    recycle: RecycleBin | None = None,
    durable: bool = True,
    threads: int | None = None,
) -> ShardsWritten:
    """Write ``tensors`` as safetensors shards into ``folder`` (a fresh temporary folder).

    Args:
        folder: where the shards go.
        tensors: contiguous CPU tensors, by flat name.
        max_bytes: the largest shard's tensor bytes.
        frozen: names of frozen tensors, given shards of their own.
        previous: a committed checkpoint whose unchanged frozen shards are hard-linked.
        recycle: a bin of files to overwrite instead of creating new ones.
        durable: the caller fsyncs the files afterwards.
        threads: writer threads (default: one per core).
    """
    done = ShardsWritten()
    old = _previous_shards(previous) if previous is not None else {}
    planned = plan_shards(tensors, max_bytes, frozen)
    known: dict[str, str] = {}
    if old:
        # Hashing is several times faster than writing: worth it for the tensors likely to
        # be unchanged, and the writer then skips hashing them again.
        known = checksum_views({n: byte_view(t) for s, f in planned if f for n, t in s.items()})
    plans: list[FilePlan] = []
    for number, (shard, is_frozen) in enumerate(planned):
        name = shard_name(number)
        done.files.append(name)
        done.shards.append(shard)
        request = WriteRequest(shard)
        match = old.get(frozenset(shard)) if is_frozen else None
        if match is not None and _unchanged(shard, known, match[1]):
            size = file_plan(request, folder / name).size
            if size == match[2] and _link(match[0], size, folder / name):
                done.linked += size
                done.sizes[name] = size
                continue
        plan = shard_plan(folder / name, shard, recycle, known)
        if plan.reuse:
            done.recycled += plan.size
        plans.append(plan)
        done.written += plan.size
        done.sizes[name] = plan.size
    written = iter(write_files(plans, threads=threads, durable=durable))
    linked = {name for name in done.files if name not in {p.path.name for p in plans}}
    for name, shard in zip(done.files, done.shards, strict=True):
        if name in linked:
            done.checksums.append({n: known[n] for n in shard})
        else:
            done.checksums.append(next(written))
    return done
