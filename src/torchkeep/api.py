"""The public verbs: a thin composition of formats, key mapping and storage."""

from __future__ import annotations

import dataclasses
import inspect as _pyinspect
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, overload

import torch

from torchkeep._assign import assign_into, cast_floating
from torchkeep._info import CheckpointInfo
from torchkeep._keys import Patterns, RenameRules, plan_keys, strip_compile_segments
from torchkeep._locate import needs_staging, readable, writable
from torchkeep._module_info import ModuleInfo, inspect_module
from torchkeep._report import LoadReport, ShapeMismatch
from torchkeep._tensors import (
    check_saveable,
    dtype_name,
    find_aliases,
    to_cpu_contiguous,
)
from torchkeep.errors import (
    CorruptFileError,
    DeviceError,
    InvalidStateError,
    KeyMismatchError,
)
from torchkeep.formats._base import OpenOptions, Source, WriteRequest
from torchkeep.formats.registry import SAFETENSORS, SHARDED, for_writing, open_source
from torchkeep.storage.local import atomic_dir, atomic_file

PathLike = str | os.PathLike[str]
Device = str | torch.device | Mapping[str, str] | None

# Where checkpoint dicts commonly keep model weights, most likely first.
PREFERRED_ENTRIES = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_state",
    "weights",
    "params",
    "ema",
    "model_ema",
    "state_dict_ema",
    "ema_state_dict",
)


# --------------------------------------------------------------------------------------- save


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DataParallel, DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        else:
            return module


def state_of(obj: object) -> dict[str, torch.Tensor]:
    """The flat tensor state of a module (under canonical names) or of a state dict."""
    if _pyinspect.ismethod(obj) and obj.__name__ == "state_dict":
        raise InvalidStateError(
            "got the method model.state_dict itself, not its result: call it, "
            "torchkeep.save(model.state_dict(), path), or pass the model: "
            "torchkeep.save(model, path)"
        )
    if isinstance(obj, torch.nn.Module):
        raw = unwrap(obj).state_dict()
        state = {strip_compile_segments(name): value for name, value in raw.items()}
        source = f"{type(obj).__name__}.state_dict()"
    elif isinstance(obj, Mapping):
        state = dict(obj)
        source = "the state dict"
    elif isinstance(obj, torch.Tensor):
        raise InvalidStateError(
            "got a single tensor; weights files map names to tensors: save {'name': tensor}"
        )
    else:
        hint = ""
        if hasattr(obj, "state_dict"):
            hint = (
                f" A {type(obj).__name__} is training state, not weights: save it with "
                "torchkeep.save_checkpoint(path, model=..., optimizer=...)."
            )
        raise InvalidStateError(
            f"cannot save a {type(obj).__module__}.{type(obj).__qualname__}: pass an "
            f"nn.Module or a state dict {{name: tensor}}.{hint}"
        )
    for name, value in state.items():
        if not isinstance(name, str):
            raise InvalidStateError(f"{source} has a key {name!r} that is not a string")
        if not isinstance(value, torch.Tensor):
            raise InvalidStateError(
                f"{source} holds a {type(value).__name__} at {name!r}, not a tensor; weights "
                "files hold tensors only. Save training state (epoch, loss, optimizer, ...) "
                "with torchkeep.save_checkpoint."
            )
    if not state:
        raise InvalidStateError(
            f"{source} holds no tensors, so there is nothing to save"
            + (
                " (a module without parameters or buffers)"
                if isinstance(obj, torch.nn.Module)
                else ""
            )
        )
    return state


def parse_size(size: int | str) -> int:
    """``"500MB"``, ``"2GB"``, ``"1GiB"`` or a byte count -> bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"shard size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*", size.lower())
    if not match:
        raise ValueError(f"cannot read size {size!r}; write it like '500MB' or '2GB'")
    number, unit = float(match.group(1)), match.group(2) or "b"
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0]) if unit[0] != "b" else 0
    return int(number * base**power)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    # A view keeps its whole storage alive; torch.save would write all of it.
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def save(
    obj: torch.nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    format: str | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
    durable: bool = True,
) -> Path | str:
    """Save a model's weights or a state dict, atomically.

    The format comes from the suffix: ``.safetensors`` (recommended) or ``.pt``/``.pth``/
    ``.bin``/``.pkl``/``.ckpt`` (a torch zip file that ``torch.load(weights_only=True)``
    reads). With ``max_shard_size`` the path is a folder of safetensors shards plus a
    ``model.safetensors.index.json`` weight map.

    Modules wrapped in DataParallel, DistributedDataParallel or ``torch.compile`` are saved
    under their plain names. Tied weights are stored once and load back tied. The file is
    written under a temporary name, fsynced and renamed: an existing file at ``path`` is
    replaced whole or not at all.

    Args:
        obj: an ``nn.Module`` or a ``{name: tensor}`` mapping.
        path: destination file (or folder, when sharded), or an fsspec URL
            (``s3://bucket/model.safetensors``): written locally, then uploaded with the
            folder's index uploaded last.
        format: ``"safetensors"``, ``"torch"``, ``"torch-legacy"`` or ``"sharded"``, to
            override the suffix.
        metadata: strings stored with the tensors (safetensors ``__metadata__``).
        max_shard_size: largest shard, in bytes or as ``"2GB"``; implies a sharded folder.
        durable: fsync before and after the rename (turn off only for scratch files).

    Returns:
        The path (or URL) written.

    Raises:
        InvalidStateError: ``obj`` holds no tensors, holds non-tensors, or is the
            ``state_dict`` method rather than its result.

    Example:
        >>> torchkeep.save(model, "model.safetensors")
    """
    if needs_staging(path):
        with writable(path) as local:
            save(obj, local, format=format, metadata=metadata, max_shard_size=max_shard_size)
        return os.fspath(path)
    target = Path(path)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    fmt = for_writing(target, format, sharded=shard_bytes is not None)
    state = state_of(obj)
    for name, tensor in state.items():
        if (
            fmt.name in (SAFETENSORS.name, SHARDED.name)
            or tensor.layout != torch.strided
            or tensor.device.type == "meta"
        ):
            check_saveable(name, tensor)
    aliases = find_aliases(state)
    tensors = {
        name: _compact(to_cpu_contiguous(t)) for name, t in state.items() if name not in aliases
    }
    text = {str(k): str(v) for k, v in (metadata or {}).items()}
    request = WriteRequest(tensors, aliases, text, shard_bytes, tuple(state), durable=durable)
    if fmt.is_folder:
        with atomic_dir(target, durable=durable) as temp_dir:
            fmt.write(request, temp_dir)
    else:
        with atomic_file(target, durable=durable) as temp_file:
            fmt.write(request, temp_file)
    return target


# --------------------------------------------------------------------------------------- load


def _map_location(device: Device, path: str) -> Any:
    """A torch.load ``map_location`` that refuses unavailable devices with a clear error."""
    mapping = dict(device) if isinstance(device, Mapping) else None
    fixed = None if mapping is not None else str(device if device is not None else "cpu")

    def restore(storage: Any, location: str) -> Any:
        target = fixed if mapping is None else mapping.get(location, location)
        assert target is not None
        kind = torch.device(target).type
        if kind == "cuda" and not torch.cuda.is_available():
            saved = f"saved on {location}" if location != target else f"mapped to {target}"
            raise DeviceError(
                f"{path!r} holds tensors {saved}, but CUDA is not available here; load them "
                f"on the CPU with device='cpu' (the default), or map devices explicitly, for "
                f"example device={{'{location}': 'cpu'}}"
            )
        return torch.serialization.default_restore_location(  # type: ignore[no-untyped-call]
            storage, target
        )

    return restore


def _plain_device(device: Device) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, Mapping):
        return str(device.get("cpu", "cpu"))
    return str(device)


def _open(
    path: PathLike,
    *,
    device: Device,
    trust: bool,
    allow_globals: Iterable[str],
    mmap: bool = False,
) -> Source:
    where = os.fspath(path)
    plain = _plain_device(device)
    if torch.device(plain).type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"cannot load {where!r} onto {plain}: CUDA is not available here")
    options = OpenOptions(
        map_location=_map_location(device, where) if device not in (None, "cpu") else "cpu",
        device=plain,
        trust=trust,
        allow_globals=tuple(allow_globals),
        mmap=mmap,
    )
    return open_source(Path(where), options)


def _no_tensors(source: Source) -> CorruptFileError:
    what = ", ".join(sorted(source.extras)) or "nothing"
    return CorruptFileError(
        f"{source.path!r} ({source.format}) holds no tensors to load; its top level holds: {what}"
    )


def default_entry(source: Source, entry: str | None = None) -> str:
    """The entry holding the weights when there is no model to match against."""
    entries = source.entries()
    if entry is not None:
        if entry not in entries:
            raise KeyError(
                f"{source.path!r} has no tensor dict {entry!r}; it has: "
                + ", ".join(repr(e) for e in entries)
            )
        return entry
    if not entries:
        raise _no_tensors(source)
    if "" in entries:
        return ""
    for name in PREFERRED_ENTRIES:
        if name in entries:
            return name
    return max(entries, key=lambda e: len(entries[e]))


def load_state_dict(
    path: PathLike,
    *,
    device: Device = "cpu",
    entry: str | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    verify: bool = False,
    dtype: torch.dtype | None = None,
    sha256: str | None = None,
    check_hash: bool = False,
) -> dict[str, torch.Tensor]:
    """Read the weights in any supported file as a flat ``{name: tensor}`` dict.

    The format is detected from the bytes. For checkpoint dicts the weights are taken from
    the member that holds them (``state_dict``, ``model_state_dict``, ``model``, ...), or from
    ``entry``. Names are returned as stored; :func:`load` fixes prefixes against a model.

    Args:
        path: file or folder.
        device: where tensors go: ``"cpu"`` (default, works for files saved on CUDA), a device,
            or a map such as ``{"cuda:1": "cuda:0"}``.
        entry: which tensor dict of a checkpoint dict to return.
        trust: unpickle without the allowlist. Only for files whose author you trust.
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.
        verify: check stored checksums (safetensors written by torchkeep, zip CRCs).
        dtype: cast floating-point tensors to this dtype (integer buffers keep theirs).
        sha256: the file's expected SHA-256 (hex, or a prefix of it).
        check_hash: take the expected hash prefix from the file name (torch.hub style,
            ``name-<hex>.pth``).

    ``path`` may be an ``http(s)://`` URL (downloaded once into ``$TORCHKEEP_CACHE``) or an
    fsspec URL (``s3://...``).

    Raises:
        CheckpointNotFoundError, CorruptFileError, UnknownFormatError, UnsafeFileError,
        DeviceError, ChecksumError, DownloadError: see :mod:`torchkeep.errors`.
    """
    if needs_staging(path, sha256, check_hash):
        with readable(path, sha256=sha256, check_hash=check_hash) as local:
            return load_state_dict(
                local,
                device=device,
                entry=entry,
                trust=trust,
                allow_globals=allow_globals,
                verify=verify,
                dtype=dtype,
            )
    with _open(path, device=device, trust=trust, allow_globals=allow_globals) as source:
        chosen = default_entry(source, entry)
        if verify:
            source.verify(chosen)
        out: dict[str, torch.Tensor] = {}
        aliases = source.aliases(chosen)
        for name in source.entries()[chosen]:
            target = aliases.get(name)
            out[name] = out[target] if target in out else source.get(chosen, name)
        return out if dtype is None else cast_floating(out, dtype)


def _choose_entry(
    source: Source, dest: Mapping[str, torch.Tensor], entry: str | None, **rules: Any
) -> str:
    entries = source.entries()
    if entry is not None or len(entries) <= 1:
        return default_entry(source, entry)
    scores: dict[str, int] = {}
    for name, infos in entries.items():
        plan = plan_keys(infos, dest, **rules)
        scores[name] = sum(
            infos[src].shape == tuple(dest[dst].shape) for dst, src in plan.pairs.items()
        )
    preference = {name: i for i, name in enumerate(PREFERRED_ENTRIES)}
    return max(entries, key=lambda e: (scores[e], -preference.get(e, len(preference))))


def _destination(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: value
        for name, value in model.state_dict(keep_vars=True).items()
        if isinstance(value, torch.Tensor)
    }


def load(
    model: torch.nn.Module,
    path: PathLike,
    *,
    strict: bool = True,
    device: Device = None,
    rename: RenameRules = None,
    include: Patterns = None,
    exclude: Patterns = None,
    entry: str | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    verify: bool = False,
    dtype: torch.dtype | None = None,
    assign: bool = False,
    sha256: str | None = None,
    check_hash: bool = False,
) -> LoadReport:
    """Load the weights in any supported file into ``model``, in place.

    Names are matched against the model: ``module.`` (DataParallel/DDP), ``_orig_mod.``
    (``torch.compile``) and ``model.`` (Lightning) prefixes are added or removed as needed,
    and ``rename`` rules fix anything else. Each tensor is copied to where the model's
    parameter lives, cast to its dtype.

    Args:
        model: the destination module (plain or wrapped).
        path: file or folder in any supported format.
        strict: raise :class:`~torchkeep.errors.KeyMismatchError` (loading nothing) on any
            missing, unexpected or shape-mismatched name. With ``strict=False`` everything
            that fits is loaded and the rest is reported, never raised.
        device: move the model here first (a map such as ``{"cuda:1": "cuda:0"}`` only
            changes where the file's tensors are read to).
        rename: ``{regex: replacement}`` rules (or a list of pairs, or a function) applied
            to the file's names before matching.
        include: glob patterns (``"backbone.*"``, or a module name ``"backbone"``); only
            matching names are loaded or checked.
        exclude: glob patterns of names to leave out (a new head: ``"head"``).
        entry: which tensor dict of a checkpoint dict to use (found automatically otherwise).
        trust: unpickle without the allowlist. Only for files whose author you trust.
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.
        verify: check stored checksums before loading.
        dtype: cast the model's floating-point parameters and buffers to this dtype first
            (``torch.bfloat16``); the file's tensors are cast as they are read.
        assign: low-memory loading. Instead of copying into the model's tensors, each one is
            replaced by the tensor read from the file (``load_state_dict(assign=True)``), so a
            model built on the meta device (``with torch.device("meta"): model = Net()``)
            never allocates its own weights: peak memory stays near one copy of them. Tensors
            are created on ``device`` (default CPU) in the model's dtype (or ``dtype``).
        sha256: the file's expected SHA-256 (hex, or a prefix of it).
        check_hash: take the expected hash prefix from the file name (torch.hub style).

    ``path`` may be an ``http(s)://`` URL (downloaded once into ``$TORCHKEEP_CACHE``) or an
    fsspec URL (``s3://...``).

    Returns:
        A :class:`~torchkeep.LoadReport` of what was loaded, missing, unexpected, mismatched,
        renamed and cast.

    Example:
        >>> report = torchkeep.load(model, "checkpoint.pt", strict=False, exclude="fc")
        >>> print(report)
    """
    if isinstance(model, (str, os.PathLike)) and isinstance(path, torch.nn.Module):
        raise InvalidStateError("arguments are swapped: call torchkeep.load(model, path)")
    if not isinstance(model, torch.nn.Module):
        raise InvalidStateError(
            f"load() takes an nn.Module to load into, got a {type(model).__name__}; "
            "use torchkeep.load_state_dict(path) to get the tensors as a dict"
        )
    if needs_staging(path, sha256, check_hash):
        with readable(path, sha256=sha256, check_hash=check_hash) as local:
            report = load(
                model,
                local,
                strict=strict,
                device=device,
                rename=rename,
                include=include,
                exclude=exclude,
                entry=entry,
                trust=trust,
                allow_globals=allow_globals,
                verify=verify,
                dtype=dtype,
                assign=assign,
            )
        return dataclasses.replace(report, path=os.fspath(path))
    read_device: Device = None
    if isinstance(device, Mapping):
        read_device = device
    elif device is not None:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"cannot move the model to {device}: CUDA is not available here")
        if assign:
            read_device = device
        else:
            model.to(device)
    if dtype is not None:
        model.to(dtype)  # floating-point tensors only; works on meta models too
    dest = _destination(model)
    rules: dict[str, Any] = {"rename": rename, "include": include, "exclude": exclude}
    with _open(
        path, device=read_device, trust=trust, allow_globals=allow_globals, mmap=True
    ) as source:
        chosen = _choose_entry(source, dest, entry, **rules)
        infos = source.entries()[chosen]
        plan = plan_keys(infos, dest, **rules)
        fits: list[tuple[str, str]] = []
        mismatched: list[ShapeMismatch] = []
        cast: list[tuple[str, str, str]] = []
        for dst, src in plan.pairs.items():
            info, target = infos[src], dest[dst]
            if info.shape != tuple(target.shape):
                mismatched.append(ShapeMismatch(dst, src, info.shape, tuple(target.shape)))
                continue
            fits.append((dst, src))
            if info.dtype != dtype_name(target.dtype):
                cast.append((dst, info.dtype, dtype_name(target.dtype)))
        report = LoadReport(
            path=source.path,
            format=source.format,
            entry=chosen,
            loaded=tuple(dst for dst, _ in fits),
            missing=plan.missing,
            unexpected=plan.unexpected,
            mismatched=tuple(mismatched),
            renamed=plan.renamed,
            cast=tuple(cast),
            skipped=plan.skipped,
        )
        if strict and not report.ok:
            refused = dataclasses.replace(report, loaded=())
            raise KeyMismatchError(
                "strict load refused, nothing was loaded:\n"
                + refused.table(problems_only=True)
                + "\nPass strict=False to load what fits, include=/exclude= to load part of "
                "the model, or rename= to fix names.",
                refused,
            )
        if verify:
            source.verify(chosen)
        if assign:
            assign_into(model, source, chosen, fits, dest)
            return report
        with torch.no_grad():
            source.read_into_many(chosen, [(src, dest[dst]) for dst, src in fits])
    return report


# ------------------------------------------------------------------------------------ inspect


def _short(value: Any, limit: int = 100) -> str:
    if isinstance(value, Mapping):
        text = f"dict with {len(value)} keys"
    elif isinstance(value, (list, tuple)) and len(value) > 8:
        text = f"{type(value).__name__} of {len(value)} items"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _disk_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@overload
def inspect(path: torch.nn.Module) -> ModuleInfo: ...


@overload
def inspect(
    path: PathLike,
    *,
    entry: str | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
) -> CheckpointInfo: ...


def inspect(
    path: PathLike | torch.nn.Module,
    *,
    entry: str | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
) -> CheckpointInfo | ModuleInfo:
    """Describe a file without reading its tensor data (where the format allows), or a model.

    safetensors headers and torch zip pickles are read; tensor bytes are not. Given a live
    ``nn.Module``, returns its tree, parameter names, shapes, dtypes, devices, which are
    trainable or frozen, and gradient presence and norms.

    Args:
        path: file or folder in any supported format, or an ``nn.Module``.
        entry: which tensor dict of a checkpoint dict to describe.
        trust: unpickle without the allowlist. Only for files whose author you trust.
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.

    Returns:
        A :class:`~torchkeep.CheckpointInfo` for a path, a :class:`~torchkeep.ModuleInfo`
        for a module.
    """
    if isinstance(path, torch.nn.Module):
        return inspect_module(path)
    if needs_staging(path):
        with readable(path, header_only=True) as local:
            info = inspect(local, entry=entry, trust=trust, allow_globals=allow_globals)
        return dataclasses.replace(info, path=os.fspath(path))
    where = Path(os.fspath(path))
    options = OpenOptions(device="meta", trust=trust, allow_globals=tuple(allow_globals))
    with open_source(where, options) as source:
        entries = source.entries()
        chosen = default_entry(source, entry) if entries else ""
        tensors = tuple(entries.get(chosen, {}).values())
        return CheckpointInfo(
            path=source.path,
            format=source.format,
            size=_disk_size(where),
            entry=chosen,
            entries={name: len(infos) for name, infos in entries.items()},
            tensors=tensors,
            metadata=dict(source.metadata),
            extras={k: _short(v) for k, v in source.extras.items()},
            modules=tuple(source.module_trees.get(chosen, ())),
            stubbed=tuple(source.stubbed),
        )


__all__ = [
    "inspect",
    "load",
    "load_state_dict",
    "save",
]
