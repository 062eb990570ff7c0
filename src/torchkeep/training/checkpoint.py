"""Training checkpoints: ``save_checkpoint`` / ``load_checkpoint``.

Two layouts. A ``.pt`` path gets the tutorials' torch zip file, a dict of state dicts and
plain values that ``torch.load(weights_only=True)`` reads. Any other path is a folder in the
native format: safetensors shards of bounded size written in parallel, and ``checkpoint.json``
written last, holding the structure of the state (:mod:`torchkeep.formats.tree`), every tensor's
dtype, shape, file and xxh3 checksum, metrics and metadata. The folder is filled under a
temporary name and renamed into place only when complete, so a folder without
``checkpoint.json`` is never taken for a checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash

from torchkeep._common import (
    BOOKKEEPING,
    MANIFEST,
    OBJECTS,
    TEMP_MARKER,
    TORCH_SUFFIXES,
    parse_size,
)
from torchkeep._device import check_device
from torchkeep._tensors import dtype_name, to_cpu_contiguous
from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    InvalidArgumentError,
    InvalidStateError,
    UnsafeFileError,
)
from torchkeep.formats.manifest import FORMAT, VERSION, read_manifest
from torchkeep.formats.native import NativeCheckpoint, referenced_tensors
from torchkeep.formats.tree import (
    TAG,
    Flattener,
    Unflattener,
    UnsupportedValueError,
    to_torch_plain,
)
from torchkeep.io.positional import BINARY
from torchkeep.io.recycle import RecycleBin
from torchkeep.io.write import write_all
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.stubs import StubObject, find_stubs, is_module_like
from torchkeep.safety.torch_files import check_crcs
from torchkeep.safety.unpickle import safe_torch_load
from torchkeep.storage.local import atomic_dir, atomic_file, disk_error, temp_sibling
from torchkeep.storage.locate import needs_staging, readable, writable
from torchkeep.training import state as _state
from torchkeep.training.manifest import manifest_header, now, number, plain_json
from torchkeep.training.shards import frozen_names, write_shards

PathLike = str | os.PathLike[str]

PT_META = BOOKKEEPING
DEFAULT_SHARD_SIZE = "256MB"


# ------------------------------------------------------------------------------ snapshot


@dataclass
class Snapshot:
    """A state frozen for writing: the manifest without its tensor table, and the tensors.

    ``frozen`` names the tensors that are frozen parameters (``requires_grad=False``), which
    get shards of their own so that unchanged ones can be hard-linked by the next save.
    """

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    objects: bytes | None
    frozen: frozenset[str] = frozenset()


class StagingPool:
    """Reusable CPU buffers the tensors of a state are copied into before an async write.

    Buffers are kept per tensor name and reused while shape and dtype stay the same, so a
    training loop allocates them once; they are pinned when the source is on a GPU so the
    copies can run asynchronously. A pool serves one write at a time: the caller must not
    stage again before the previous write finished.

    Attributes:
        share: when set and it returns True for the tensors to stage, nothing is copied:
            :meth:`stage` hands back the live tensors (contiguous, on the CPU) and sets
            :attr:`shared`, for a caller that snapshots them another way (a forked writer,
            :mod:`torchkeep.training.background`). The buffers are then let go.
        shared: whether the last :meth:`stage` shared the live tensors instead of copying.
    """

    def __init__(self, share: Callable[[Mapping[str, torch.Tensor]], bool] | None = None) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.share = share
        self.shared = False

    def stage(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` in the pool's buffers, complete when this returns."""
        self.shared = self.share is not None and self.share(tensors)
        if self.shared:
            self._buffers = {}
            return {name: _to_cpu(t) for name, t in tensors.items()}
        staged: dict[str, torch.Tensor] = {}
        devices: set[torch.device] = set()
        for name, tensor in tensors.items():
            source = tensor.detach()
            on_gpu = source.device.type == "cuda"
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
                buffer = torch.empty(
                    source.shape,
                    dtype=source.dtype,
                    pin_memory=on_gpu and torch.cuda.is_available(),
                )
            buffer.copy_(source, non_blocking=on_gpu)
            if on_gpu:
                devices.add(source.device)
            staged[name] = buffer
        for device in devices:
            # The copies must have landed before training may change the sources.
            torch.cuda.synchronize(device)
        self._buffers = staged
        return staged


def _check_name(name: str) -> None:
    if name.startswith("__"):
        raise InvalidArgumentError(
            f"state names starting with '__' are reserved, got {name!r}; save it under "
            "another keyword"
        )


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return to_cpu_contiguous(tensor.resolve_conj().resolve_neg())


def take_snapshot(
    state: Mapping[str, object],
    *,
    step: int | None = None,
    rng: bool = True,
    allow_pickle: bool = False,
    metrics: Mapping[str, object] | None = None,
    metadata: Mapping[str, object] | None = None,
    staging: StagingPool | None = None,
) -> Snapshot:
    """Capture ``state`` for the native format; with ``staging`` every tensor is copied.

    Everything that is not a tensor is turned into JSON (or pickled, with ``allow_pickle``)
    here, so later changes to the live objects do not reach the checkpoint.
    """
    if not state:
        raise InvalidStateError("nothing to save: pass the state as keywords, model=..., ...")
    flattener = Flattener(allow_pickle=allow_pickle)
    entries: dict[str, Any] = {}
    for name, value in state.items():
        _check_name(name)
        kind, captured, module_meta = _state.capture(value)
        entry = {
            "kind": kind,
            "type": _state.type_name(value),
            "value": flattener.encode(captured, name),
        }
        if module_meta:
            entry["module_metadata"] = plain_json(module_meta, name)
        entries[name] = entry
    rng_node = flattener.encode(_state.capture_rng(), "__rng__") if rng else None
    objects = pickle.dumps(flattener.objects, protocol=5) if flattener.objects else None
    frozen = frozen_names(state, flattener.tensors)  # before staging replaces the tensors
    if staging is not None:
        tensors = staging.stage(flattener.tensors)
    else:
        tensors = {name: _to_cpu(t) for name, t in flattener.tensors.items()}
    manifest: dict[str, Any] = {
        **manifest_header(FORMAT, VERSION, step, metrics, metadata),
        "state": entries,
        "rng": rng_node,
        "objects": {"file": OBJECTS, "paths": flattener.pickled_paths} if objects else None,
    }
    return Snapshot(manifest, tensors, objects, frozen)


# --------------------------------------------------------------------------------- write


def _write_file(path: Path, chunks: list[memoryview]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | BINARY, 0o644)
    try:
        for chunk in chunks:
            write_all(fd, chunk)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    finally:
        os.close(fd)


def _fill(
    folder: Path,
    snapshot: Snapshot,
    max_bytes: int,
    previous: Path | None = None,
    recycle: RecycleBin | None = None,
) -> dict[str, Any]:
    shards = write_shards(
        folder,
        snapshot.tensors,
        max_bytes,
        frozen=snapshot.frozen,
        previous=previous,
        recycle=recycle,
    )
    records = {
        name: tensor_record(file, t, checksums[name])
        for file, shard, checksums in zip(
            shards.files, shards.shards, shards.checksums, strict=True
        )
        for name, t in shard.items()
    }
    return seal(folder, snapshot, records, shards.files)


def tensor_record(file: str, tensor: torch.Tensor, checksum: str | None = None) -> dict[str, Any]:
    """A tensor's record in the manifest: its shard file, dtype, shape, size and checksum."""
    record: dict[str, Any] = {
        "file": file,
        "dtype": dtype_name(tensor.dtype),
        "shape": list(tensor.shape),
        "nbytes": tensor.numel() * tensor.element_size(),
    }
    if checksum is not None:
        record["xxh3"] = checksum
    return record


def seal(
    folder: Path, snapshot: Snapshot, records: Mapping[str, Any], files: Iterable[str]
) -> dict[str, Any]:
    """Finish a checkpoint folder whose shard ``files`` are written: the pickled objects, if
    any, then the manifest, written last (a folder holding ``checkpoint.json`` is complete).

    Returns:
        The manifest written.
    """
    manifest = dict(snapshot.manifest)
    manifest["tensors"] = dict(records)
    manifest["files"] = {n: {"bytes": (folder / n).stat().st_size} for n in files}
    if snapshot.objects is not None:
        _write_file(folder / OBJECTS, [memoryview(snapshot.objects)])
        manifest["objects"] = {
            **manifest["objects"],
            "bytes": len(snapshot.objects),
            "xxh3": xxhash.xxh3_64_hexdigest(snapshot.objects),
        }
    text = json.dumps(manifest, indent=1, allow_nan=False).encode()
    _write_file(folder / MANIFEST, [memoryview(text)])
    return manifest


def _manifest_id(folder: Path) -> str | None:
    try:
        with open(folder / MANIFEST, "rb") as f:
            found = _json.loads(f.read(), path=str(folder / MANIFEST), what="manifest").get("id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(found) if found is not None else None


def _undo(path: Path, save_id: str) -> bool:
    """Take back a checkpoint whose rename succeeded but whose commit then failed.

    ``atomic_dir`` moves an existing checkpoint aside before renaming the new one in and
    removes it only after the final fsync; when that fsync fails, the old one is put back.
    Returns False when the new checkpoint could not be taken back.
    """
    if _manifest_id(path) != save_id:
        return True  # the rename never happened
    try:
        hidden = temp_sibling(path)
        os.replace(path, hidden)
    except OSError:
        return False
    shutil.rmtree(hidden, ignore_errors=True)
    prefix = f".{path.name}{TEMP_MARKER}"
    for sibling in path.parent.iterdir():
        if sibling.name.startswith(prefix) and _manifest_id(sibling) not in (None, save_id):
            with contextlib.suppress(OSError):
                os.replace(sibling, path)
            break
    return True


def write_error(exc: OSError, target: Path, undone: bool = True) -> CheckpointWriteError:
    """The disk's refusal ``exc`` while writing checkpoint ``target``, typed; the message
    says whether earlier checkpoints are untouched (``undone``)."""
    where = f" (while writing {exc.filename})" if exc.filename else ""
    outcome = (
        "nothing was committed and earlier checkpoints are untouched"
        if undone
        else f"the new checkpoint could not be taken back; check {target}"
    )
    message = f"could not write checkpoint {str(target)!r}: {exc.strerror or exc}{where}; {outcome}"
    if exc.errno is not None:
        return CheckpointWriteError(exc.errno, message)
    return CheckpointWriteError(message)


def write_native(
    snapshot: Snapshot,
    path: PathLike,
    *,
    max_shard_size: int | str,
    previous: Path | None = None,
    recycle: RecycleBin | None = None,
) -> Path:
    """Write ``snapshot`` as a native checkpoint folder at ``path``, atomically.

    Args:
        snapshot: the captured state.
        path: the checkpoint folder.
        max_shard_size: the largest shard.
        previous: a committed checkpoint whose unchanged frozen shards are hard-linked
            rather than written again (see :mod:`torchkeep.training.shards`).
        recycle: retired files to overwrite instead of creating new ones.

    Raises:
        CheckpointWriteError: the disk refused a write or fsync; nothing was committed.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InvalidArgumentError(
            f"{str(target)!r} is a file; a native checkpoint is a folder: choose a folder "
            "path, or a .pt path for a single-file checkpoint"
        )
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise InvalidArgumentError(
            f"folder {str(target)!r} exists and is not a torchkeep checkpoint; refusing to "
            "replace it: choose a new folder"
        )
    max_bytes = parse_size(max_shard_size)
    return commit_folder(
        target,
        snapshot,
        functools.partial(
            _fill, snapshot=snapshot, max_bytes=max_bytes, previous=previous, recycle=recycle
        ),
    )


def commit_folder(target: Path, snapshot: Snapshot, fill: Callable[[Path], object]) -> Path:
    """Commit a checkpoint folder at ``target``: ``fill`` writes it whole into a temporary
    folder, which then replaces ``target`` in one step (see ``atomic_dir``).

    Raises:
        CheckpointWriteError: the disk refused a write or fsync; nothing was committed (or,
            where the new folder could not be taken back after its rename, the message
            says so).
    """
    try:
        with atomic_dir(target) as temp:
            fill(temp)
    except BaseException as exc:
        undone = _undo(target, snapshot.manifest["id"])
        disk = disk_error(exc)
        if disk is not None:
            raise write_error(disk, target, undone) from disk
        raise
    return target


# ---------------------------------------------------------------------------------- read


def _lazy_refs(ckpt: NativeCheckpoint, node: Any) -> dict[str, tuple[str, torch.Tensor]]:
    """``{state name: (stored name, meta tensor)}`` for the plain tensors of a module entry's
    value, which can be read straight into the module (none when the value is not a dict)."""
    if not isinstance(node, dict) or TAG in node:
        return {}
    refs: dict[str, tuple[str, torch.Tensor]] = {}
    for key, item in node.items():
        if (
            isinstance(item, dict)
            and item.keys() == {TAG, "name"}
            and item[TAG] == "tensor"
            and isinstance(item["name"], str)
        ):
            placeholder = ckpt.placeholder(item["name"])
            if placeholder is not None:
                refs[key] = (item["name"], placeholder)
    return refs


def _decode_native(
    ckpt: NativeCheckpoint,
    targets: Mapping[str, object],
    *,
    verify: bool,
    trust: bool,
    allow_globals: Iterable[str],
    rng: bool,
) -> tuple[dict[str, Any], Any]:
    """The checkpoint's entries and RNG state, as values to restore.

    A module entry restoring a module target keeps its plain tensors in the checkpoint
    (:class:`~torchkeep.training.state.StoredState`): they are read later, straight into the
    module's own tensors. Every other tensor is read here, in one parallel batch. With
    ``verify``, every tensor of the checkpoint, read or not, is checked before this returns,
    so that a damaged one is found before any target changes.
    """
    path = ckpt.path
    cache: list[list[object]] = []
    if ckpt.manifest.get("objects") and not trust:
        # Refused or read through the allowlist before anything else is read.
        cache.append(ckpt.objects(trust=False, allow_globals=allow_globals))

    def objects() -> list[object]:
        if not cache:
            cache.append(ckpt.objects(trust, allow_globals))
        return cache[0]

    lazy: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for name, entry in ckpt.manifest["state"].items():
        if entry.get("kind") == "module" and isinstance(targets.get(name), torch.nn.Module):
            refs = _lazy_refs(ckpt, entry.get("value"))
            if refs:
                lazy[name] = refs
    # Every other tensor the decode needs, read at once, in parallel across the shard files
    # (and hashed as they land, with verify); a name the manifest lacks is left for the
    # decode to report where the structure refers to it.
    nodes: list[Any] = [ckpt.manifest.get("rng") if rng else None]
    for name, entry in ckpt.manifest["state"].items():
        node = entry.get("value")
        if name in lazy:
            node = {k: v for k, v in node.items() if k not in lazy[name]}
        nodes += [node, entry.get("module_metadata")]
    stored = ckpt.manifest["tensors"]
    tensors = ckpt.read(n for n in referenced_tensors(nodes) if n in stored)

    def tensor(name: str) -> torch.Tensor:
        # The decoder asks once per name; the dict lets go of what it has handed out.
        return tensors.pop(name) if name in tensors else ckpt.tensor(name)

    decoder = Unflattener(tensor, objects, str(path))
    values: dict[str, Any] = {}
    for name, entry in ckpt.manifest["state"].items():
        node = entry.get("value")
        refs = lazy.get(name, {})
        value: Any
        if refs:
            value = _state.StoredState(
                {
                    key: refs[key][1] if key in refs else decoder.decode(item, f"{name}.{key}")
                    for key, item in node.items()
                },
                {key: stored for key, (stored, _) in refs.items()},
                ckpt,
            )
        else:
            value = decoder.decode(node, name)
        if entry.get("kind") == "module" and isinstance(value, dict):
            meta = decoder.decode(entry.get("module_metadata"), name)
            if isinstance(value, _state.StoredState):
                if isinstance(meta, dict) and meta:
                    value._metadata = OrderedDict(meta)  # type: ignore[attr-defined]
            else:
                value = _state.module_state(value, meta if isinstance(meta, dict) else None)
        values[name] = value
    rng_state = decoder.decode(ckpt.manifest["rng"], "__rng__") if rng else None
    if verify:
        ckpt.verify_rest()
    return values, rng_state


def _decode_torch(
    path: Path,
    targets: Mapping[str, object],
    *,
    verify: bool,
    trust: bool,
    allow_globals: Iterable[str],
    rng: bool,
) -> tuple[dict[str, Any], Any]:
    if verify and zipfile.is_zipfile(path):
        check_crcs(str(path))
    # Unknown classes become inert stand-ins (anything that could run code is refused);
    # _refuse_stand_ins then decides where the checkpoint may keep them.
    loaded = safe_torch_load(
        str(path), map_location="cpu", trust=trust, allow_globals=allow_globals, stubs=True
    )
    if not isinstance(loaded, Mapping):
        raise InvalidStateError(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a checkpoint dict; load "
            "weights with torchkeep.load(model, path)"
        )
    values = {str(k): v for k, v in loaded.items() if k != PT_META}
    meta = loaded.get(PT_META)
    if isinstance(meta, Mapping):
        values = _state.revive_namespaces(values, meta.get("namespaces"), str(path))
    for name, target in targets.items():
        found = _entry_for(name, target, values)
        if found is not None and found != name:
            values[name] = values.pop(found)
    if not trust:
        _refuse_stand_ins(values, targets, path)
    rng_state = meta.get("rng") if rng and isinstance(meta, Mapping) else None
    return values, rng_state


# Where trainers keep their configuration: Lightning's hyper-parameters and their class.
_HYPER_PARAMETERS = frozenset(
    {"hyper_parameters", "hparams_type", "datamodule_hyper_parameters", "datamodule_hparams_type"}
)


def _refuse_stand_ins(values: Mapping[str, Any], targets: Mapping[str, object], path: Path) -> None:
    """Refuse a value handed back with stand-ins for classes that were not imported.

    Stand-ins are data only where a checkpoint keeps its configuration: Lightning's
    hyper-parameter entries and omegaconf configs anywhere (their nodes, enums and the
    dataclasses of structured configs are stand-ins too). A pickled module restores a module
    target (its weights are read from it), and other targets refuse stand-ins themselves
    (:func:`torchkeep.training.state.check`). Anything else (a user's object) would come back
    looking like the real thing without its methods, so the file needs ``trust=True``.
    """
    found: dict[str, str] = {}
    for name, value in values.items():
        if name in targets or name in _HYPER_PARAMETERS or _is_config(value):
            continue
        for qualname in find_stubs(value, limit=1 << 62):
            found.setdefault(qualname, name)
    if found:
        listed = ", ".join(f"{q} (in {n!r})" for q, n in found.items())
        raise UnsafeFileError(
            f"refusing to load {str(path)!r} without trust: it holds objects of classes that "
            f"are not imported: {listed}. Nothing was executed; without their code they could "
            "come back only as inert stand-ins. If you trust whoever wrote the file, pass "
            "trust=True; to take only the weights, use torchkeep.load_state_dict(path) or "
            "pass the model to restore (model=...).",
            path=str(path),
            globals=tuple(found),
        )


def _is_config(value: Any) -> bool:
    return isinstance(value, StubObject) and value.stub_qualname.startswith("omegaconf.")


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def _entry_for(name: str, target: object, values: Mapping[str, Any]) -> str | None:
    """The entry of a torch checkpoint dict that restores the target passed as ``name=``.

    The tutorials' names count too (``model_state_dict``, ``optimizer_state_dict``). For a
    module, weights held as a state dict win over a pickled module object beside them (the
    tutorials save both, ``{"model": Net(), "model_state_dict": ...}``); a pickled module is
    used when it is the only source.
    """
    names = [name, f"{name}_state_dict", f"{name}_state"]
    if not isinstance(target, torch.nn.Module):
        return next((n for n in names if n in values), None)
    names.append("state_dict")
    present = [n for n in names if n in values]
    return next(
        (n for n in present if _holds_tensors(values[n])),
        next((n for n in present if is_module_like(values[n])), present[0] if present else None),
    )


# -------------------------------------------------------------------------------- verbs


def _as_path(path: object, verb: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidStateError(
            f"{verb} takes the checkpoint's path first, got a {type(path).__name__}; call "
            f"{verb}(path, model=model, optimizer=optimizer, ...)"
        )
    return Path(path)


def _format_for(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in ("native", "torch"):
            raise InvalidArgumentError(
                f"unknown checkpoint format {format!r}; use 'native' or 'torch'"
            )
        return format
    if path.suffix.lower() in TORCH_SUFFIXES:
        return "torch"
    if path.is_dir() or not path.suffix:
        return "native"
    raise InvalidArgumentError(
        f"cannot tell the checkpoint format of {str(path)!r} from its suffix {path.suffix!r}: "
        f"use a folder path (the native format) or a file ending in {'/'.join(TORCH_SUFFIXES)}, "
        "or pass format='native'/'torch'"
    )


def _save_torch(
    path: Path,
    state: Mapping[str, object],
    *,
    rng: bool,
    allow_pickle: bool,
    metrics: Mapping[str, object] | None,
    metadata: Mapping[str, object] | None,
) -> None:
    if not state:
        raise InvalidStateError("nothing to save: pass the state as keywords, model=..., ...")
    payload: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    namespaces: list[list[Any]] = []
    for name, value in state.items():
        _check_name(name)
        kind, captured, module_meta = _state.capture(value)
        if kind == "module":
            captured = _state.module_state(captured, module_meta)
        payload[name] = to_torch_plain(captured, name, allow_pickle=allow_pickle)
        kinds[name] = kind
        namespaces.extend([name, *p] for p in _state.namespace_paths(captured))
    payload[PT_META] = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "created": now(),
        "kinds": kinds,
        "namespaces": namespaces,
        "metrics": {k: number(k, v) for k, v in (metrics or {}).items()},
        "metadata": to_torch_plain(dict(metadata or {}), "metadata"),
        "rng": _state.capture_rng() if rng else None,
    }
    try:
        with atomic_file(path) as temp, open(temp, "wb") as f:
            # A Python file object, so a full disk surfaces as an OSError.
            torch.save(payload, f)
    except OSError as exc:
        disk = disk_error(exc)
        if disk is None:
            raise
        raise write_error(disk, path) from disk


def save_checkpoint(
    path: PathLike,
    /,
    *,
    rng: bool = True,
    metrics: Mapping[str, object] | None = None,
    metadata: Mapping[str, object] | None = None,
    allow_pickle: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    format: Literal["native", "torch"] | None = None,
    **state: object,
) -> Path | str:
    """Save a training state, atomically.

    Each keyword is one entry: modules (saved unwrapped, under canonical names), optimizers,
    LR schedulers, GradScalers, ``torch.Generator``/numpy generators, any object with
    ``state_dict()``/``load_state_dict()``, tensors, and plain values (numbers, strings,
    None, lists, tuples, dicts, sets, bytes, dtypes, devices, paths, numpy arrays,
    ``argparse.Namespace``, dataclasses). The RNG states of Python, numpy, torch and CUDA
    are saved too unless ``rng=False``.

    Args:
        path: a ``.pt``/``.pth``/``.ckpt`` file (the tutorials' torch zip, readable by
            ``torch.load(weights_only=True)``) or a folder (the native format).
        rng: save the global RNG states.
        metrics: numbers stored in the manifest (``{"val_loss": 0.31}``).
        metadata: JSON-able values stored in the manifest.
        allow_pickle: store values that cannot be represented otherwise in a pickle side file
            (``objects.pkl``, or inside the ``.pt``); loading it then needs ``trust=True``.
        max_shard_size: largest safetensors shard of the native format (``"256MB"``).
        format: ``"native"`` or ``"torch"``, to override the suffix.
        **state: the entries to save. Names starting with ``__`` are reserved.

    Returns:
        The path written (the URL, for a URL).

    Raises:
        UnsupportedValueError: a value that cannot be stored without pickle; the message
            names its path in the state (``extra.callback``).
        CheckpointWriteError: the disk refused a write; nothing was committed.
        InvalidArgumentError: an unknown ``format``, a reserved ``__`` name, or a path that
            is a file (native) or a folder that is not a checkpoint.

    Example:
        >>> save_checkpoint("ckpt/epoch-3", model=model, optimizer=opt, epoch=3, args=args)

    ``path`` may be an fsspec URL (``s3://bucket/ckpt.pt``): written locally, then uploaded
    (a folder's manifest last); the URL is returned.
    """
    if needs_staging(path):
        with writable(path) as local:
            save_checkpoint(
                local,
                rng=rng,
                metrics=metrics,
                metadata=metadata,
                allow_pickle=allow_pickle,
                max_shard_size=max_shard_size,
                format=format,
                **state,
            )
        return os.fspath(path)
    target = _as_path(path, "save_checkpoint")
    if _format_for(target, format) == "torch":
        _save_torch(
            target, state, rng=rng, allow_pickle=allow_pickle, metrics=metrics, metadata=metadata
        )
        return target
    snapshot = take_snapshot(
        state, rng=rng, allow_pickle=allow_pickle, metrics=metrics, metadata=metadata
    )
    return write_native(snapshot, target, max_shard_size=max_shard_size)


def load_checkpoint(
    path: PathLike,
    /,
    *,
    rng: bool = True,
    verify: bool = False,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    strict: bool = True,
    device: str | torch.device | None = None,
    sha256: str | None = None,
    check_hash: bool = False,
    **targets: object,
) -> dict[str, Any]:
    """Load a training state, restoring the objects passed as keywords in place.

    Modules get their weights (``module.``/``_orig_mod.`` prefixes are matched either way);
    optimizers, schedulers, scalers, generators and other ``Stateful`` objects their
    ``load_state_dict``; tensors are copied into. A Namespace or dataclass passed as a target
    shapes the value returned. Every target is checked before any is changed.

    Other files than torchkeep's load too: a ``.pt``/``.ckpt`` dict saved by ``torch.save``
    restores ``model=`` from ``model``, ``model_state_dict`` or ``state_dict`` and the other
    targets from ``<name>_state_dict`` (the tutorials' names). Without trust, classes the file
    names are never imported: a pickled model (``{"model": Net(), ...}``) gives its weights
    (``model_state_dict`` wins when both are there), and configuration (Lightning's
    ``hyper_parameters``, omegaconf configs) comes back as inert stand-ins holding the
    pickled state; any other object of a class that is not allowlisted needs ``trust=True``.
    ``argparse.Namespace`` values come back as Namespaces from both layouts.

    Args:
        path: a native checkpoint folder or a ``.pt`` file (read through the safe unpickler).
        rng: restore the saved RNG states.
        verify: hash every tensor against the checksum recorded at save time.
        trust: allow pickled objects (``allow_pickle=True`` saves, untrusted ``.pt`` globals).
        allow_globals: ``"module.name"`` classes the allowlist accepts besides its own, so
            pickled objects of those classes load without ``trust`` (nothing else runs).
        strict: refuse module states whose names or shapes do not match exactly.
        device: where returned tensors go: None (the default) puts them on the CPU;
            objects restored in place keep their own devices.
        sha256: the file's expected SHA-256 (hex, or a prefix of it).
        check_hash: take the expected hash prefix from the file name (torch.hub style).
        **targets: objects to restore, by entry name.

    ``path`` may be an ``http(s)://`` URL (downloaded once into ``$TORCHKEEP_CACHE``) or an
    fsspec URL (``s3://...``).

    Returns:
        ``{name: value}`` for every entry not restored in place.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptFileError: not committed, truncated or inconsistent.
        ChecksumError: with ``verify``, a tensor's bytes changed since it was saved.
        UnsafeFileError: pickled content without ``trust=True``.
        KeyMismatchError: a target has no entry, or a module's names do not match.
        InvalidStateError: a target's entry holds stand-ins for classes that were not
            imported (pass ``trust=True``), or is not what the target loads.
        DeviceError: ``device`` is not available on this machine.

    Example:
        >>> extra = load_checkpoint("ckpt/epoch-3", model=model, optimizer=opt)
        >>> extra["epoch"]
        3
    """
    staged = (
        readable(path, sha256=sha256, check_hash=check_hash)
        if needs_staging(path, sha256, check_hash)
        else contextlib.nullcontext(path)
    )
    with staged as local:
        return restore_from(
            local,
            targets,
            rng=rng,
            verify=verify,
            trust=trust,
            allow_globals=allow_globals,
            strict=strict,
            device=device,
        )


def restore_from(
    path: PathLike,
    targets: Mapping[str, object],
    *,
    rng: bool,
    verify: bool,
    trust: bool,
    allow_globals: Iterable[str],
    strict: bool,
    device: str | torch.device | None,
) -> dict[str, Any]:
    """:func:`load_checkpoint` of a local path, with the targets as a mapping."""
    source = _as_path(path, "load_checkpoint")
    check_device(device, f"load {str(source)!r}")
    if source.name == MANIFEST and source.is_file():
        source = source.parent
    if not source.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {str(source)!r}: the path does not exist")
    if source.is_dir():
        # Kept open while targets are restored: module tensors are read straight into them.
        with NativeCheckpoint(source, verify=verify) as ckpt:
            values, rng_state = _decode_native(
                ckpt, targets, verify=verify, trust=trust, allow_globals=allow_globals, rng=rng
            )
            return _state.restore_all(
                values,
                targets,
                strict=strict,
                device=device,
                where=str(source),
                rng_state=rng_state,
            )
    values, rng_state = _decode_torch(
        source, targets, verify=verify, trust=trust, allow_globals=allow_globals, rng=rng
    )
    return _state.restore_all(
        values, targets, strict=strict, device=device, where=str(source), rng_state=rng_state
    )


__all__ = [
    "CheckpointWriteError",
    "NativeCheckpoint",
    "StagingPool",
    "UnsupportedValueError",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "take_snapshot",
    "write_native",
]
