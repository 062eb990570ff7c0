"""Training state: what to save for each kind of object, how to put it back, and RNG states.

A checkpoint entry is one keyword of ``save_checkpoint``. Its *kind* decides what is stored:

- ``module``: the unwrapped module's state dict under canonical names (no ``module.`` or
  ``_orig_mod.``), plus torch's per-submodule version metadata;
- ``optimizer``, ``scheduler``, ``stateful``: ``state_dict()`` (GradScaler, user classes, ...);
- ``generator``: a ``torch.Generator``'s ``get_state()``;
- ``numpy_generator``: a ``numpy.random.Generator``'s bit generator state;
- ``value``: anything else, stored as it is (see :mod:`torchkeep.formats.tree`).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader

from torchkeep._common import unwrap
from torchkeep._tensors import is_plain
from torchkeep.errors import (
    CheckpointReadError,
    CorruptFileError,
    InvalidStateError,
    KeyMismatchError,
    TorchkeepWarning,
)
from torchkeep.formats.tree import map_tensors
from torchkeep.safety.stubs import find_stubs, is_module_like, module_state_dict
from torchkeep.weights.keys import plan_keys, strip_compile_segments
from torchkeep.weights.loading import custom_modules, owner
from torchkeep.weights.report import LoadReport, ShapeMismatch, refusal


def _is_stateful(value: object) -> bool:
    return (
        not isinstance(value, type)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


def kind_of(value: object) -> str:
    """The kind of checkpoint entry ``value`` makes (see the module docstring)."""
    if isinstance(value, torch.nn.Module):
        return "module"
    if isinstance(value, torch.optim.Optimizer):
        return "optimizer"
    schedulers = torch.optim.lr_scheduler
    if isinstance(value, schedulers.LRScheduler | schedulers.ReduceLROnPlateau):
        return "scheduler"
    if isinstance(value, torch.Generator):
        return "generator"
    if isinstance(value, np.random.Generator):
        return "numpy_generator"
    if _is_stateful(value):
        return "stateful"
    return "value"


def type_name(value: object) -> str:
    """``torch.optim.adam.Adam``: recorded for people reading the manifest."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _canonical_prefix(prefix: str) -> str:
    return strip_compile_segments(prefix + ".").removesuffix(".") if prefix else prefix


def capture(value: object) -> tuple[str, Any, dict[str, Any] | None]:
    """``(kind, state to store, module version metadata or None)`` for one entry."""
    kind = kind_of(value)
    if kind == "module":
        assert isinstance(value, torch.nn.Module)
        raw = unwrap(value).state_dict()
        state = {strip_compile_segments(name): tensor for name, tensor in raw.items()}
        metadata = getattr(raw, "_metadata", None) or {}
        return kind, state, {_canonical_prefix(p): dict(v) for p, v in metadata.items()}
    if kind == "generator":
        assert isinstance(value, torch.Generator)
        return kind, value.get_state(), None
    if kind == "numpy_generator":
        assert isinstance(value, np.random.Generator)
        return kind, value.bit_generator.state, None
    if kind != "value":
        return kind, value.state_dict(), None  # type: ignore[attr-defined]
    if isinstance(value, DataLoader):
        raise InvalidStateError(
            "a DataLoader keeps no position to save; wrap it once where it is built, "
            "loader = torchkeep.ResumableLoader(DataLoader(...)), iterate the wrapper, and save "
            "that: a restore then continues mid-epoch with the same batches"
        )
    return kind, value, None


def module_state(state: Mapping[str, Any], metadata: Mapping[str, Any] | None) -> Any:
    """A state dict carrying torch's ``_metadata`` again, as ``load_state_dict`` expects."""
    out: OrderedDict[str, Any] = OrderedDict(state)
    if metadata:
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


class TensorReader(Protocol):
    """Reads stored tensors: into new tensors, or into existing ones (see
    :meth:`torchkeep.formats.native.NativeCheckpoint.read_into`)."""

    def read(self, names: Iterable[str], *, verify: bool | None = None) -> dict[str, Any]: ...

    def read_into(
        self, pairs: Sequence[tuple[str, torch.Tensor]], *, started: set[str] | None = None
    ) -> None: ...


class StoredState(OrderedDict[str, Any]):
    """A module's saved state whose tensors are still in the checkpoint.

    Each tensor is a meta tensor of the stored dtype and shape, so the state is checked
    against a module (names, shapes) like a decoded one; :func:`read_stored` then reads the
    bytes straight into the module's own tensors, instead of into new tensors that
    ``load_state_dict`` would copy again.

    Args:
        items: the state, tensors as meta tensors.
        stored: the stored tensor name behind each meta tensor, by state name.
        reader: reads the stored tensors.
    """

    def __init__(
        self, items: Mapping[str, Any], stored: Mapping[str, str], reader: TensorReader
    ) -> None:
        super().__init__(items)
        self.stored = dict(stored)
        self.reader = reader


def _direct_target(dest: Any, saved: torch.Tensor) -> bool:
    """A module tensor that ``load_state_dict`` would fill with a plain ``copy_``, and that
    a read can fill instead."""
    return (
        type(dest) in (torch.Tensor, torch.nn.Parameter)
        and is_plain(dest)
        and not is_lazy(dest)
        and dest.device.type != "meta"
        and dest.shape == saved.shape
    )


def read_stored(
    name: str, module: torch.nn.Module, saved: StoredState, *, before: Sequence[str] | None = None
) -> OrderedDict[str, Any] | None:
    """Read a :class:`StoredState` (already checked) for ``module``: the state left to load.

    Tensors that torch's own ``load_state_dict`` would copy into the module's tensors
    unchanged (those of submodules that do not customise loading) are read straight into
    them, in one parallel batch, and handed back as the module's own tensors, which
    ``load_state_dict`` then copies onto themselves: a no-op. Submodules that customise
    loading (load hooks, their own ``_load_from_state_dict``, extra state) get new tensors,
    so that ``load_state_dict`` treats them exactly as it would a decoded state. When no
    submodule customises loading and every name was read in place, nothing is left for
    ``load_state_dict`` to do (the names were checked before), and None is returned.

    Args:
        name: the entry's name, for messages.
        module: the (unwrapped) module restored.
        saved: the checked state.
        before: when given, the targets restored before this one, and no other (which the
            message of a failed read then states).

    Raises:
        CorruptFileError: a file changed while it was read (the message says which of the
            module's tensors were overwritten).
        CheckpointReadError: a read failed (the same).
    """
    own = module.state_dict(keep_vars=True)
    custom = custom_modules(module, saved)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    direct: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in saved.items():
        if key not in saved.stored or swap or custom == [""] or owner(custom, key) is not None:
            continue
        dest = own.get(key)
        if isinstance(dest, torch.Tensor) and _direct_target(dest, value):
            direct[key] = (saved.stored[key], dest)
    fresh = saved.reader.read([ref for key, ref in saved.stored.items() if key not in direct])
    pairs: list[tuple[str, torch.Tensor]] = []
    seen: set[tuple[str, int]] = set()
    for ref, dest in direct.values():
        if (ref, id(dest)) not in seen:  # tied names stored once: read once
            seen.add((ref, id(dest)))
            pairs.append((ref, dest))
    started: set[str] = set()
    try:
        saved.reader.read_into(pairs, started=started)
    except (CorruptFileError, OSError) as exc:
        changed = [key for key, (ref, _) in direct.items() if ref in started]
        raise _partly_read(name, module, changed, len(own), before, exc) from exc
    if not custom and len(direct) == len(saved):
        return None
    state: OrderedDict[str, Any] = OrderedDict()
    for key, value in saved.items():
        if key in direct:
            state[key] = direct[key][1]
        elif key in saved.stored:
            state[key] = fresh[saved.stored[key]]
        else:
            state[key] = value
    metadata = getattr(saved, "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    return state


def _partly_read(
    name: str,
    module: torch.nn.Module,
    changed: Sequence[str],
    total: int,
    before: Sequence[str] | None,
    cause: BaseException,
) -> Exception:
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    if before is None:
        others = ""
    elif before:
        others = (
            f"; the modules restored before it ({', '.join(repr(b) for b in before)}) hold the "
            "checkpoint's values, and no other target was restored"
        )
    else:
        others = "; no other target was restored"
    message = (
        f"reading checkpoint entry {name!r} into the {type(module).__name__} passed as {name}= "
        f"failed: {cause}. The module is partly overwritten: {len(changed)} of its {total} "
        f"tensors may hold bytes from the checkpoint ({shown or 'none'}), the others keep their "
        f"values{others}. Restore it again, from this checkpoint once the file is readable or "
        "from an earlier one, before using it."
    )
    kind = CorruptFileError if isinstance(cause, CorruptFileError) else CheckpointReadError
    return kind(message)


def _module_plan(
    name: str, target: torch.nn.Module, saved: Any, strict: bool
) -> OrderedDict[str, Any]:
    """The saved state renamed to ``target``'s names, checked before anything is loaded."""
    if not isinstance(saved, Mapping):
        raise InvalidStateError(
            f"checkpoint entry {name!r} holds a {type(saved).__name__}, not a state dict, so "
            f"it cannot be loaded into the {type(target).__name__} passed as {name}="
        )
    dest = unwrap(target)
    own = dest.state_dict()
    plan = plan_keys(list(saved), list(own))
    mismatched = [
        ShapeMismatch(dst, src, tuple(saved[src].shape), tuple(own[dst].shape))
        for dst, src in plan.pairs.items()
        if isinstance(saved[src], torch.Tensor)
        and isinstance(own[dst], torch.Tensor)
        and saved[src].shape != own[dst].shape
    ]
    bad = {m.name for m in mismatched}
    if strict and (plan.missing or plan.unexpected or mismatched):
        report = LoadReport(
            path=name,
            format="checkpoint entry",
            entry=name,
            missing=plan.missing,
            unexpected=plan.unexpected,
            mismatched=tuple(mismatched),
            renamed=plan.renamed,
            prefixes=plan.prefixes,
        )
        raise refusal(
            report,
            f"cannot load checkpoint entry {name!r} into {type(dest).__name__}; nothing was "
            "loaded (shape mismatches and names in the table):",
            "Pass strict=False to load what fits.",
        )
    mapped: OrderedDict[str, Any] = OrderedDict(
        (dst, saved[src]) for dst, src in plan.pairs.items() if dst not in bad
    )
    if isinstance(saved, StoredState):
        stored = {
            dst: saved.stored[src]
            for dst, src in plan.pairs.items()
            if dst not in bad and src in saved.stored
        }
        mapped = StoredState(mapped, stored, saved.reader)
    saved_meta = getattr(saved, "_metadata", None)
    own_meta = getattr(own, "_metadata", None)
    if saved_meta is not None and own_meta is not None:
        mapped._metadata = OrderedDict(  # type: ignore[attr-defined]
            (p, saved_meta.get(_canonical_prefix(p), v)) for p, v in own_meta.items()
        )
    return mapped


def weights_of(saved: Any) -> Any:
    """A pickled module object (``{"model": Net()}``) as its state dict; anything else as is.

    Without trust the module is an inert stub, whose tensors are read from its pickled state
    under the names ``state_dict()`` would give.
    """
    if isinstance(saved, torch.nn.Module):
        return unwrap(saved).state_dict()
    if is_module_like(saved):
        return module_state_dict(saved)
    return saved


def _refuse_stubs(name: str, target: object, saved: Any) -> None:
    stubs = find_stubs(saved, limit=1 << 62)
    if stubs:
        shown = ", ".join(stubs[:5]) + (f" and {len(stubs) - 5} more" if len(stubs) > 5 else "")
        raise InvalidStateError(
            f"checkpoint entry {name!r} holds objects of classes that were not imported "
            f"({shown}); they were read as inert stand-ins, which cannot be loaded into the "
            f"{type(target).__name__} passed as {name}=. If you trust the file, pass "
            "trust=True so that the real classes are used."
        )


def check(name: str, target: object, saved: Any, strict: bool) -> Any:
    """Validate ``saved`` against ``target`` before anything is restored; return what to load.

    A module target also takes a pickled module (see :func:`weights_of`). Values holding
    stand-ins for classes that were not imported are refused for every target.
    """
    if isinstance(target, torch.nn.Module):
        saved = weights_of(saved)
        _refuse_stubs(name, target, saved)
        return _module_plan(name, target, saved, strict)
    _refuse_stubs(name, target, saved)
    if isinstance(target, torch.Tensor) and (
        not isinstance(saved, torch.Tensor) or saved.shape != target.shape
    ):
        what = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise InvalidStateError(
            f"checkpoint entry {name!r} ({what}) does not fit the tensor of shape "
            f"{tuple(target.shape)} passed as {name}="
        )
    if isinstance(target, torch.Generator) and not isinstance(saved, torch.Tensor):
        raise InvalidStateError(f"checkpoint entry {name!r} is not a generator state")
    return saved


def restore(name: str, target: object, saved: Any, strict: bool) -> tuple[bool, Any]:
    """Put ``saved`` (already passed through :func:`check`) into ``target``.

    Returns:
        ``(True, None)`` when ``target`` was restored in place, else ``(False, value)`` with
        the value to hand back (a dataclass or Namespace target shapes the value returned).
    """
    if isinstance(target, torch.nn.Module):
        if isinstance(saved, StoredState):
            saved = read_stored(name, unwrap(target), saved)
        if saved is not None:  # None: read in place by read_stored, nothing left to load
            unwrap(target).load_state_dict(saved, strict=strict)
        return True, None
    if isinstance(target, torch.Tensor):
        with torch.no_grad():
            target.copy_(saved)
        return True, None
    if isinstance(target, torch.Generator):
        target.set_state(saved.cpu())
        return True, None
    if isinstance(target, np.random.Generator):
        target.bit_generator.state = saved
        return True, None
    if _is_stateful(target):
        target.load_state_dict(saved)  # type: ignore[attr-defined]
        if isinstance(target, DataLoader):
            warnings.warn(
                f"{name}= is restored, but a new iterator of {type(target).__name__} draws "
                "from the global random generator that was just restored, so random numbers "
                "after the resume (dropout, augmentation) differ from the saved run's; wrap "
                "the loader, torchkeep.ResumableLoader(loader), for a bit-exact resume",
                TorchkeepWarning,
                stacklevel=4,
            )
        return True, None
    return False, shaped_like(target, saved)


def require_entries(entries: Iterable[str], targets: Mapping[str, object], where: str) -> None:
    """Refuse targets the checkpoint has no entry for, before anything is read or touched."""
    held = list(entries)
    missing = [name for name in targets if name not in held]
    if missing:
        raise KeyMismatchError(
            f"checkpoint {where!r} has no entry {', '.join(map(repr, missing))}; it holds: "
            + (", ".join(map(repr, held)) or "nothing"),
            None,
        )


Loader = Callable[[Any], object]


def restore_all(
    values: Mapping[str, Any],
    targets: Mapping[str, object],
    *,
    strict: bool,
    device: str | torch.device | None,
    where: str,
    rng_state: Any = None,
    loaders: Mapping[str, Loader] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint's decoded entries into ``targets``: the one restore loop.

    Every target is checked before any is touched, so a mismatch leaves all of them as they
    were. ``loaders`` restore some targets their own way (a distributed checkpoint's modules
    and optimizers through DCP's ``set_*_state_dict``, which check as they load). Entries not
    restored in place are returned, their tensors on ``device`` (None: the CPU). The RNG state,
    when given, is restored last.
    """
    loaders = loaders or {}
    require_entries(values, targets, where)
    checked = {
        name: check(name, target, values[name], strict)
        for name, target in targets.items()
        if name not in loaders
    }
    # Modules whose tensors are still in the checkpoint read them first, so that a read that
    # fails (a file changed under the reader) leaves every other target as it was.
    read: list[str] = []
    for name, target in targets.items():
        saved = checked.get(name)
        if isinstance(target, torch.nn.Module) and isinstance(saved, StoredState):
            checked[name] = read_stored(name, unwrap(target), saved, before=read)
            read.append(name)
    move = device is not None and torch.device(device).type != "cpu"
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in loaders:
            loaders[name](value)
            continue
        if name in targets:
            done, value = restore(name, targets[name], checked[name], strict)
            if done:
                continue
        out[name] = map_tensors(value, lambda t: t.to(device)) if move else value
    if rng_state:
        restore_rng(rng_state)
    return out


def shaped_like(template: object, value: Any) -> Any:
    """``value`` as the type of ``template`` when that is a Namespace or a dataclass."""
    if isinstance(value, argparse.Namespace):
        fields = vars(value)
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        return value
    if isinstance(template, argparse.Namespace):
        return argparse.Namespace(**fields)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        if not isinstance(value, Mapping) or dataclasses.is_dataclass(value):
            return value
        made = type(template)(
            **{
                f.name: fields[f.name]
                for f in dataclasses.fields(template)
                if f.init and f.name in fields
            }
        )
        for f in dataclasses.fields(template):
            if not f.init and f.name in fields:
                object.__setattr__(made, f.name, fields[f.name])
        return made
    return value


# ---------------------------------------------------------------- namespaces in .pt files

# A .pt checkpoint holds only what torch.load(weights_only=True) reads, so a Namespace is
# stored as the dict of its fields and its place in the state is recorded beside it; reading
# the checkpoint turns those dicts back into Namespaces, as the native format does.


def namespace_paths(value: Any, path: tuple[Any, ...] = ()) -> list[list[Any]]:
    """Where ``value`` holds ``argparse.Namespace`` objects: a list of key/index paths.

    The walk follows :func:`torchkeep.formats.tree.to_torch_plain` (dict keys, list and tuple
    positions, Namespace and dataclass fields), outer Namespaces before inner ones.
    """
    found: list[list[Any]] = []
    fields: Mapping[Any, Any] | None = None
    if isinstance(value, argparse.Namespace):
        found.append(list(path))
        fields = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, Mapping):
        fields = value
    elif isinstance(value, (list, tuple)):
        fields = dict(enumerate(value))
    for key, item in (fields or {}).items():
        found.extend(namespace_paths(item, (*path, key)))
    return found


def revive_namespaces(value: Any, paths: Any, where: str) -> Any:
    """``value`` with the dicts at ``paths`` (from :func:`namespace_paths`) as Namespaces.

    Raises:
        CorruptFileError: a path that does not lead to a dict of string keys.
    """
    if not paths:
        return value
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in paths):
        raise CorruptFileError(f"{where!r} has a damaged record of its namespaces")
    # Inner ones first, so an outer Namespace is built around finished values.
    for path in sorted(paths, key=len, reverse=True):
        value = _revive(value, list(path), where)
    return value


def _revive(value: Any, path: list[Any], where: str) -> Any:
    if not path:
        if not isinstance(value, Mapping) or not all(type(k) is str for k in value):
            raise CorruptFileError(
                f"{where!r} records a namespace at a {type(value).__name__}, not a dict of fields"
            )
        return argparse.Namespace(**value)
    key, rest = path[0], path[1:]
    if isinstance(value, argparse.Namespace) and type(key) is str and hasattr(value, key):
        setattr(value, key, _revive(getattr(value, key), rest, where))
        return value
    if isinstance(value, dict) and _has_key(value, key):
        value[key] = _revive(value[key], rest, where)
        return value
    if isinstance(value, (list, tuple)) and type(key) is int and 0 <= key < len(value):
        items = list(value)
        items[key] = _revive(items[key], rest, where)
        return items if isinstance(value, list) else tuple(items)
    raise CorruptFileError(f"{where!r} records a namespace at a path its state does not have")


def _has_key(mapping: Mapping[Any, Any], key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:  # an unhashable key read from a damaged record
        return False


# ----------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """The global RNG states of Python, numpy, torch CPU and every CUDA device.

    Large integer arrays are stored as int64 tensors so the manifest stays small and a
    ``.pt`` file still loads with ``torch.load(weights_only=True)``.
    """
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNG states captured by :func:`capture_rng`."""
    if "python" in state:
        py = state["python"]
        internal = tuple(int(x) for x in torch.as_tensor(py["state"]).tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = np.asarray(torch.as_tensor(npy["keys"]).numpy(), dtype=np.uint32)
        np.random.set_state(
            (
                npy["algorithm"],
                keys,
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    cuda = list(state.get("cuda") or [])
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn(
                "the checkpoint holds CUDA RNG states but CUDA is not available here; they "
                "were not restored",
                TorchkeepWarning,
                stacklevel=3,
            )
            return
        count = torch.cuda.device_count()
        for index, device_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(torch.as_tensor(device_state).cpu(), index)
        if len(cuda) != count:
            warnings.warn(
                f"the checkpoint holds RNG states of {len(cuda)} CUDA devices and this machine "
                f"has {count}; the first {min(count, len(cuda))} were restored",
                TorchkeepWarning,
                stacklevel=3,
            )


__all__ = [
    "capture",
    "capture_rng",
    "check",
    "kind_of",
    "module_state",
    "namespace_paths",
    "restore",
    "restore_rng",
    "revive_namespaces",
    "shaped_like",
    "type_name",
    "weights_of",
]
