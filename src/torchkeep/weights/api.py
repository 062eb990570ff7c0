"""The public verbs: a thin composition of formats, key mapping and storage."""

from __future__ import annotations

import dataclasses
import inspect as _pyinspect
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, overload

import torch
from torch.nn.parameter import is_lazy

from torchkeep._common import PathLike, parse_size, unwrap
from torchkeep._device import check_device, check_devices
from torchkeep._facts import numel
from torchkeep._progress import ProgressOption, counter, meter
from torchkeep._tensors import (
    check_saveable,
    find_aliases,
    is_plain,
    stored_shape,
    tensor_info,
    to_cpu_contiguous,
)
from torchkeep.errors import (
    DeviceError,
    InvalidArgumentError,
    InvalidStateError,
    KeyMismatchError,
    TorchkeepWarning,
)
from torchkeep.formats._base import OpenOptions, Source, WriteRequest
from torchkeep.formats._guard import reading
from torchkeep.formats.native import NativeSource
from torchkeep.formats.registry import TORCH_ZIP, detect, for_writing, open_format, open_source
from torchkeep.formats.safetensors import SafetensorsSource
from torchkeep.formats.sharded import ShardedSource
from torchkeep.storage.local import atomic_dir, atomic_file
from torchkeep.storage.locate import needs_staging, readable, writable
from torchkeep.weights.assign import (
    assign_into,
    cast_floating,
    check_floating,
    retie,
    warn_meta_left,
)
from torchkeep.weights.entries import BOOKKEEPING, Choice, choose_entry, default_entry, segments
from torchkeep.weights.info import CheckpointInfo, header_info
from torchkeep.weights.keys import (
    KeyPlan,
    Patterns,
    RenameRules,
    matches_any,
    pattern_list,
    plan_keys,
    strip_compile_segments,
)
from torchkeep.weights.loading import Loader, Outcome, warn_conflicts
from torchkeep.weights.module_info import ModuleInfo, inspect_module
from torchkeep.weights.report import LoadReport, refusal
from torchkeep.weights.summary import bookkeeping, summarize, text

Device = str | torch.device | Mapping[str, str] | None

# --------------------------------------------------------------------------------------- save


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


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    if not is_plain(tensor):
        return tensor  # sparse, quantized, nested: torch.save writes their parts as they are
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
    progress: ProgressOption = None,
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
        progress: ``True`` for a progress bar on stderr (notebooks show it too), or a
            function called with (bytes written, bytes in all); off by default.

    Returns:
        The path (or URL) written.

    Raises:
        InvalidStateError: ``obj`` holds no tensors, holds non-tensors, or is the
            ``state_dict`` method rather than its result.

    Example:
        >>> torchkeep.save(model, "model.safetensors")
    """
    if isinstance(obj, str | os.PathLike) and isinstance(path, torch.nn.Module | Mapping):
        raise InvalidStateError("arguments are swapped: call torchkeep.save(model, path)")
    _path_text(path, "save")
    if needs_staging(path):
        with writable(path) as local:
            save(
                obj,
                local,
                format=format,
                metadata=metadata,
                max_shard_size=max_shard_size,
                durable=durable,
                progress=progress,
            )
        return os.fspath(path)
    target = Path(path)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    fmt = for_writing(target, format, sharded=shard_bytes is not None)
    state = state_of(obj)
    for name, tensor in state.items():
        check_saveable(name, tensor, fmt.name)
    aliases = find_aliases(state)
    tensors = {
        name: _compact(to_cpu_contiguous(t)) for name, t in state.items() if name not in aliases
    }
    text = {str(k): str(v) for k, v in (metadata or {}).items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with meter(progress, f"saving {target.name}", total) as counted:
        request = WriteRequest(
            tensors, aliases, text, shard_bytes, tuple(state), durable, counter(counted)
        )
        if fmt.is_folder:
            with atomic_dir(target, durable=durable) as temp_dir:
                fmt.write(request, temp_dir)
        else:
            with atomic_file(target, durable=durable) as temp_file:
                fmt.write(request, temp_file)
    return target


# --------------------------------------------------------------------------------------- load


def _path_text(path: object, verb: str) -> str:
    """``path`` as text, or a typed error when it is not a path (swapped arguments)."""
    if isinstance(path, torch.nn.Module):
        raise InvalidStateError(
            f"got a model where a path belongs: {verb}() takes the path first here"
            if verb != "load"
            else "got a model where a path belongs: call torchkeep.load(model, path)"
        )
    if not isinstance(path, str | os.PathLike):
        raise InvalidStateError(
            f"{verb}() takes a path (str or os.PathLike), got a {type(path).__name__}"
        )
    return os.fspath(path)


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
    where = _path_text(path, "load")
    check_devices(device, f"load {where!r}")
    plain = _plain_device(device)
    options = OpenOptions(
        map_location=_map_location(device, where) if device not in (None, "cpu") else "cpu",
        device=plain,
        trust=trust,
        allow_globals=tuple(allow_globals),
        mmap=mmap,
    )
    return open_source(Path(where), options)


def load_state_dict(
    path: PathLike,
    *,
    device: Device = None,
    entry: str | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    verify: bool = False,
    dtype: torch.dtype | None = None,
    sha256: str | None = None,
    check_hash: bool = False,
) -> dict[str, Any]:
    """Read the weights in any supported file as a flat ``{name: tensor}`` dict.

    The format is detected from the bytes. For checkpoint dicts the weights are taken from
    the member that holds them, by one rule shared with :func:`load`, :func:`inspect` and
    ``convert``: a named state dict (``state_dict``, ``model_state_dict``, ``model``, ...)
    wins over root-level scalars (``loss``, ``best_acc1``), RNG and optimizer state; or from
    ``entry``. Names are returned as stored (a pickled DataParallel/DDP/compiled model under
    its inner model's names); :func:`load` fixes prefixes against a model. Non-tensor values
    a module's own loading needs (quantized packed parameters, ``_extra_state``) and torch's
    module versions (``_metadata``) are kept, so ``model.load_state_dict(result)`` behaves as
    it does for ``torch.load``'s result.

    Args:
        path: file or folder.
        device: where tensors go: None (the default) puts them on the CPU, which works for
            files saved on CUDA; or a device, or a map such as ``{"cuda:1": "cuda:0"}``.
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
    _path_text(path, "load_state_dict")
    if dtype is not None:
        check_floating(dtype, "load_state_dict")
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
        aliases = source.aliases(chosen)
        # A tied name whose tensor comes earlier shares it; every other name is read.
        read: list[str] = []
        seen: set[str] = set()
        for name in source.entries()[chosen]:
            if aliases.get(name) not in seen:
                read.append(name)
            seen.add(name)
        if isinstance(source, SafetensorsSource | ShardedSource | NativeSource):
            # All at once, in parallel, straight into the new tensors; with verify, each is
            # hashed as it lands and the file's other tensors are checked after.
            tensors = source.read_many(chosen, read, verify=verify)
        else:
            if verify:
                source.verify(chosen)
            tensors = {name: source.get(chosen, name) for name in read}
        out: dict[str, Any] = OrderedDict()
        for name in source.entries()[chosen]:
            out[name] = tensors[name] if name in tensors else out[aliases[name]]
        # What a module's own loading needs beside tensors (quantized packed parameters,
        # _extra_state) and torch's module versions, so model.load_state_dict(...) of the
        # result behaves as it does for torch.load's.
        out.update(source.values(chosen))
        versions = source.module_versions(chosen)
        result = out if dtype is None else OrderedDict(cast_floating(out, dtype))
        if versions is not None:
            result._metadata = OrderedDict(versions)  # type: ignore[attr-defined]
        return result


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {
        name: stored_shape(value)
        for name, value in state.items()
        if isinstance(value, torch.Tensor) and not is_lazy(value)
    }


def _plan(
    source: Source,
    entry: str,
    state: Mapping[str, Any],
    dest_shapes: Mapping[str, tuple[int, ...]],
    rules: Mapping[str, Any],
) -> KeyPlan:
    infos = source.entries()[entry]
    names = [*infos, *source.values(entry)]
    return plan_keys(
        names,
        list(state),
        source_shapes={name: info.shape for name, info in infos.items()},
        dest_shapes=dest_shapes,
        **rules,
    )


def _choose_for_model(
    source: Source,
    state: Mapping[str, Any],
    dest_shapes: Mapping[str, tuple[int, ...]],
    entry: str | None,
    rules: Mapping[str, Any],
) -> Choice:
    """The entry whose names and shapes match the most of the model; rank and convention
    break ties (see :mod:`torchkeep.weights.entries`)."""
    if entry is not None or len(source.entries()) <= 1:
        return choose_entry(source, entry)

    def match(infos: Mapping[str, Any]) -> int:
        try:
            plan = plan_keys(
                infos,
                list(state),
                source_shapes={name: info.shape for name, info in infos.items()},
                dest_shapes=dest_shapes,
                **rules,
            )
        except (InvalidArgumentError, KeyMismatchError):
            return 0
        return sum(infos[src].shape == dest_shapes.get(dst) for dst, src in plan.pairs.items())

    choice = choose_entry(source, match=match)
    if rules.get("rename") is not None:
        plain = dict(rules, rename=None)
        without = _choose_for_model(source, state, dest_shapes, None, plain)
        if without.entry != choice.entry:
            warnings.warn(
                f"rename= changed which tensor dict of {source.path!r} is loaded: "
                f"{choice.entry!r} instead of {without.entry!r}; pass entry= to choose",
                TorchkeepWarning,
                stacklevel=4,
            )
    return choice


def _check_patterns(
    plan: KeyPlan, state: Mapping[str, Any], include: Patterns, exclude: Patterns
) -> None:
    """An include= pattern that matches nothing is an error; an exclude= one a warning."""
    names = [*state, *plan.translated.values(), *plan.translated]
    examples = ", ".join(repr(n) for n in list(state)[:4])
    for pattern in pattern_list(include):
        if not any(matches_any(name, pattern) for name in names):
            raise InvalidArgumentError(
                f"include={pattern!r} matches no name in the model or the file, so nothing "
                f"would load; the model's names look like {examples}"
            )
    for pattern in pattern_list(exclude):
        if not any(matches_any(name, pattern) for name in names):
            warnings.warn(
                f"exclude={pattern!r} matches no name in the model or the file (names look "
                f"like {examples}); nothing was excluded by it",
                TorchkeepWarning,
                stacklevel=4,
            )


def _report(
    source: Source, choice: Choice, plan: KeyPlan, outcome: Outcome, loader: Loader
) -> LoadReport:
    notes = []
    if plan.ambiguous:
        notes.append(
            "several prefixes would match the model's names equally well ("
            + "; ".join(plan.ambiguous)
            + "), so none was applied: pass rename= to choose"
        )
    notes += outcome.conflicts + outcome.errors
    return LoadReport(
        path=source.path,
        format=source.format,
        entry=choice.entry,
        loaded=tuple(outcome.loaded),
        missing=tuple(outcome.missing),
        unexpected=tuple(outcome.unexpected),
        mismatched=tuple(outcome.mismatched),
        renamed=plan.renamed,
        cast=tuple(outcome.cast),
        skipped=tuple(outcome.skipped),
        tied=tuple(outcome.tied),
        prefixes=plan.prefixes,
        modules=tuple(group.prefix.removesuffix(".") for group in loader.groups),
        alternatives=choice.others,
        notes=tuple(notes),
    )


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
    progress: ProgressOption = None,
) -> LoadReport:
    """Load the weights in any supported file into ``model``, in place, as torch would.

    Names are matched against the model: a prefix shared by the names on either side
    (``module.`` from DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``, a Lightning
    module's ``model.``/``net.``, a task model's ``bert.``) is found, removed or added as
    needed, and reported; ``rename`` rules fix anything else. Each tensor is copied to where
    the model's parameter lives, cast to its dtype. Submodules that take part in loading
    (load hooks such as ``weight_norm``'s, their own ``_load_from_state_dict`` such as
    quantized modules', ``set_extra_state``) are loaded by their own ``load_state_dict``. Names
    the file lacks whose tensor is tied to a loaded one (an LM head tied to the embeddings)
    are reported as tied, not missing. In a checkpoint dict, the entry matching the model best
    is used (``model`` before ``model_ema`` when both match; the report names the other).

    Args:
        model: the destination module (plain or wrapped).
        path: file or folder in any supported format.
        strict: raise :class:`~torchkeep.errors.KeyMismatchError` (loading nothing) on any
            missing, unexpected or shape-mismatched name. With ``strict=False`` everything
            that fits is loaded and the rest is reported, never raised.
        device: move the model here first (a map such as ``{"cuda:1": "cuda:0"}`` only
            changes where the file's tensors are read to).
        rename: ``{regex: replacement}`` rules (or a list of pairs, or a function) applied
            to the file's names before matching, or ``"by_position"`` to pair the file's
            tensors with the model's in order (refused unless counts and every shape agree).
        include: glob patterns (``"backbone.*"``, or a module name ``"backbone"``); only
            matching names are loaded or checked. A pattern matching nothing is an error.
        exclude: glob patterns of names to leave out (a new head: ``"head"``). A pattern
            matching nothing warns.
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
        progress: ``True`` for a progress bar on stderr (notebooks show it too), or a
            function called with (bytes read, bytes to read); off by default.

    ``path`` may be an ``http(s)://`` URL (downloaded once into ``$TORCHKEEP_CACHE``) or an
    fsspec URL (``s3://...``).

    Returns:
        A :class:`~torchkeep.LoadReport` of what was loaded, missing, unexpected, mismatched,
        renamed, cast and tied, built from what was actually written.

    Raises:
        KeyMismatchError: a strict load found problems (nothing was loaded), or nothing at all
            fits the model.
        InvalidArgumentError: an ``include=`` pattern matches nothing; bad rename rules.
        EntryNotFoundError: ``entry`` is not in the file.

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
                progress=progress,
            )
        return dataclasses.replace(report, path=os.fspath(path))
    read_device: Device = None
    if isinstance(device, Mapping):
        read_device = device
    elif device is not None:
        check_device(device, "move the model")
        if assign:
            read_device = device
        else:
            model.to(device)
    if dtype is not None:
        check_floating(dtype, "load")
        model.to(dtype)  # floating-point tensors only; works on meta models too
    rules: dict[str, Any] = {"rename": rename, "include": include, "exclude": exclude}
    state = model.state_dict(keep_vars=True)
    with _open(
        path, device=read_device, trust=trust, allow_globals=allow_globals, mmap=True
    ) as source:
        dest_shapes = _shapes(state)
        choice = _choose_for_model(source, state, dest_shapes, entry, rules)
        chosen = choice.entry
        plan = _plan(source, chosen, state, dest_shapes, rules)
        _check_patterns(plan, state, include, exclude)
        loader = Loader(model, source, chosen, plan, state)
        outcome = loader.check(trial=strict, assign=assign)
        if strict and not outcome.ok:
            raise refusal(
                _report(source, choice, plan, outcome, loader),
                "strict load refused, nothing was loaded:",
                "Pass strict=False to load what fits, include=/exclude= to load part of the "
                "model, or rename= to fix names.",
            )
        warn_conflicts(outcome)
        if verify:
            source.verify(chosen)
        tensors = loader.tensors
        infos = source.entries()[chosen]
        total = sum(infos[src].nbytes for src in plan.pairs.values() if src in infos)
        with torch.no_grad(), meter(progress, f"loading {Path(source.path).name}", total) as m:
            source.progress = counter(m)
            if assign:
                outcome = loader.write(
                    assign=True,
                    read_many=lambda fits: assign_into(model, source, chosen, fits, tensors),
                )
                for name, via in outcome.tied:
                    retie(model, name, via)
                warn_meta_left(model)
            else:
                outcome = loader.write(
                    assign=False,
                    read_many=lambda fits: source.read_into_many(
                        chosen, [(src, tensors[dst]) for dst, src in fits]
                    ),
                )
        report = _report(source, choice, plan, outcome, loader)
    if outcome.errors:
        raise KeyMismatchError(
            "loading failed inside a submodule's own load_state_dict (everything else was "
            "loaded):\n" + report.table(problems_only=True),
            report,
        )
    if not report.loaded and (report.missing or report.unexpected or report.mismatched):
        raise KeyMismatchError(
            "nothing in the file fits the model, so nothing was loaded:\n"
            + report.table(problems_only=True)
            + "\nCheck that this is the right file and model, or pass rename= to fix names "
            "(rename='by_position' pairs tensors in order).",
            report,
        )
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


def _describe_value(value: Any) -> str:
    """``(qint8 [16, 8], float32 [16])`` for tensors inside a state value, else its repr."""

    def one(item: Any) -> str:
        if isinstance(item, torch.Tensor):
            info = tensor_info("", item)
            return f"{info.dtype} [{', '.join(str(d) for d in info.shape)}]"
        return _short(item, 40)

    if isinstance(value, tuple | list):
        return "(" + ", ".join(one(item) for item in value[:8]) + ")"
    return one(value)


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
    _path_text(path, "inspect")
    if needs_staging(path):
        with readable(path, header_only=True) as local:
            info = inspect(local, entry=entry, trust=trust, allow_globals=allow_globals)
        return dataclasses.replace(info, path=os.fspath(path))
    where = Path(os.fspath(path))
    described = header_info(where, entry)
    if described is not None:
        return described  # the header says it all: what the CLI shows too
    with reading(where):
        resolved, fmt = detect(where)
    # A torch zip is mapped, not read, so that scalars beside the weights (a loss saved as a
    # tensor) can be shown; other formats are opened on meta: shapes only.
    mapped = fmt is TORCH_ZIP
    options = OpenOptions(
        device="cpu" if mapped else "meta",
        mmap=mapped,
        trust=trust,
        allow_globals=tuple(allow_globals),
    )
    with open_format(resolved, fmt, options) as source:
        return _describe_source(source, entry, _disk_size(where))


def _describe_source(source: Source, entry: str | None, size: int) -> CheckpointInfo:
    """What :func:`inspect` returns for an opened file: torchkeep's own records apart, scalar
    tensors beside the weights as values, the training state summarized."""
    found = source.entries()
    hidden = {k: len(v) for k, v in found.items() if BOOKKEEPING in segments(k)}
    choice = choose_entry(source, entry) if found else Choice("", 0)
    chosen = choice.entry
    raw = {k: v for k, v in source.extras.items() if k != chosen}
    entries = {k: len(v) for k, v in found.items() if k not in hidden}
    root = found.get("", {})
    if chosen and root and all(numel(info.shape) <= 1 for info in root.values()):
        raw.update({name: source.get("", name) for name in root})
        del entries[""]
    record = raw.get(BOOKKEEPING)
    stored_metadata = record.get("metadata") if isinstance(record, Mapping) else None
    metadata = {str(k): text(v) for k, v in (stored_metadata or {}).items()}
    records = bookkeeping(raw)
    records.pop(f"{BOOKKEEPING}.metadata", None)
    records.update({k: f"{n} tensor{'s' if n != 1 else ''}" for k, n in hidden.items()})
    return CheckpointInfo(
        path=source.path,
        format=source.format,
        size=size,
        entry=chosen,
        entries=entries,
        tensors=tuple(found.get(chosen, {}).values()),
        metadata={**metadata, **source.metadata},
        extras={k: _extra(v) for k, v in raw.items() if k != BOOKKEEPING},
        modules=tuple(source.module_trees.get(chosen, ())),
        stubbed=tuple(source.stubbed),
        alternatives=choice.others,
        values={k: _describe_value(v) for k, v in source.values(chosen).items()},
        training=summarize(raw) or None,
        bookkeeping=records,
    )


def _extra(value: Any) -> str:
    """An extra as short text: strings as they are, scalar tensors by their value."""
    if isinstance(value, str):
        return value if len(value) <= 100 else value[:97] + "..."
    if isinstance(value, torch.Tensor):
        return text(value)
    return _short(value)


__all__ = [
    "inspect",
    "load",
    "load_state_dict",
    "save",
]
